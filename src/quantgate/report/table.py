"""The score table, shaped like the seed's NVFP4 table: size, a column per task, average, retention.

Every cell carries its uncertainty (`42.3 ± 3.1`: a 95% interval half-width, in points), the retention column
its paired interval, and the footer the provenance (hardware, versions, kernel path, n). `render(stable=True)`
drops what changes between identical runs (timestamps, paths, machine names) for the syrupy snapshot.
Distribution gates against BF16 (KL, top-1 agreement), where the table has them, get a column each: the mean
over documents with its interval, and the gate's outcome (`0.0134 [0.0126, 0.0142] PASS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from quantgate.evaluation.lmeval_runner import ItemOutcomes
from quantgate.evaluation.responses import ResponseCounters
from quantgate.gates.scipy_memo import norm_ppf


def mean_halfwidth(o: ItemOutcomes, level: float = 0.95) -> float:
    """Half-width of a normal-approximation interval on the task score (ratio estimator when weighted)."""
    z = norm_ppf(0.5 + level / 2)
    n = len(o.values)
    if n < 2 or o.kind == "perplexity":
        return float("nan")
    if o.weights is None:
        return float(z * o.values.std(ddof=1) / math.sqrt(n))
    r = o.values.sum() / o.weights.sum()
    resid = o.values - r * o.weights
    return float(z * math.sqrt((resid**2).sum() / (n - 1) / n) / o.weights.mean())


@dataclass
class Cell:
    score: float  # in display units (percent, or perplexity)
    halfwidth: float
    n: int
    percent: bool = True

    def text(self) -> str:
        if math.isnan(self.score):
            return "—"
        if not self.percent:
            return f"{self.score:.2f}"
        hw = "" if math.isnan(self.halfwidth) else f" ± {self.halfwidth:.1f}"
        return f"{self.score:.1f}{hw}"


@dataclass
class Row:
    model: str
    variant: str
    fmt: str
    engine: str
    kernel: str
    size_gb: float
    cells: dict[str, Cell]
    retention: tuple[float, float, float] | None  # estimate, low, high (fractions) of the AVG column
    verdict: str = ""  # the AVG retention gate's outcome (PASS, FAIL, INCONCLUSIVE, NOT GATED) or "baseline"
    gates: dict[str, str] = field(default_factory=dict)  # gate name -> outcome value, every gate of the row
    # distribution gate name (kl, top1_agreement, ...) -> (mean, low, high) over documents, in the metric's unit
    distribution: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # task key -> response counters of a generative task (quantgate.evaluation.responses)
    counters: dict[str, ResponseCounters] = field(default_factory=dict)

    def average(self, columns: list[str]) -> float:
        vals = [self.cells[c].score for c in columns if c in self.cells and self.cells[c].percent]
        return float(np.mean(vals)) if vals else float("nan")


@dataclass
class ScoreTable:
    title: str
    tasks: list[str]
    rows: list[Row]
    footer: dict[str, str] = field(default_factory=dict)
    volatile_footer: dict[str, str] = field(default_factory=dict)
    # Per task: metric, n, num_fewshot, gated; the structure a snapshot holds (quantgate.report.snapshot).
    task_info: dict[str, dict[str, object]] = field(default_factory=dict)
    level: float = 0.95
    hardware_class: str = ""
    # Printed under the footer, and not part of a snapshot's compared context.
    legend: dict[str, str] = field(default_factory=dict)
    # The distribution set and level the rows' distribution gates were measured with (None: no such gates).
    distribution: dict[str, object] | None = None

    def distribution_gates(self) -> list[str]:
        """The distribution gates some row has, in a fixed order (``DISTRIBUTION_COLUMNS`` first)."""
        names = {g for r in self.rows for g in r.distribution}
        return [g for g in DISTRIBUTION_COLUMNS if g in names] + sorted(names - set(DISTRIBUTION_COLUMNS))
    # The columns the AVG is over (each task's first metric); None: every column. A task's other metrics have
    # columns `task:label` of their own, outside the AVG.
    avg_columns: list[str] | None = None

    def average_columns(self) -> list[str]:
        """The columns the AVG averages: each task's first metric (`avg_columns`, else every column), those
        scored in percent in every row (perplexities are not)."""
        columns = self.tasks if self.avg_columns is None else self.avg_columns
        return [t for t in columns if all(r.cells.get(t, Cell(0, 0, 0)).percent for r in self.rows)]

    def render(self, stable: bool = False) -> str:
        avg_cols = self.average_columns()
        dist_cols = self.distribution_gates()
        header = [
            "Model",
            "Variant",
            "Engine",
            "Kernel",
            "Size(GB)",
            *self.tasks,
            "AVG",
            "Retention (AVG)",
            "Verdict",
            *(DISTRIBUTION_COLUMNS.get(g, g) for g in dist_cols),
        ]
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        for r in self.rows:
            ret = (
                "baseline"
                if r.retention is None
                else (f"{100 * r.retention[0]:.1f}% [{100 * r.retention[1]:.1f}, {100 * r.retention[2]:.1f}]")
            )
            cells = [r.cells[t].text() if t in r.cells else "—" for t in self.tasks]
            avg = r.average(avg_cols)
            lines.append(
                "| "
                + " | ".join(
                    [
                        r.model,
                        f"{r.variant} ({r.fmt})",
                        r.engine,
                        r.kernel,
                        f"{r.size_gb:.3f}",
                        *cells,
                        "—" if math.isnan(avg) else f"{avg:.1f}",
                        ret,
                        r.verdict,
                        *(_distribution_cell(r, g) for g in dist_cols),
                    ]
                )
                + " |"
            )
        lines.append("")
        lines += self.render_counters()
        footer = dict(self.footer)
        if not stable:
            footer.update(self.volatile_footer)
        footer.update(self.legend)
        lines += [f"- {k}: {v}" for k, v in footer.items()]
        return "\n".join(lines) + "\n"

    def render_counters(self) -> list[str]:
        """The response counters of generative tasks, each variant's beside the baseline's (first row), as a
        second table; [] when no row has any."""
        tasks = [t for t in dict.fromkeys(k for r in self.rows for k in r.counters)]
        if not tasks:
            return []
        base = self.rows[0] if self.rows and self.rows[0].retention is None else None
        lines = [
            "Responses: cut at max_gen_toks (finish_reason length) · empty answer · unparsed answer (e.g. GSM8K "
            "[invalid]) · mean output tokens" + (f"; {base.variant}'s in brackets" if base else ""),
            "",
            "| " + " | ".join(["Variant", *tasks]) + " |",
            "|" + "|".join("---" for _ in range(len(tasks) + 1)) + "|",
        ]
        for r in self.rows:
            cells = []
            for t in tasks:
                c = r.counters.get(t)
                text = "—" if c is None else c.text()
                if base is not None and r is not base and t in base.counters:
                    text += f" ({base.counters[t].text()})"
                cells.append(text)
            lines.append("| " + " | ".join([f"{r.variant} ({r.fmt})", *cells]) + " |")
        return [*lines, ""]


# Column titles of the distribution gates (gates.distribution.GATE_NAMES), in the order they are shown.
DISTRIBUTION_COLUMNS = {"kl": "KL vs BF16 (nats)", "top1_agreement": "Top-1 agreement", "delta_logp": "Δlogp (nats)"}


def _distribution_cell(row: Row, gate: str) -> str:
    """``0.0134 [0.0126, 0.0142] PASS``; top-1 agreement in percent; ``—`` where the row has no such gate."""
    if gate not in row.distribution:
        return "—"
    mean, low, high = row.distribution[gate]
    outcome = row.gates.get(gate, "").replace("_", " ")
    if gate == "top1_agreement":
        text = f"{100 * mean:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
    else:
        text = f"{mean:.4g} [{low:.4g}, {high:.4g}]"
    return f"{text} {outcome}".rstrip()

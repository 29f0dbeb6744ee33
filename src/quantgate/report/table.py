"""The score table, shaped like the seed's NVFP4 table: size, a column per task, average, retention.

Every cell carries its uncertainty (`42.3 ± 3.1`: a 95% interval half-width, in points), the retention column
its paired interval, and the footer the provenance (hardware, versions, kernel path, n). `render(stable=True)`
drops what changes between identical runs (timestamps, paths, machine names) for the syrupy snapshot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from quantgate.evaluation.lmeval_runner import ItemOutcomes


def mean_halfwidth(o: ItemOutcomes, level: float = 0.95) -> float:
    """Half-width of a normal-approximation interval on the task score (ratio estimator when weighted)."""
    z = stats.norm.ppf(0.5 + level / 2)
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

    def average_columns(self) -> list[str]:
        """The tasks the AVG column averages: those scored in percent in every row (perplexities are not)."""
        return [t for t in self.tasks if all(r.cells.get(t, Cell(0, 0, 0)).percent for r in self.rows)]

    def render(self, stable: bool = False) -> str:
        avg_cols = self.average_columns()
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
                    ]
                )
                + " |"
            )
        lines.append("")
        footer = dict(self.footer)
        if not stable:
            footer.update(self.volatile_footer)
        lines += [f"- {k}: {v}" for k, v in footer.items()]
        return "\n".join(lines) + "\n"

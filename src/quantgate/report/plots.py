"""The report's figures, drawn with matplotlib from the data the score table and the gates already hold.

Each function takes plain data and returns a ``matplotlib.figure.Figure`` built without pyplot (no global figure
registry, no backend switch: ``Figure.savefig`` renders with Agg), so callers and tests can inspect its axes and
nothing outlives it. ``save`` writes a PNG.

* ``pareto_figure``: score (AVG and each task) against checkpoint size in GB, with the AVG Pareto frontier (the
  variants no other variant beats on both size and score), as seed 000's NVFP4 study plots accuracy against size.
* ``retention_figure``: paired retention against BF16 per variant and gate (AVG and each gated task), bars at the
  estimate, error bars at the interval, a mark at each gate's floor, the bar coloured by the gate's outcome.
* ``distribution_figure``: mean KL and top-1 agreement against BF16 per variant, with their intervals and limits.
* ``trend_figure``: AVG retention per variant over the runs of the history (quantgate.history).

Every figure carries its provenance (hardware, versions, kernel paths, n) in a footer, as the table does.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import QuantgateError
from quantgate.report.table import ScoreTable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SIZE_LABEL = "checkpoint size (GB)"
# Bar colour per gate outcome (quantgate.gates.outcome.Outcome values)
OUTCOME_COLORS = {"PASS": "tab:green", "FAIL": "tab:red", "INCONCLUSIVE": "tab:orange", "NOT_GATED": "tab:gray",
                  "MISSING": "tab:gray"}
_FOOTER_WIDTH = 150  # characters per footer line at the figures' widths and fontsize 7


@dataclass(frozen=True)
class RetentionBar:
    """One retention gate of one variant: paired retention against BF16 as fractions (1.0 = no loss)."""

    variant: str  # the row's label, e.g. "w8a8-int8 (int8)"
    gate: str  # "AVG" or the task's key
    estimate: float
    low: float
    high: float
    floor: float | None  # the gate's retention floor (thresholds/retention.yaml), None when not gated
    outcome: str  # the gate's Outcome value (PASS, FAIL, INCONCLUSIVE, NOT_GATED)


@dataclass(frozen=True)
class DistributionPoint:
    """One distribution metric of one variant against BF16 (quantgate.gates.distribution.MetricSummary)."""

    variant: str
    metric: str  # "kl" (nats, lower is better) or "top1_agree" (fraction, higher is better)
    mean: float
    low: float
    high: float
    limit: float | None  # ceiling for kl, floor for top1_agree (thresholds/distribution.yaml); None: not gated
    outcome: str  # PASS, FAIL, INCONCLUSIVE, or NOT_GATED without a limit
    n_documents: int


DISTRIBUTION_METRICS = {"kl": "mean KL(P_bf16 || Q) (nats), ceiling", "top1_agree": "top-1 agreement, floor"}


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise QuantgateError(f"the report's figures need matplotlib ({exc}): pip install matplotlib") from None
    return Figure(figsize=(width, height), layout="constrained")


def provenance(table: ScoreTable) -> str:
    """The footer every figure of `table`'s model carries: hardware, versions, kernel paths, n per task."""
    footer = {**table.footer, **table.volatile_footer}
    parts = [f"hardware: {footer.get('hardware', table.hardware_class)} ({table.hardware_class})",
             f"versions: {footer.get('versions', '?')}",
             f"kernels: {footer.get('kernel paths', '?')}",
             "n: " + ", ".join(f"{t}={info.get('n')}" for t, info in table.task_info.items())]
    return "; ".join(parts)


def _footer(fig: Figure, text: str) -> None:
    fig.supxlabel("\n".join(textwrap.wrap(text, _FOOTER_WIDTH)), fontsize=7, ha="left", x=0.01)


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (size, score) that no other point beats with a smaller-or-equal size and a higher score,
    by increasing size (the upper-left staircase of seed 000's accuracy-against-size plot)."""
    front: list[tuple[float, float]] = []
    for size, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if math.isnan(score):
            continue
        if not front or score > front[-1][1]:
            front.append((size, score))
    return front


def pareto_figure(table: ScoreTable) -> Figure:
    """Score (%) against checkpoint size (GB): one series per task scored in percent and one for AVG (each point
    a variant, the AVG points named), the tasks' points with their 95% half-widths, and the AVG frontier."""
    fig = _new_figure(9, 5.5)
    ax = fig.add_subplot()
    rows = sorted(table.rows, key=lambda r: r.size_gb)
    avg_cols = table.average_columns()
    for task in avg_cols:
        pts = [(r.size_gb, r.cells[task].score, r.cells[task].halfwidth) for r in rows if task in r.cells]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                    marker="o", linestyle=":", capsize=2, alpha=0.6, label=task)
    avg = [(r.size_gb, r.average(avg_cols)) for r in rows]
    ax.plot([p[0] for p in avg], [p[1] for p in avg], marker="s", markersize=8, linestyle="none", color="black",
            label="AVG")
    for r, (x, y) in zip(rows, avg, strict=True):
        if not math.isnan(y):
            ax.annotate(r.variant, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = pareto_frontier(avg)
    ax.plot([p[0] for p in front], [p[1] for p in front], drawstyle="steps-post", color="black", linewidth=1,
            label="Pareto frontier (AVG)")
    ax.set_xlabel(SIZE_LABEL)
    ax.set_ylabel("score (%), 95% interval")
    ax.set_title(f"{table.title}: score against checkpoint size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    _footer(fig, provenance(table))
    return fig


def retention_figure(bars: Sequence[RetentionBar], title: str, footer: str) -> Figure:
    """Retention (%) per variant, one bar per gate (AVG first), error bars at the paired interval, a black tick at
    each floor; raises QuantgateError when there is nothing to draw (a table with only its baseline)."""
    if not bars:
        raise QuantgateError("no retention to plot: the table has no quantized variant with stored results")
    variants = list(dict.fromkeys(b.variant for b in bars))
    gates = sorted(dict.fromkeys(b.gate for b in bars), key=lambda g: (g != "AVG", g))
    fig = _new_figure(max(7.0, 1.4 * len(variants) * len(gates) ** 0.5 + 3), 5.5)
    ax = fig.add_subplot()
    width = 0.8 / len(gates)
    for j, gate in enumerate(gates):
        mine = [(variants.index(b.variant), b) for b in bars if b.gate == gate]
        x = [i - 0.4 + width * (j + 0.5) for i, _ in mine]
        est = [100 * b.estimate for _, b in mine]
        err = [[100 * max(b.estimate - b.low, 0) for _, b in mine],
               [100 * max(b.high - b.estimate, 0) for _, b in mine]]
        ax.bar(x, est, width * 0.9, yerr=err, capsize=3, label=gate, hatch=None if gate == "AVG" else "//",
               color=[OUTCOME_COLORS.get(b.outcome, "tab:blue") for _, b in mine], edgecolor="black", alpha=0.8)
        floors = [(xi, 100 * b.floor) for xi, (_, b) in zip(x, mine, strict=True) if b.floor is not None]
        if floors:
            ax.hlines([f for _, f in floors], [xi - width / 2 for xi, _ in floors],
                      [xi + width / 2 for xi, _ in floors], colors="black", linewidths=2,
                      label="floor" if j == 0 else None)
    ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
    ax.set_ylabel("retention against BF16 (%), 95% interval")
    lows = [100 * b.low for b in bars if math.isfinite(b.low)] + [100 * b.floor for b in bars if b.floor]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 5), max(105.0, *[100 * b.high + 2 for b in bars
                                                               if math.isfinite(b.high)]))
    ax.axhline(100, color="gray", linewidth=0.8, linestyle="--")
    ax.set_title(f"{title}: retention (bar colour: gate outcome; hatched: per task)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    _footer(fig, footer)
    return fig


def distribution_figure(points: Sequence[DistributionPoint], title: str, footer: str) -> Figure:
    """Mean KL and top-1 agreement against BF16 per variant (one panel each), the mean with its interval over
    documents, the limit as a dashed line; raises QuantgateError when there is nothing to draw."""
    if not points:
        raise QuantgateError("no distribution metrics to plot: none stored for a quantized variant")
    metrics = [m for m in DISTRIBUTION_METRICS if any(p.metric == m for p in points)]
    fig = _new_figure(9, 3.2 * len(metrics) + 1)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        mine = [p for p in points if p.metric == metric]
        y = list(range(len(mine)))
        for yi, p in zip(y, mine, strict=True):
            lo = p.mean - p.low if math.isfinite(p.low) else 0
            hi = p.high - p.mean if math.isfinite(p.high) else 0
            ax.errorbar([p.mean], [yi], xerr=[[lo], [hi]], marker="o", capsize=4,
                        color=OUTCOME_COLORS.get(p.outcome, "tab:blue"))
            if p.limit is not None:
                ax.plot([p.limit, p.limit], [yi - 0.35, yi + 0.35], color="black", linestyle="--", linewidth=1.5)
        ax.set_yticks(y, [f"{p.variant} ({p.outcome}, n={p.n_documents})" for p in mine])
        ax.set_xlabel(DISTRIBUTION_METRICS[metric] + " (dashed), 95% interval")
        ax.set_ylim(-0.6, len(mine) - 0.4)
        ax.grid(True, axis="x", alpha=0.3)
        if metric == "kl":
            ax.set_xscale("symlog", linthresh=1e-3)  # from ~1e-4 (FP8) to ~1 (a broken format) on one axis
    axes[0].set_title(f"{title}: distribution against BF16 (point colour: gate outcome)")
    _footer(fig, footer)
    return fig


def trend_figure(entries: list[dict[str, Any]]) -> Figure:
    """AVG retention per quantized variant over the runs of a history (quantgate.history entries, oldest first),
    with its interval; a ring marks a run where one of the variant's gates changed outcome, a red cross the
    first drop (quantgate.history.first_drop). Raises QuantgateError when no run recorded a retention."""
    from quantgate import history

    fig = _new_figure(9, 5)
    ax = fig.add_subplot()
    drawn = 0
    for subject, points in history.trend(entries).items():
        pts = [p for p in points if p.retention and p.retention[0] is not None]
        if not pts:
            continue
        drawn += 1
        x = [p.run for p in pts]
        y = [100 * p.retention[0] for p in pts]
        lo = [100 * (p.retention[0] - p.retention[1]) if p.retention[1] is not None else 0 for p in pts]
        hi = [100 * (p.retention[2] - p.retention[0]) if p.retention[2] is not None else 0 for p in pts]
        line = ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=subject)
        changed = {r for r, *_ in history.gate_changes(points)}
        ax.scatter([p.run for p in pts if p.run in changed], [100 * p.retention[0] for p in pts if p.run in changed],
                   s=160, facecolors="none", edgecolors=line[0].get_color(), linewidths=1.5)
        drop = history.first_drop(points)
        if drop is not None:
            dp = next(p for p in pts if p.run == drop)
            ax.scatter([drop], [100 * dp.retention[0]], marker="x", s=120, color="red")
    if not drawn:
        raise QuantgateError(f"no trend to plot: none of the {len(entries)} run(s) recorded a variant's retention")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # runs are whole lines of the history
    ax.set_xlabel("run (history.jsonl line)")
    ax.set_ylabel("retention, AVG over gated tasks (%)")
    ax.set_title("quantgate trend: retention against BF16 (95% interval; ring: a gate changed; x: first drop)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    _footer(fig, _history_provenance(entries))
    return fig


def _history_provenance(entries: list[dict[str, Any]]) -> str:
    """Hardware, versions and commits of the runs the trend spans (each distinct value once)."""
    hw = sorted({f"{(e.get('hardware') or {}).get('name', '?')} ({(e.get('hardware') or {}).get('hw_class', '?')})"
                 for e in entries})
    vers = sorted({", ".join(f"{k} {v}" for k, v in sorted((e.get("versions") or {}).items()) if k != "quantgate")
                   for e in entries})
    n = sorted({f"{t}={s[2]}" for e in entries for v in e.get("variants", {}).values()
                for t, s in v.get("scores", {}).items() if s and len(s) > 2})
    commits = [((e.get("git") or {}).get("commit") or "-")[:10] for e in entries]
    kernels = sorted({f"{k.split('/')[-1]}: {v.get('kernel')}" for e in entries
                      for k, v in e.get("variants", {}).items()})
    return (f"{len(entries)} runs, commits {commits[0]}..{commits[-1]}; hardware: {'; '.join(hw)}; "
            f"versions: {' | '.join(vers)}; kernels: {', '.join(kernels)}; n: {', '.join(n)}")


def save(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG at `path` (parents created); QuantgateError naming the path if it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    except OSError as exc:
        raise QuantgateError(f"could not write the figure {path}: {exc}") from exc
    return path

"""The report `quantgate report` writes beside the score table: figures (quantgate.report.plots) and a Markdown
page that shows each model's table with its figures, and the trend over the run history.

``write_report(run, out_dir)`` reads only stored results (a reuse_only Run): the table comes from
quantgate.verdicts.score_table, the retention bars from the same retention gates the suite judges, the
distribution metrics from quantgate.evaluation.distribution.compare judged against thresholds/distribution.yaml.
Files: ``<out>/report.md``, ``<out>/pareto-<model>.png``, ``<out>/retention-<model>.png``,
``<out>/distribution-<model>.png`` (where distribution results are stored), ``<out>/trend.png`` (where a history
with a retention exists). A figure that cannot be drawn is named in the page with its reason; the others stay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import NotStoredError, QuantgateError
from quantgate.matrix import DistributionThresholds
from quantgate.report import plots
from quantgate.report.table import ScoreTable

REPORT_FILE = "report.md"


@dataclass
class ReportFiles:
    """What `write_report` wrote: the page, the figures (name -> path), and why any figure is absent."""

    page: Path
    figures: dict[str, Path] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def retention_bars(run: Any, table: ScoreTable) -> list[plots.RetentionBar]:
    """AVG and per-gated-task retention of every quantized row of `table`, judged as the suite judges them.

    `run` is a quantgate.runner.Run over stored results. Floors: thresholds' ``floor(format, task)``."""
    from quantgate import verdicts

    model = table.rows[0].model if table.rows else None
    out = []
    for row in table.rows:
        if row.retention is None:
            continue  # the baseline
        judged = [("AVG", verdicts.average_retention_verdict(run, model, row.variant))]
        judged += [(t.key, verdicts.retention_verdict(run, model, row.variant, t.key))
                   for t in run.matrix.tasks if t.gate]
        for gate, v in judged:
            e = v.estimate
            out.append(plots.RetentionBar(row.variant, gate, e.estimate, e.low, e.high, v.floor, v.outcome.value))
    return out


def distribution_points(run: Any, table: ScoreTable,
                        limits: DistributionThresholds | None) -> list[plots.DistributionPoint]:
    """Mean KL and top-1 agreement of each quantized row against BF16, from the stored distribution results,
    each judged against its format's limit (`limits`: thresholds/distribution.yaml; None: drawn ungated).
    Rows without stored distribution results are left out; a matrix without `distribution:` gives none."""
    from quantgate.evaluation.distribution import compare
    from quantgate.gates.distribution import LIMITS, distribution_gate

    if run.matrix.distribution is None:
        return []
    level = limits.level if limits is not None else 0.95
    out = []
    for row in table.rows:
        if row.retention is None:
            continue
        try:
            comparison = compare(run, row.model, row.variant, level=level)
        except NotStoredError:
            continue
        fmt_limits = limits.formats.get(row.fmt) if limits is not None else None
        for limit_name, (metric, _side) in LIMITS.items():
            if metric not in plots.DISTRIBUTION_METRICS:
                continue
            s = comparison.summaries[metric]
            value = getattr(fmt_limits, limit_name) if fmt_limits is not None else None
            outcome = "NOT_GATED" if value is None else distribution_gate(
                comparison.summaries, limit_name, value).outcome.value
            out.append(plots.DistributionPoint(row.variant, metric, s.mean, s.low, s.high, value, outcome,
                                               s.n_documents))
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_report(run: Any, out_dir: Path, *, distribution_limits: DistributionThresholds | None = None,
                 history_entries: list[dict[str, Any]] | None = None) -> ReportFiles:
    """Write the figures and ``report.md`` for every model of `run`'s matrix with stored results into `out_dir`.

    Raises QuantgateError when no model has a complete baseline (nothing to report)."""
    from quantgate import verdicts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out_dir / REPORT_FILE)
    lines = ["# quantgate report", ""]
    reported = 0
    for model in run.matrix.models:
        try:
            table = verdicts.score_table(run, model.name, partial=True)
        except QuantgateError as exc:
            lines += [f"## {model.name}", "", f"(no complete table: {exc})", ""]
            continue
        reported += 1
        lines += [table.render().replace("### ", "## ", 1), ""]
        footer = plots.provenance(table)
        slug = _slug(model.name)
        drawers = [
            (f"pareto-{slug}", "Score against checkpoint size (GB)", lambda t=table: plots.pareto_figure(t)),
            (f"retention-{slug}", "Retention against BF16 with intervals and floors",
             lambda t=table, f=footer: plots.retention_figure(retention_bars(run, t), t.title, f)),
            (f"distribution-{slug}", "Distribution metrics against BF16 (KL, top-1 agreement) with their limits",
             lambda t=table, f=footer: plots.distribution_figure(
                 distribution_points(run, t, distribution_limits), t.title, f)),
        ]
        for name, caption, draw in drawers:
            lines += _figure(files, out_dir, name, caption, draw)
    if not reported:
        raise QuantgateError("no model of the matrix has stored baseline results for these settings: nothing to "
                             "report. `quantgate run` stores them; a run made with --qg-limit is read back with the "
                             "same --qg-limit (the limit is part of every result's key)")
    if history_entries is not None:
        lines += ["## Trend", ""]
        lines += _figure(files, out_dir, "trend", "Retention over the run history",
                         lambda: plots.trend_figure(history_entries))
    files.page.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def _figure(files: ReportFiles, out_dir: Path, name: str, caption: str, draw: Any) -> list[str]:
    """Draw and save one figure; its Markdown (an image, or the reason it is absent)."""
    try:
        fig = draw()
    except QuantgateError as exc:
        files.missing[name] = str(exc)
        return [f"*{caption}: not drawn ({exc})*", ""]
    path = plots.save(fig, out_dir / f"{name}.png")
    files.figures[name] = path
    return [f"![{caption}]({path.name})", ""]

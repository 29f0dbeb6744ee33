"""The result store: one directory per evaluation, keyed by its provenance, written atomically.

Layout: <results>/<model>/<variant>/<task>/<key16>/
  provenance.json  the full key and the context (versions, hardware, kernel path, git state, timings)
  aggregate.json   lm-eval's aggregate metrics for the task
  samples.jsonl    lm-eval's per-item samples (doc, prompt arguments, responses, per-item metrics)
  server.log       the vLLM server log of the run that produced it
A result is reused only when every field of its key matches; anything else is a different experiment.

provenance.json also records the sha256 of aggregate.json and samples.jsonl. An entry whose files are
missing, unparsable or do not match their recorded hashes (a disk fault, a crash of an older layout, a
hand edit) is reported by name and treated as absent, so it is evaluated again and replaced; no other
entry is touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from quantgate.atomic import WriteError, atomic_write_json
from quantgate.evaluation.provenance import key_digest
from quantgate.jsonl import read_jsonl

log = logging.getLogger("quantgate")

# The files of an entry whose sha256 provenance.json records.
_CHECKED = ("aggregate.json", "samples.jsonl")


class CorruptResultError(ValueError):
    """A stored result's files are unreadable or do not match the hashes recorded when it was written."""


@dataclass
class StoredResult:
    path: Path
    provenance: dict[str, Any]
    aggregate: dict[str, Any]
    _samples: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def samples(self) -> list[dict[str, Any]]:
        if self._samples is None:
            self._samples = read_jsonl(self.path / "samples.jsonl", CorruptResultError)
        return self._samples


class ResultStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry_dir(self, model: str, variant: str, task: str, key: dict[str, Any]) -> Path:
        return self.root / model / variant / task / key_digest(key)[:16]

    def lock(self, model: str, variant: str, task: str, key: dict[str, Any]) -> FileLock:
        d = self.entry_dir(model, variant, task, key)
        d.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(d) + ".lock")

    def variant_lock(self, model: str, variant: str) -> FileLock:
        """Held while one process serves and evaluates a variant, so processes sharing this store (xdist
        workers) start its server once. Blocks without a timeout: the holder is evaluating."""
        d = self.root / model / variant
        d.mkdir(parents=True, exist_ok=True)
        return FileLock(str(d / ".serving.lock"))

    def get(self, model: str, variant: str, task: str, key: dict[str, Any]) -> StoredResult | None:
        """The stored result for `key`, or None when there is none or the entry is corrupt (logged by name)."""
        d = self.entry_dir(model, variant, task, key)
        if not (d / "provenance.json").exists():
            return None
        try:
            provenance, aggregate, samples = read_entry(d)
        except CorruptResultError as exc:
            log.warning("quantgate: ignoring corrupt stored result %s: %s; it will be evaluated again", d, exc)
            return None
        if provenance.get("key") != json.loads(json.dumps(key, default=str)):
            return None  # a hash-prefix collision or a hand-edited entry: never trust it
        return StoredResult(d, provenance, aggregate, samples)

    def find(self, model: str, variant: str, task: str, key: dict[str, Any]) -> StoredResult | None:
        """The result for `key` under `variant`, else under any other variant of the model with the same key.

        A key names the served checkpoint, engine, task and settings but not the variant, so two variants
        that serve the same bytes the same way (a modelopt export emulated on a CPU, and its `emulate: true`
        twin) share one evaluation instead of repeating it.
        """
        hit = self.get(model, variant, task, key)
        if hit is not None:
            return hit
        digest = key_digest(key)[:16]
        for other in sorted(self.root.glob(f"{model}/*/{task}/{digest}")):
            if other.parent.parent.name != variant:
                hit = self.get(model, other.parent.parent.name, task, key)
                if hit is not None:
                    return hit
        return None

    def put(
        self,
        model: str,
        variant: str,
        task: str,
        key: dict[str, Any],
        context: dict[str, Any],
        aggregate: dict[str, Any],
        samples: Iterable[dict[str, Any]],
        server_log: Path | None,
    ) -> StoredResult:
        final = self.entry_dir(model, variant, task, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        aside = final.parent / f".{final.name}.old.{os.getpid()}"
        try:
            (tmp / "aggregate.json").write_text(json.dumps(aggregate, indent=2, default=str))
            with open(tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
                for s in samples:
                    fh.write(json.dumps(s, default=str, ensure_ascii=False) + "\n")
            checksums = {name: _sha256(tmp / name) for name in _CHECKED}
            provenance = {"key": key, **context, "checksums": checksums}
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
            if server_log is not None and server_log.exists():
                shutil.copyfile(server_log, tmp / "server.log")
            # The previous entry (a corrupt one being replaced) is moved aside, not deleted, until the new
            # one is in place, so a failure here leaves it as it was.
            if final.exists():
                final.rename(aside)
            tmp.rename(final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if aside.exists() and not final.exists():
                aside.rename(final)
            if isinstance(exc, OSError):
                raise WriteError(
                    f"could not store the result {model}/{variant}/{task} in {final}: "
                    f"{exc.strerror or exc} (errno {exc.errno}); nothing of it was kept, other results are intact"
                ) from exc
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return self.get(model, variant, task, key)  # type: ignore[return-value]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


_Entry = tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]
_FileStamp = tuple[int, int, int] | None
# Entries already read and checked by this process, by directory, with the (inode, size, mtime_ns) of each
# file when they were read. `quantgate run` reads every entry twice (the suite's session, then the score
# table's reading Run); a distribution entry's samples are megabytes of JSON.
_read_cache: dict[str, tuple[tuple[_FileStamp, ...], _Entry]] = {}
_ENTRY_FILES = ("provenance.json", "aggregate.json", "samples.jsonl")


def _stamps(d: Path) -> tuple[_FileStamp, ...]:
    out: list[_FileStamp] = []
    for name in _ENTRY_FILES:
        try:
            st = os.stat(d / name)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_entry(d: Path) -> _Entry:
    """(provenance, aggregate, samples) of one store entry; raises CorruptResultError naming the bad file.

    Read and checked once per process while its files are unchanged: a second read of the same directory
    returns the same (read-only) objects when each file has the inode, size and mtime_ns it had when it was
    read and checked. Any change (a replaced entry is a new directory with new inodes; an edit moves the
    size or the mtime) reads and checks the files again.
    """
    key = str(d)
    stamps = _stamps(d)
    hit = _read_cache.get(key)
    if hit is not None and hit[0] == stamps and None not in stamps:
        return hit[1]
    entry = _read_entry_files(d)
    if None not in stamps and _stamps(d) == stamps:  # unchanged while it was read
        _read_cache[key] = (stamps, entry)
    return entry


def _read_entry_files(d: Path) -> _Entry:
    parsed: dict[str, Any] = {}
    for name in ("provenance.json", "aggregate.json"):
        try:
            parsed[name] = json.loads((d / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptResultError(f"{name} is unreadable ({exc})") from None
    provenance = parsed["provenance.json"]
    if not isinstance(provenance, dict) or not isinstance(parsed["aggregate.json"], dict):
        raise CorruptResultError("provenance.json or aggregate.json is not a JSON object")
    for name, recorded in (provenance.get("checksums") or {}).items():
        try:
            actual = _sha256(d / name)
        except OSError as exc:
            raise CorruptResultError(f"{name} is unreadable ({exc})") from None
        if actual != recorded:
            raise CorruptResultError(f"{name} has sha256 {actual[:12]}..., recorded {recorded[:12]}...")
    try:
        samples = read_jsonl(d / "samples.jsonl", CorruptResultError)
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptResultError(f"samples.jsonl is unreadable ({exc})") from None
    return provenance, parsed["aggregate.json"], samples


class ServerRecords:
    """What a server for a given checkpoint logged last time (its kernel path), so a rerun can compute
    its result keys, which include the kernel path, without starting the server again."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "_servers"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        f = self.dir / f"{key_digest(key)[:16]}.json"
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("quantgate: ignoring unreadable server record %s (%s); the server will be started", f, exc)
            return None

    def put(self, key: dict[str, Any], record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self.dir / f"{key_digest(key)[:16]}.json"
        atomic_write_json(f, {"key": key, **record}, indent=2)

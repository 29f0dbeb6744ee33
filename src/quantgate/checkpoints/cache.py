"""A content-addressed checkpoint cache.

An entry's key covers everything that decides its bytes (base checkpoint hash or pinned revision, recipe,
calibration data hash and size, builder version). Entries are built in a temporary directory next to their
final place and renamed into it, so a crash mid-export leaves nothing a later run would trust. A file lock
makes two pytest-xdist workers that need the same entry build it once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from filelock import FileLock

from quantgate.errors import NotStoredError
from quantgate.paths import cache_dir

MANIFEST = "quantgate_manifest.json"

# Set while reading stored results only (`quantgate report`): a missing entry is an error, never a build.
_ONLY_CACHED: ContextVar[bool] = ContextVar("quantgate_only_cached", default=False)


class NotCachedError(NotStoredError):
    """A checkpoint is not in the cache, and this caller may not build it."""


@contextmanager
def only_cached(enabled: bool = True) -> Iterator[None]:
    token = _ONLY_CACHED.set(enabled)
    try:
        yield
    finally:
        _ONLY_CACHED.reset(token)


def digest(obj: Any) -> str:
    """A stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_checkpoint(path: Path) -> str:
    """Hash of a checkpoint directory's weights and configs (file names and contents, sorted).

    A manifest written at build time carries the hash, so the 100s of MB are read once per entry.
    """
    manifest = path / MANIFEST
    if manifest.exists():
        recorded = json.loads(manifest.read_text()).get("checkpoint_sha256")
        if recorded:
            return recorded
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(f.relative_to(path)).encode())
        h.update(hash_file(f).encode())
    return h.hexdigest()


def cached_entry(kind: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return the cache directory for `key`, calling `build(tmpdir)` to create it if it is missing.

    `build` writes a complete checkpoint into the directory it is given; only if it returns normally is that
    directory renamed into place. Any exception leaves no entry behind.
    """
    root = cache_dir() / "checkpoints" / kind
    root.mkdir(parents=True, exist_ok=True)
    name = digest(key)[:16]
    final = root / name
    with FileLock(str(final) + ".lock"):
        if (final / MANIFEST).exists():
            return final
        if _ONLY_CACHED.get():
            raise NotCachedError(f"no cached {kind} checkpoint {name} (reading stored results only, nothing is built)")
        if final.exists():  # written by an older, interrupted layout: not trusted
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            build(tmp)
            manifest = {"key": key, "checkpoint_sha256": None}
            manifest["checkpoint_sha256"] = hash_checkpoint(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def manifest(path: Path) -> dict[str, Any]:
    f = path / MANIFEST
    return json.loads(f.read_text()) if f.exists() else {}

"""Atomic file writes under unique temporary names.

A file is written to a temporary file with a unique name in its own directory, flushed to disk, and renamed
over the destination (`os.replace`, atomic on POSIX within one filesystem). Readers see the old file or the
new one, never a partial one; two pytest-xdist workers writing the same path never share a temporary file;
a failed write (a full disk: ENOSPC) removes its temporary file and leaves the previous content intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from quantgate.errors import QuantgateError


class WriteError(QuantgateError):
    """A file could not be written (disk full, permissions); the destination keeps its previous content."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; raises WriteError naming the path and the OS error on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"could not write {path}: {exc.strerror or exc} (errno {exc.errno}); "
                             "its previous content is unchanged") from exc
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """`atomic_write_bytes` for a JSON document (`dumps` are json.dumps options; default=str)."""
    dumps.setdefault("default", str)
    return atomic_write_text(path, json.dumps(obj, **dumps))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

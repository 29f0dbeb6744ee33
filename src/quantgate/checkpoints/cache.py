"""A content-addressed checkpoint cache.

An entry's key covers everything that decides its bytes (base checkpoint hash or pinned revision, recipe,
calibration data hash and size, builder version). Entries are built in a temporary directory next to their
final place and renamed into it, so a crash mid-export leaves nothing a later run would trust. A file lock
makes two pytest-xdist workers that need the same entry build it once.

Every use of an entry, fresh or cached, first passes its `validate` check (for checkpoints:
obtain.validate_checkpoint_dir, so a checkpoint is checked before anything serves it, whichever way it
came). A cached entry whose manifest is unreadable, whose files differ from the sizes the manifest
recorded (or, for files under SMALL_FILE_BYTES such as configs and tokenizers, from their sha256), or that
fails `validate`, is named in a warning, moved aside and built again; no other entry is touched. Weight
files are checked by size and by safetensors' own header validation, not re-hashed on every use.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from filelock import FileLock

from quantgate.errors import BuildError, NotStoredError
from quantgate.paths import cache_dir

log = logging.getLogger("quantgate")

MANIFEST = "quantgate_manifest.json"
SMALL_FILE_BYTES = 16 * 2**20

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


# What a checkpoint is made of: weights, configs (config.json, generation_config.json, quantization and
# tokenizer configs, quantgate_build.json), tokenizer files and the chat template. Not huggingface_hub's
# bookkeeping (.cache/huggingface/*.metadata carries download timestamps), .gitattributes, README or licences.
CHECKPOINT_FILE_PATTERNS = ("*.safetensors", "*.json", "*.bin", "*.pt", "*.pth", "*.model", "*.tiktoken",
                            "*.jinja", "vocab.txt", "merges.txt", "added_tokens.txt", "special_tokens_map.txt")


def checkpoint_files(path: Path) -> list[Path]:
    """The files of a checkpoint directory that its hash covers (CHECKPOINT_FILE_PATTERNS), sorted; nothing
    under a hidden folder (`.cache/`), and not the cache manifest."""
    out = []
    for f in path.rglob("*"):
        rel = f.relative_to(path)
        if (not f.is_file() or f.name == MANIFEST or any(part.startswith(".") for part in rel.parts)
                or not any(fnmatch.fnmatch(f.name, pat) for pat in CHECKPOINT_FILE_PATTERNS)):
            continue
        out.append(f)
    return sorted(out)


def hash_checkpoint(path: Path) -> str:
    """Hash of a checkpoint directory's weights, configs and tokenizer files (`checkpoint_files`: relative
    names and sha256 of contents, sorted), so two downloads of one commit hash the same.

    A manifest written at build time carries the hash, so the 100s of MB are read once per entry.
    """
    manifest = path / MANIFEST
    if manifest.exists():
        recorded = json.loads(manifest.read_text()).get("checkpoint_sha256")
        if recorded:
            return recorded
    h = hashlib.sha256()
    for f in checkpoint_files(path):
        h.update(str(f.relative_to(path)).encode())
        h.update(hash_file(f).encode())
    return h.hexdigest()


def cached_entry(
    kind: str, key: dict[str, Any], build: Callable[[Path], None], validate: Callable[[Path], None] | None = None
) -> Path:
    """Return the cache directory for `key`, calling `build(tmpdir)` to create it if it is missing.

    `build` writes a complete checkpoint into the directory it is given; only if it returns normally and
    `validate(dir)` (when given) passes is that directory renamed into place. Any exception leaves no entry
    behind. A cached entry is checked (`entry_problem`, then `validate`) on every call; a corrupt one is
    rebuilt, or, while reading stored results only, raises NotCachedError naming it.
    """
    root = cache_dir() / "checkpoints" / kind
    root.mkdir(parents=True, exist_ok=True)
    name = digest(key)[:16]
    final = root / name
    with FileLock(str(final) + ".lock"):
        if (final / MANIFEST).exists():
            problem = entry_problem(final)
            if problem is None and validate is not None:
                try:
                    validate(final)
                except BuildError as exc:
                    problem = str(exc)
            if problem is None:
                return final
            if _ONLY_CACHED.get():
                raise NotCachedError(f"cached {kind} checkpoint {final} is corrupt ({problem}); nothing is built")
            log.warning("quantgate: cached %s checkpoint %s is corrupt (%s); building it again", kind, final, problem)
        if _ONLY_CACHED.get():
            raise NotCachedError(f"no cached {kind} checkpoint {name} (reading stored results only, nothing is built)")
        if final.exists():  # corrupt, or written by an older, interrupted layout: not trusted
            aside = root / f".{name}.corrupt.{os.getpid()}"
            final.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        # What a build of this key that was killed outright (SIGKILL, power loss) left: its temporary export
        # and spec file. Never trusted (only a rename makes an entry); removed here, under the key's lock, so
        # no build of this key is running.
        for stale in root.glob(f".{name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            build(tmp)
            if validate is not None:
                validate(tmp)
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            small = {n: hash_file(tmp / n) for n, size in files.items() if size <= SMALL_FILE_BYTES}
            manifest = {"key": key, "checkpoint_sha256": hash_checkpoint(tmp), "files": files, "small_sha256": small}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def entry_problem(path: Path) -> str | None:
    """Why a cache entry cannot be trusted (naming the file), or None. Entries written before the manifest
    recorded file sizes are checked for a readable manifest only."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    if not isinstance(m, dict) or not m.get("checkpoint_sha256"):
        return f"{MANIFEST} records no checkpoint_sha256"
    for rel, size in (m.get("files") or {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size} bytes, {size} when built"
    for rel, sha in (m.get("small_sha256") or {}).items():
        if hash_file(path / rel) != sha:
            return f"{rel} differs from its sha256 when built"
    return None


def manifest(path: Path) -> dict[str, Any]:
    f = path / MANIFEST
    return json.loads(f.read_text()) if f.exists() else {}

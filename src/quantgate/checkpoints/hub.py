"""Hugging Face Hub sources: pinned revisions, download into the Hugging Face cache, and keeping the token out.

A `hub` source names a full 40-character commit (a branch or tag moves, and a short hash is ambiguous), so the
checkpoint's cache key means one set of bytes. `resolve_revision` turns a branch, tag or short hash into that
commit: from the local Hugging Face cache's `refs/<name>` when HF_HUB_OFFLINE=1 (huggingface_hub's own
offline mode), else from `HfApi().model_info(repo, revision=...).sha`.

Files are downloaded by huggingface_hub's `snapshot_download` into its cache (HF_HUB_CACHE), then copied into
quantgate's checkpoint cache without huggingface_hub's own bookkeeping (`.cache/huggingface/*.metadata`,
`.gitattributes`, README), so the checkpoint's hash covers weights, configs and tokenizer files only.

The token (HF_TOKEN, or huggingface_hub's stored token) is read by huggingface_hub itself and is never put in
a key, a log, an error or a file; any error text that would carry it is redacted (`redact`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from pathlib import Path

from quantgate.errors import BuildError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Files a checkpoint is made of: weights, configs, tokenizer and chat template (what vLLM and lm-eval load).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


def is_commit(revision: str) -> bool:
    """True for a full 40-character lowercase hex commit hash (git's SHA-1 object name)."""
    return bool(COMMIT.match(revision))


def redact(text: str) -> str:
    """`text` with the Hugging Face token (the HF_TOKEN value, the stored token, anything shaped `hf_...`)
    replaced by `<redacted>`."""
    tokens = {os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}
    try:
        from huggingface_hub import get_token

        tokens.add(get_token())
    except Exception:  # noqa: BLE001 - no stored token, or an older huggingface_hub: nothing more to hide
        pass
    for t in sorted((t for t in tokens if t), key=len, reverse=True):
        text = text.replace(t, "<redacted>")
    return _TOKEN_RE.sub("<redacted>", text)


def cached_revision(repo_id: str, revision: str) -> str | None:
    """The commit `revision` (branch, tag, or a unique commit prefix) names in the local Hugging Face cache, or
    None; reads `models--<org>--<name>/refs/<revision>` and `snapshots/` as huggingface_hub lays them out."""
    from huggingface_hub.constants import HF_HUB_CACHE

    repo_dir = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        sha = ref.read_text().strip()
        return sha if is_commit(sha) else None
    snapshots = repo_dir / "snapshots"
    if re.match(r"^[0-9a-f]{7,40}$", revision) and snapshots.is_dir():
        hits = [p.name for p in snapshots.iterdir() if p.name.startswith(revision) and is_commit(p.name)]
        return hits[0] if len(hits) == 1 else None
    return None


def cached_model_ids() -> list[str]:
    """The model repo ids with a folder in the local Hugging Face cache (``models--<org>--<name>``), sorted."""
    from huggingface_hub.constants import HF_HUB_CACHE

    root = Path(HF_HUB_CACHE)
    if not root.is_dir():
        return []
    return sorted(p.name.removeprefix("models--").replace("--", "/") for p in root.glob("models--*") if p.is_dir())


def resolve_revision(repo_id: str, revision: str) -> str:
    """The full 40-character commit of `revision` (a commit, branch, tag or short hash) of `repo_id`.

    Offline (HF_HUB_OFFLINE=1) from the local cache's refs; online with `HfApi().model_info(...).sha`.
    Raises BuildError naming the repository and revision when neither answers (the token is redacted).
    """
    if is_commit(revision):
        return revision
    from huggingface_hub import constants

    sha = cached_revision(repo_id, revision)
    if sha is not None:
        return sha
    if constants.HF_HUB_OFFLINE:
        raise BuildError(f"{repo_id}@{revision}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                         "and HF_HUB_OFFLINE=1 forbids asking the Hub; pin the full 40-character commit")
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(repo_id, revision=revision).sha
    except Exception as exc:  # noqa: BLE001 - network, auth, not found: all end in one named error
        raise BuildError(f"{repo_id}@{revision}: cannot resolve the revision on the Hub: "
                         f"{redact(str(exc))}") from None
    if not sha or not is_commit(sha):
        raise BuildError(f"{repo_id}@{revision}: the Hub returned no commit hash ({sha!r})")
    return sha


def download_snapshot(repo_id: str, revision: str, dest: Path, *, allow_pickle: bool = False,
                      label: str = "") -> str:
    """Download `repo_id` at commit `revision` into the Hugging Face cache and copy its checkpoint files
    (ALLOW_PATTERNS, plus PICKLE_PATTERNS if `allow_pickle`) into the empty folder `dest`.

    Returns the commit the snapshot is (checked equal to `revision`). Works offline (HF_HUB_OFFLINE=1) from a
    cache that holds the snapshot. Raises BuildError naming `label`, the repository and revision, the token
    redacted, when the download fails or the cache holds another commit.
    """
    if not is_commit(revision):
        raise BuildError(f"{label}: {repo_id}: revision {revision!r} is not a full 40-character commit")
    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        from huggingface_hub import constants, snapshot_download

        # With a commit for revision, huggingface_hub 1.x lists the repo's tree online even under
        # HF_HUB_OFFLINE=1 unless it cached that listing; local_files_only makes offline mean the cache only.
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                          local_files_only=bool(constants.HF_HUB_OFFLINE)))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing revision, offline cache miss
        raise BuildError(f"{label}: downloading {repo_id}@{revision} failed: "
                         f"{type(exc).__name__}: {redact(str(exc))}") from None
    if snapshot.name != revision:
        raise BuildError(f"{label}: {repo_id}@{revision}: huggingface_hub returned snapshot {snapshot.name}")
    for f in sorted(snapshot.rglob("*")):
        rel = f.relative_to(snapshot)
        # the snapshot folder may hold more than this call fetched (another download of the same commit, or
        # an offline cache, which snapshot_download returns whole): take the checkpoint's files only
        if (any(part.startswith(".") for part in rel.parts) or not f.is_file()
                or not any(fnmatch.fnmatch(f.name, pat) for pat in patterns)):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # the snapshot's files are symlinks into blobs/: copy the bytes, so the cache entry stands alone
        shutil.copyfile(f.resolve(), target)
    return snapshot.name

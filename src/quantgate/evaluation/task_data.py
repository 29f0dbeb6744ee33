"""Which offline data files each lm-eval task reads, and their fingerprint for result keys.

quantgate runs lm-eval's own task configs with only the dataset location pointed at a local mirror of the Hub
dataset (tasks/offline_data.py: MIRRORS, one per Hub dataset id, built from files of the data folder). A
result is keyed on the sha256 of exactly the files its task's mirrors are built from, and on nothing else in
the folder: adding a dataset folder or editing a README changes no key.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

# Mirrors that read more than the files their availability check names: MMLU reads every subject's CSVs.
_READS_GLOB: dict[str, tuple[str, ...]] = {"cais/mmlu": ("mmlu/*/*.csv",)}


def mirror_files(hub_id: str, data_dir: Path) -> tuple[str, ...]:
    """Files (relative to `data_dir`) the mirror of Hub dataset `hub_id` is built from; () if none is shipped."""
    from quantgate.evaluation.tasks.offline_data import MIRRORS

    mirror = MIRRORS.get(hub_id)
    if mirror is None:
        return ()
    files = set(mirror.needs)
    for pattern in _READS_GLOB.get(hub_id, ()):
        files |= {str(p.relative_to(data_dir)) for p in Path(data_dir).glob(pattern)}
    return tuple(sorted(files))


def task_data_files(lm_eval_task: str, data_dir: Path) -> tuple[str, ...]:
    """The data files every leaf of `lm_eval_task` (a task, group or tag) reads offline; () when some leaf has
    no offline mirror (that task reads the Hub, and its dataset revision is part of its config digest)."""
    from quantgate.evaluation.task_registry import task_facts

    files: set[str] = set()
    # A group's leaves mostly share one dataset (mmlu: 57 subtasks, one cais/mmlu mirror); each distinct
    # one is listed once, not once per leaf. Cached facts: lm-eval is not imported.
    for dataset_path in dict.fromkeys(task_facts(lm_eval_task)["dataset_paths"]):
        own = mirror_files(str(dataset_path), data_dir)
        if not own:
            return ()
        files |= set(own)
    return tuple(sorted(files))


def files_fingerprint(data_dir: Path, files: tuple[str, ...]) -> dict[str, object]:
    """{"files": n, "sha256": digest}: sha256 of the sorted "relative-path sha256" lines. A missing file enters
    as "missing" (loading the task then fails naming it)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel} {_file_sha256(Path(data_dir) / rel)}\n".encode())
    return {"files": len(files), "sha256": h.hexdigest()}


def task_data_fingerprint(data_dir: Path | None, lm_eval_task: str) -> dict[str, object] | None:
    """The fingerprint of the files `lm_eval_task` reads; None without a data folder or for a Hub task."""
    if data_dir is None:
        return None
    files = task_data_files(lm_eval_task, data_dir)
    return files_fingerprint(data_dir, files) if files else None


def _file_sha256(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return _hash_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _hash_cached(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per (path, size, mtime) per process."""
    from quantgate.checkpoints.cache import hash_file

    return hash_file(Path(path))

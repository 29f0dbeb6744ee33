"""lm-eval's own task index: which task and group names exist, and which metrics each declares.

Task names in a matrix are lm-eval's registered names (tasks, groups and tags of the installed lm-eval), so
any task lm-eval ships can be gated. Building lm-eval's `TaskManager` indexes every YAML file it ships (about
14,700 in lm-eval 0.4.13, ~6-7 s), so the index is built once per process and shared.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class UnknownTaskError(ValueError):
    """A task name that lm-eval's index does not hold; the message suggests close names."""


@functools.lru_cache(maxsize=1)
def task_manager() -> Any:
    """lm-eval's TaskManager over its built-in tasks, built once per process (takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@functools.lru_cache(maxsize=1)
def index_fingerprint() -> str:
    """16 hex digits of sha256 over lm-eval's version and the names, sizes and mtimes of its task files.

    A walk, not a parse (a fraction of a second for ~14,700 files), and lm-eval is located, not imported:
    importing lm_eval.tasks pulls in datasets and torch (seconds). What quantgate caches from lm-eval's task
    index is filed under this fingerprint, so an lm-eval upgrade, a reinstall elsewhere or an edited task file
    is a cache miss. Raises UnknownTaskError where lm-eval is not installed.
    """
    import hashlib
    import importlib.util
    import os

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownTaskError("lm-eval is not installed here: pip install lm-eval")
    root = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    h = hashlib.sha256(_lm_eval_version().encode())
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith((".yaml", ".yml", ".py")):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{dirpath}/{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _index_cache(filename: str) -> Path:
    from quantgate.paths import cache_dir

    return cache_dir() / "lm-eval-index" / filename


def _read_cached(path: Path) -> Any:
    """The JSON at `path`, or None where it is missing or unreadable (then it is recomputed)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_cached(path: Path, value: Any) -> None:
    """Write `value` as JSON atomically (a concurrent reader sees the old file or the whole new one); a
    read-only cache only costs the next process the recomputation."""
    from quantgate.atomic import WriteError, atomic_write_json

    try:
        atomic_write_json(path, value, sort_keys=True)
    except (OSError, WriteError) as err:
        log.warning("quantgate: cannot cache lm-eval task facts at %s: %s", path, err)


@functools.lru_cache(maxsize=1)
def known_names() -> frozenset[str]:
    """Every registered task, group and tag name of the installed lm-eval.

    Read from a small file in quantgate's cache under `index_fingerprint()`, so checking a name does not
    build the whole index; written from the TaskManager on a miss.
    """
    path = _index_cache(f"names-{index_fingerprint()}.json")
    cached = _read_cached(path)
    if isinstance(cached, list):
        return frozenset(cached)
    names = task_manager().all_tasks
    _write_cached(path, sorted(names))
    return frozenset(names)


def check_task_name(name: str) -> str:
    """`name` if lm-eval registers it; else UnknownTaskError naming up to 3 close matches (difflib)."""
    names = known_names()
    if name in names:
        return name
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownTaskError(
        f"lm-eval {_lm_eval_version()} has no task, group or tag named {name!r}{hint} "
        "(`lm-eval ls tasks` lists them)"
    )


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@dataclass(frozen=True)
class LeafConfig:
    """One leaf task of a name (a task is its own leaf; a group or tag has many)."""

    name: str
    config: dict[str, Any]  # lm-eval's index config: includes merged, !function left as dotted paths
    yaml_path: str | None


def leaves(name: str) -> Iterator[LeafConfig]:
    """The leaf tasks under a registered task, group or tag, walking lm-eval's own group definitions."""
    from lm_eval.tasks._index import Kind

    index = task_manager().task_index
    seen: set[str] = set()

    def walk(item: Any) -> Iterator[LeafConfig]:
        if isinstance(item, dict):
            child = item.get("group") if "group" in item else item.get("task")
            if "group" in item and child not in index:  # an inline group: its own task list
                for sub in _as_list(item.get("task")):
                    yield from walk(sub)
                return
            if "task" in item and child not in index:  # an inline task config
                yield LeafConfig(str(child), item, None)
                return
            item = child
        entry = index.get(item)
        if entry is None or entry.name in seen:
            return
        seen.add(entry.name)
        if entry.kind == Kind.GROUP:
            for sub in _as_list((entry.cfg or {}).get("task")):
                yield from walk(sub)
        elif entry.kind == Kind.TAG:
            for sub in sorted(entry.tags):
                yield from walk(sub)
        else:
            yield LeafConfig(entry.name, dict(entry.cfg or {}), str(entry.yaml_path) if entry.yaml_path else None)

    yield from walk(name)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def declared_metrics(name: str) -> set[str]:
    """The `metric,filter` keys lm-eval reports for a task or group, from its config alone (nothing is loaded).

    A leaf reports each metric of its `metric_list` under every filter of its `filter_list` ("none" when it
    has none: lm-eval's default). A group reports the metrics of its `aggregate_metric_list`. Tasks written
    in Python (no metric_list) return an empty set: their metrics are only known when they run.
    """
    index = task_manager().task_index
    entry = index[check_task_name(name)]
    keys: set[str] = set()
    for agg in _as_list((entry.cfg or {}).get("aggregate_metric_list")):
        for flt in _as_list(agg.get("filter_list")) or ["none"]:
            keys.add(f"{agg['metric']},{flt}")
    for leaf in leaves(name):
        # A `!function` metric is indexed as its dotted path; lm-eval reports it under the function's __name__.
        metrics = [
            str(m["metric"]).rsplit(".", 1)[-1] if "/" in str(m["metric"]) else str(m["metric"])
            for m in _as_list(leaf.config.get("metric_list"))
            if isinstance(m, dict)
        ]
        filters = [f["name"] for f in _as_list(leaf.config.get("filter_list")) if isinstance(f, dict)] or ["none"]
        keys.update(f"{m},{f}" for m in metrics for f in filters)
    return keys


def output_types(name: str) -> set[str]:
    """lm-eval output types of a task's leaves (generate_until, loglikelihood, multiple_choice, ...)."""
    return {str(leaf.config.get("output_type", "generate_until")) for leaf in leaves(name)}


def dataset_paths(name: str) -> set[str]:
    """The Hub dataset ids a task's leaves read (`dataset_path` of each leaf config)."""
    return {str(leaf.config["dataset_path"]) for leaf in leaves(name) if leaf.config.get("dataset_path")}


def location_free(text: str, package_root: str, yaml_path: str | None) -> str:
    """`text` (a serialized task config) with the install location taken out.

    lm-eval resolves a config's `!function utils.process_docs` to a callable whose text form carries the absolute
    path of the file (`/venv/.../lm_eval/tasks/hellaswag/utils.process_docs`). Left in, the digest would differ
    between two checkouts or virtual environments of the same lm-eval, and no stored result or accepted baseline
    would be reused across machines. The task's own folder becomes `<task_dir>`, lm-eval's package `<lm_eval>`.
    """
    if yaml_path:
        text = text.replace(str(Path(yaml_path).resolve().parent), "<task_dir>")
    return text.replace(package_root, "<lm_eval>")


def _compute_config_digest(name: str) -> str:
    import hashlib
    import json

    import lm_eval

    package_root = str(Path(lm_eval.__file__).resolve().parent)
    h = hashlib.sha256()
    for leaf in sorted(leaves(name), key=lambda x: x.name):
        text = json.dumps(leaf.config, sort_keys=True, default=str)
        h.update(location_free(text, package_root, leaf.yaml_path).encode())
        if leaf.yaml_path:
            for py in sorted(Path(leaf.yaml_path).parent.glob("*.py")):
                h.update(py.name.encode())
                h.update(py.read_bytes())
    return h.hexdigest()


TASK_FACTS_VERSION = 2  # bump when what task_facts records, or how, changes


@functools.cache
def task_facts(name: str) -> dict[str, Any]:
    """What a result key needs from lm-eval's index about task, group or tag `name`:
    {"config_sha256": task_config_digest's value, "dataset_paths": [each leaf's dataset_path or None, by leaf
    name]}.

    Cached on disk per (index_fingerprint(), name), so a rerun whose results are all stored neither imports
    lm-eval nor builds its TaskManager (~6-7 s, issue 14); an lm-eval upgrade or an edited task file changes
    the fingerprint and so recomputes. Raises UnknownTaskError where lm-eval is not installed.
    """
    import hashlib

    tag = hashlib.sha256(name.encode()).hexdigest()[:16]
    path = _index_cache(f"task-{index_fingerprint()}-{tag}.json")
    cached = _read_cached(path)
    if isinstance(cached, dict) and cached.get("version") == TASK_FACTS_VERSION and cached.get("task") == name:
        return cached
    leaf_list = sorted(leaves(name), key=lambda x: x.name)
    facts = {
        "version": TASK_FACTS_VERSION,
        "task": name,
        "config_sha256": _compute_config_digest(name),
        "dataset_paths": [leaf.config.get("dataset_path") for leaf in leaf_list],
    }
    _write_cached(path, facts)
    return facts


def task_config_digest(name: str) -> str:
    """sha256 over the leaf configs lm-eval would run (includes merged) and the Python files they call.

    Part of every result's key, so an lm-eval upgrade that changes a prompt, filter or metric is a new
    experiment and never reuses a stored result. Read from the task_facts cache where it holds the digest.
    """
    return str(task_facts(name)["config_sha256"])

"""lm-eval's own task index: which task and group names exist, and which metrics each declares.

Task names in a matrix are lm-eval's registered names (tasks, groups and tags of the installed lm-eval), so
any task lm-eval ships can be gated. Building lm-eval's `TaskManager` indexes every YAML file it ships (about
14,700 in lm-eval 0.4.13, ~6-10 s), so a process builds one TaskManager, over the folders of the tasks it
names only (task_manager), and the full index at most once per lm-eval install, to record where each task lives.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class UnknownTaskError(ValueError):
    """A task name that lm-eval's index does not hold; the message suggests close names."""


# The process's one TaskManager and the names it holds exactly as the full index does (None: it is the full
# index). Reused by every evaluation, check and fact lookup of the process (issue 14: building one per
# evaluation cost 6-10 s).
_manager: Any = None
_covered: frozenset[str] | None = frozenset()


def task_manager(names: Iterable[str] | None = None) -> Any:
    """lm-eval's TaskManager for this process, holding at least `names` (task, group or tag names) exactly as
    lm-eval's full index holds them; `names=None` asks for every task lm-eval ships.

    Indexing all of lm-eval's task files takes ~10 s (about 14,700 YAML files in 0.4.13). Where the on-disk
    task locations (`task_locations`, written once from a full index under `index_fingerprint()`) know every
    name, only the folders of those names' YAML files are indexed: lm-eval's own
    `TaskManager(include_defaults=False, include_path=[...])`, with each group's subtasks and each tag's
    members included, and the result checked entry by entry (same YAML file, kind and tag members) against the
    full index's record. On a miss, or where the check fails, the full index is built (and the locations
    cached). The manager is kept and reused; a later call naming more tasks widens it once (runner passes the
    whole matrix's names with the first evaluation, so a run builds one).
    """
    global _manager, _covered
    wanted = None if names is None else frozenset(names)
    if _manager is not None and (_covered is None or (wanted is not None and wanted <= _covered)):
        return _manager
    scope = None if wanted is None else wanted | (_covered or frozenset())
    manager = _scoped_manager(scope) if scope is not None else None
    if manager is None:
        _manager, _covered = _full_manager(), None
    else:
        _manager, _covered = manager, scope
    return _manager


def reset_task_manager() -> None:
    """Forget the process's TaskManager (tests; a changed lm-eval install)."""
    global _manager, _covered
    _manager, _covered = None, frozenset()
    _full_manager.cache_clear()
    task_locations.cache_clear()


@functools.lru_cache(maxsize=1)
def _full_manager() -> Any:
    """lm-eval's TaskManager over every task it ships (~10 s); caches the task locations as a side effect."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    _write_cached(_index_cache(f"locations-{index_fingerprint()}.json"), _locations_of(manager.task_index))
    return manager


def _tasks_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownTaskError("lm-eval is not installed here: pip install lm-eval")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "tasks"


def _refs(task_list: Any, index: dict[str, Any]) -> list[str]:
    """Every index name a group's `task:` list refers to (strings, {task: ...}, {group: ...}, and the members
    of inline groups), as lm-eval's TaskFactory resolves them; names not in the index are inline tasks."""
    out: list[str] = []
    for item in _as_list(task_list):
        if isinstance(item, dict):
            key = item.get("group") if "group" in item else item.get("task")
            if "group" in item and key not in index:
                out += _refs(item.get("task"), index)
                continue
            item = key
        if isinstance(item, str) and item in index:
            out.append(item)
    return out


def _locations_of(index: dict[str, Any]) -> dict[str, Any]:
    """{name: {"kind", "yaml" (path under lm_eval/tasks, or None), "refs" (group members / tag members)}}."""
    from lm_eval.tasks._index import Kind

    root = _tasks_root()
    out: dict[str, Any] = {}
    for name, entry in index.items():
        yaml = None
        if entry.yaml_path is not None:
            path = Path(entry.yaml_path).resolve()
            yaml = path.relative_to(root).as_posix() if path.is_relative_to(root) else None
        if entry.kind == Kind.TAG:
            refs = sorted(entry.tags)
        elif entry.kind == Kind.GROUP:
            refs = _refs((entry.cfg or {}).get("task"), index)
        else:
            refs = []
        out[name] = {"kind": entry.kind.name, "yaml": yaml, "refs": refs}
    return out


@functools.lru_cache(maxsize=1)
def task_locations() -> dict[str, Any] | None:
    """The full index's `_locations_of`, read from quantgate's cache under `index_fingerprint()`, or None when
    it is not cached yet (the next full index writes it)."""
    cached = _read_cached(_index_cache(f"locations-{index_fingerprint()}.json"))
    return cached if isinstance(cached, dict) else None


def _closure(names: Iterable[str], locations: dict[str, Any]) -> dict[str, Any] | None:
    """The location records of `names` and of everything they refer to; None if any name is unknown."""
    out: dict[str, Any] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        rec = locations.get(name)
        if rec is None:
            return None
        out[name] = rec
        todo += rec["refs"]
    return out


def _scoped_manager(names: frozenset[str]) -> Any:
    """A TaskManager indexing only the folders of `names` and what they refer to, or None where the cached
    locations do not know a name or the scoped index differs from the full one for any of them."""
    locations = task_locations()
    closure = None if locations is None else _closure(names, locations)
    if closure is None:
        return None
    files = {rec["yaml"] for rec in closure.values() if rec["kind"] != "TAG"}
    if None in files:  # generated or outside lm-eval's folder: only the full index knows where it came from
        return None
    dirs = sorted({Path(f).parent for f in files}, key=lambda p: p.parts)
    # one root per subtree: lm-eval indexes each include_path recursively, and a folder given twice would
    # register its tasks twice (lm-eval warns and the later one wins)
    roots = [d for d in dirs if not any(o != d and d.is_relative_to(o) for o in dirs)]
    root = _tasks_root()
    if Path(".") in roots:
        return None  # a task file at the top of lm_eval/tasks: that is the full index
    from lm_eval.tasks import TaskManager

    # A tag whose tasks lie in two of these folders is registered once per folder, and lm-eval warns that the
    # later replaces the earlier. Only names checked below are used, and a tag among them that lost members
    # fails the check, so the warning says nothing here.
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)
    try:
        manager = TaskManager(include_defaults=False, include_path=[str(root / d) for d in roots])
    finally:
        index_log.setLevel(level)
    got = _locations_of(manager.task_index)
    differing = sorted(n for n, rec in closure.items() if got.get(n) != rec)
    if differing:
        log.warning("quantgate: lm-eval's index of %s's folders differs from the full index for %s; "
                    "indexing every task", sorted(names), differing[:3])
        return None
    return manager

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
    names = task_manager(None).all_tasks
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


def leaves(name: str, index: dict[str, Any] | None = None) -> Iterator[LeafConfig]:
    """The leaf tasks under a registered task, group or tag, walking lm-eval's own group definitions in `index`
    (lm-eval's TaskManager.task_index; default the process's task_manager)."""
    from lm_eval.tasks._index import Kind

    index = task_manager([name]).task_index if index is None else index
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
    index = task_manager([check_task_name(name)]).task_index
    entry = index[name]
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


def _compute_config_digest(name: str, index: dict[str, Any] | None = None) -> str:
    import hashlib
    import json

    import lm_eval

    package_root = str(Path(lm_eval.__file__).resolve().parent)
    h = hashlib.sha256()
    for leaf in sorted(leaves(name, index), key=lambda x: x.name):
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

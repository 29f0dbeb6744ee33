"""The evaluation data a matrix needs, what of it is here, and fetching the rest from the Hugging Face Hub.

Two kinds of data:

* **Hub datasets** of the matrix's lm-eval tasks: each leaf task's `dataset_path` and `dataset_name` (and
  `dataset_kwargs.revision`) as lm-eval's own task configs give them (TaskManager index, via
  quantgate.evaluation.task_registry.leaves). One is present when the data folder holds its offline mirror
  (quantgate.evaluation.tasks.offline_data.MIRRORS, files under QUANTGATE_DATA_DIR or shared/data), or when
  the Hugging Face Hub cache holds a snapshot of it (``datasets--<org>--<name>`` under HF_HUB_CACHE, where
  `datasets.load_dataset` puts what it downloads and where lm-eval then finds it). Fetching calls
  `datasets.load_dataset` exactly as lm-eval does, so the cache holds what the task will read.
* **Data-folder files** of calibration (quantgate.checkpoints.obtain.CALIBRATION_FILES) and of the distribution
  text set (quantgate.evaluation.distribution.DATASET_FILES). Result keys fingerprint these exact files, so
  they come only from the offline bundle (shared/data), never from the Hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from quantgate.matrix import Matrix


@dataclass(frozen=True)
class HubDataset:
    """A Hub dataset some tasks read: `hub_id` (lm-eval's dataset_path), `config` (dataset_name) and the
    task config's other `dataset_kwargs` (JSON, so the dataclass stays hashable; `revision` among them)."""

    hub_id: str
    config: str | None = None
    kwargs_json: str = "{}"

    @property
    def kwargs(self) -> dict:
        return json.loads(self.kwargs_json)

    @property
    def revision(self) -> str | None:
        rev = self.kwargs.get("revision")
        return str(rev) if rev else None

    @property
    def label(self) -> str:
        return self.hub_id + (f" ({self.config})" if self.config else "") + (
            f" @ {self.revision}" if self.revision else "")


@dataclass
class DataNeeds:
    """What a matrix reads: Hub datasets (-> the matrix task keys reading each), data-folder files (relative
    path -> what reads it), and leaf tasks that load their data their own way (no dataset_path)."""

    hub: dict[HubDataset, list[str]] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    own_loader: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Presence:
    """Where one need is satisfied here: `where` names the mirror or cache folder; "" when missing."""

    where: str

    @property
    def present(self) -> bool:
        return bool(self.where)


def matrix_needs(matrix: Matrix, leaf_configs: Callable[[str], Iterable[tuple[str, dict]]] | None = None
                 ) -> DataNeeds:
    """The data `matrix` reads. `leaf_configs(task_name)` yields (leaf name, lm-eval config) pairs; the
    default walks lm-eval's TaskManager index (seconds on first use)."""
    if leaf_configs is None:
        from quantgate.evaluation.task_registry import leaves

        def leaf_configs(name: str) -> Iterable[tuple[str, dict]]:
            return ((leaf.name, leaf.config) for leaf in leaves(name))

    from quantgate.checkpoints.obtain import CALIBRATION_FILES
    from quantgate.evaluation.distribution import DATASET_FILES

    needs = DataNeeds()
    for task in matrix.tasks:
        for leaf, config in leaf_configs(task.name):
            path = config.get("dataset_path")
            if not path:
                needs.own_loader.append(leaf)
                continue
            kwargs = json.dumps(config.get("dataset_kwargs") or {}, sort_keys=True, default=str)
            ds = HubDataset(str(path), config.get("dataset_name"), kwargs)
            readers = needs.hub.setdefault(ds, [])
            if task.key not in readers:
                readers.append(task.key)
    for model in matrix.models:
        for v in model.variants:
            if v.builder != "none" and v.source is None:  # built here: its recipe calibrates on local data
                rel = CALIBRATION_FILES[v.calibration.dataset]
                needs.files.setdefault(rel, []).append(f"calibration of {model.name}/{v.name}")
    if matrix.distribution is not None:
        needs.files.setdefault(DATASET_FILES[matrix.distribution.dataset], []).append("distribution metrics")
    return needs


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), as
    huggingface_hub.constants computes it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_presence(ds: HubDataset, data_dir: Path | None, hub_cache: Path) -> Presence:
    """Present as an offline mirror in `data_dir`, else as a snapshot in the Hub cache, else missing."""
    from quantgate.evaluation.tasks.offline_data import MIRRORS

    mirror = MIRRORS.get(ds.hub_id)
    if mirror is not None and mirror.available(data_dir):
        return Presence(f"offline mirror in {data_dir}")
    # huggingface_hub's cache layout: datasets--{org}--{name}/snapshots/<commit>/
    snapshots = hub_cache / ("datasets--" + ds.hub_id.replace("/", "--")) / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return Presence(f"Hub cache {snapshots.parent}")
    return Presence("")


def file_presence(rel: str, data_dir: Path | None) -> Presence:
    if data_dir is not None and (data_dir / rel).is_file():
        return Presence(str(data_dir / rel))
    return Presence("")


def report_lines(needs: DataNeeds, data_dir: Path | None, hub_cache: Path) -> tuple[list[str], list[HubDataset],
                                                                                       list[str]]:
    """The report's lines, the Hub datasets missing, and the data-folder files missing."""
    lines = [f"data folder: {data_dir or '(none: set QUANTGATE_DATA_DIR, or put the offline bundle in shared/data)'}",
             f"Hub cache:   {hub_cache}"]
    missing_hub: list[HubDataset] = []
    missing_files: list[str] = []
    lines.append("Hub datasets of the matrix's lm-eval tasks:")
    for ds, readers in needs.hub.items():
        p = hub_presence(ds, data_dir, hub_cache)
        if not p.present:
            missing_hub.append(ds)
        lines.append(f"  {'present' if p.present else 'MISSING'}  {ds.label}  <- {', '.join(readers)}"
                     + (f"  [{p.where}]" if p.present else ""))
    for leaf in needs.own_loader:
        lines.append(f"  (task {leaf} loads its data itself: no dataset_path to check)")
    if needs.files:
        lines.append("Data-folder files (offline bundle only: results are keyed on these exact files):")
    for rel, readers in needs.files.items():
        p = file_presence(rel, data_dir)
        if not p.present:
            missing_files.append(rel)
        lines.append(f"  {'present' if p.present else 'MISSING'}  {rel}  <- {', '.join(readers)}")
    return lines, missing_hub, missing_files


def hub_unreachable(probe: HubDataset, timeout_s: float = 10.0) -> str | None:
    """None when the Hub answers for `probe`; else why not (offline mode, no network, refused), in words."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(probe.hub_id, revision=probe.revision, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the Hub is reported, not raised
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def fetch(ds: HubDataset) -> None:
    """Download `ds` into the Hub and datasets caches, as lm-eval's ConfigurableTask.download calls it
    (datasets.load_dataset(path=dataset_path, name=dataset_name, **dataset_kwargs))."""
    import datasets

    datasets.load_dataset(path=ds.hub_id, name=ds.config, **ds.kwargs)

"""`quantgate data`: the datasets a matrix needs (from lm-eval's own task configs), which are here (offline
mirror in the data folder, or the Hugging Face Hub cache), and a clear report, without a traceback, when the
Hub cannot be reached. No network: the Hub is never contacted here (HF_HUB_OFFLINE)."""

from __future__ import annotations

import shutil
from pathlib import Path

from quantgate import cli
from quantgate.evaluation import hub_data
from quantgate.evaluation.hub_data import HubDataset

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path("/work/shared/data") if Path("/work/shared/data").is_dir() else ROOT.parent / "shared" / "data"


def _data(tmp_path: Path, *files: str) -> Path:
    """A data folder holding only `files`, copied from the offline bundle (or empty placeholders)."""
    data = tmp_path / "data"
    for rel in files:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        src = SHARED / rel
        if src.is_file():
            shutil.copy(src, data / rel)
        else:
            (data / rel).write_text("")
    data.mkdir(exist_ok=True)
    return data


def test_report_names_what_is_missing_and_what_is_present(tmp_path, monkeypatch, capsys):
    hub_cache = tmp_path / "hub"
    hub_cache.mkdir()
    monkeypatch.setattr(hub_data, "hub_cache_dir", lambda: hub_cache)
    monkeypatch.setenv("QUANTGATE_DATA_DIR", str(_data(tmp_path, "ifeval/input_data.jsonl")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)

    assert cli.main(["data"]) == 1
    out = capsys.readouterr().out
    # the Hub ids are lm-eval 0.4.13's own dataset_path of hellaswag and ifeval
    assert "MISSING  Rowan/hellaswag  <- hellaswag" in out
    assert "present  google/IFEval  <- ifeval  [offline mirror in" in out
    assert "MISSING  wikitext2/wiki.test.raw  <- calibration of smollm2-135m/w8a8-int8" in out
    assert "distribution metrics" in out
    assert "missing 2 Hub dataset(s)" not in out and "missing 1 Hub dataset(s): Rowan/hellaswag" in out

    # --fetch without a reachable Hub: said in words, the same list, exit 1, no traceback
    assert cli.main(["data", "--fetch"]) == 1
    out = capsys.readouterr().out
    assert "cannot fetch: the Hugging Face Hub is not reachable (HF_HUB_OFFLINE is set)" in out
    assert "Traceback" not in out and "missing 1 Hub dataset(s): Rowan/hellaswag" in out

    # a snapshot in the Hub cache (huggingface_hub's layout) counts as present; with the data-folder file too,
    # everything is here
    (hub_cache / "datasets--Rowan--hellaswag" / "snapshots" / "0123abc").mkdir(parents=True)
    monkeypatch.setenv("QUANTGATE_DATA_DIR",
                       str(_data(tmp_path, "ifeval/input_data.jsonl", "wikitext2/wiki.test.raw")))
    assert cli.main(["data"]) == 0
    out = capsys.readouterr().out
    assert "present  Rowan/hellaswag  <- hellaswag  [Hub cache" in out
    assert "all evaluation data the matrix needs is here" in out


def test_needs_follow_the_task_configs(tmp_path):
    """Each leaf's dataset_path, dataset_name and dataset_kwargs; a leaf without dataset_path is named."""
    from quantgate.matrix import load_matrix

    matrix = load_matrix(ROOT / "fixtures" / "demo.yaml")
    configs = {
        "hellaswag": [("hellaswag", {"dataset_path": "Rowan/hellaswag"})],
        "ifeval": [("ifeval", {"dataset_path": "google/IFEval", "dataset_name": "default",
                               "dataset_kwargs": {"revision": "abc123"}}), ("custom", {})],
    }
    needs = hub_data.matrix_needs(matrix, lambda name: configs[name])
    assert list(needs.hub) == [HubDataset("Rowan/hellaswag"),
                               HubDataset("google/IFEval", "default", '{"revision": "abc123"}')]
    assert list(needs.hub.values()) == [["hellaswag"], ["ifeval"]]
    assert HubDataset("google/IFEval", "default", '{"revision": "abc123"}').label == "google/IFEval (default) @ abc123"
    assert needs.own_loader == ["custom"]
    assert set(needs.files) == {"wikitext2/wiki.test.raw"}
    assert hub_data.hub_presence(HubDataset("nobody/nothing"), None, tmp_path).present is False

"""A rerun whose results are all stored imports none of the heavy libraries (issue 14: a warm rerun in seconds).

A child process collects the regression suite and runs it against a results directory holding every result,
keyed by the real runner with the real task-definition digests and data fingerprints (only the checkpoints
and the server are stood in for, as in the fault tests), then reports which of torch, vllm, lm_eval,
transformers and datasets are in its `sys.modules`. No timing: the imports are what a warm rerun must not
pay for, so their absence is asserted, and the time is measured in benchmarks/warm_rerun.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantgate.checkpoints import inspect as inspect_mod
from quantgate.evaluation import task_registry
from quantgate.evaluation.provenance import versions
from quantgate.gates import scipy_memo
from tests.selftest import fault_harness as fh
from tests.selftest.synthetic_store import ROOT

HEAVY = ("torch", "vllm", "lm_eval", "transformers", "datasets")

CHILD = r"""
import json, sys
from pathlib import Path
import pytest
from quantgate.plugin import STASH
from tests.selftest import fault_harness as fh

fh.patch(setattr, Path(sys.argv[1]))  # the same stand-in checkpoints the parent keyed the results with


class Grab:
    events = None

    @pytest.hookimpl(tryfirst=True)  # before the quantgate plugin closes the run
    def pytest_sessionfinish(self, session):
        qs = session.config.stash.get(STASH, None)
        if qs is not None and qs.run is not None:
            ev = qs.run.events
            Grab.events = {"reused": sorted(ev.reused), "evaluated": len(ev.evaluated),
                           "servers_started": len(ev.servers_started), "built": len(ev.built)}


code = pytest.main(sys.argv[2:], plugins=[Grab()])
print("RESULT " + json.dumps({"code": int(code), "events": Grab.events,
                              "heavy": [m for m in HEAVY_NAMES if m in sys.modules],
                              "scipy_stats": "scipy.stats" in sys.modules}))
""".replace("HEAVY_NAMES", repr(HEAVY))


def _rows(task: str, metric: str, n: int = 2) -> list[dict]:
    """Per-item samples in lm-eval's shape (doc_id, the metric), every item correct."""
    value = [True] if task == "ifeval" else 1.0
    return [{"doc_id": i, metric: value, "resps": [["a"]], "filtered_resps": ["a"]} for i in range(n)]


def stored_synthetic_run(tmp_path: Path, setattr) -> tuple[Path, Path, Path]:  # noqa: ANN001 - a setattr
    """A fully stored synthetic run (fault_harness's model, bf16 and w8a8, every task) under tmp_path, every
    result keyed by the real runner; returns (results dir, matrix file, thresholds file). Also used by
    benchmarks/warm_rerun_synthetic.py."""
    fh.patch(setattr, tmp_path)
    results = tmp_path / "results"
    run = fh.make_run(results)
    for variant in ("bf16", "w8a8"):
        vr = run.variant(fh.MODEL, variant)
        kernel = f"kernel-of-{variant}"
        run.server_records.put(vr.server_key(), {"kernel_path": kernel, "log": f"{variant}.log"})
        for task in run.matrix.tasks:
            metric = task.metric_key.split(",")[0]
            run.store.put(fh.MODEL, variant, task.key, vr.eval_key(task, kernel), {"versions": versions()},
                          {task.metric_key: 1.0}, _rows(task.name, metric), None)
    matrix, thresholds = tmp_path / "matrix.yaml", tmp_path / "thresholds.yaml"
    matrix.write_text(yaml.safe_dump(fh.MATRIX))
    thresholds.write_text(yaml.safe_dump(fh.THRESHOLDS))
    return results, matrix, thresholds


def test_a_fully_stored_run_imports_no_heavy_library(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUANTGATE_CACHE", str(cache))
    # The parent computes the task facts (lm-eval's index, built once per process) into this cache, as a
    # cold run does; the child must find them there.
    task_registry.known_names.cache_clear()
    task_registry.task_facts.cache_clear()
    results, matrix, thresholds = stored_synthetic_run(tmp_path, monkeypatch.setattr)

    env = dict(os.environ, QUANTGATE_CACHE=str(cache), QUANTGATE_RESULTS=str(results),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    # The child's rootdir is this checkout (its pyproject.toml), whose tests/__snapshots__ is the project's
    # own: the score-table candidate the suite writes for this synthetic matrix goes under tmp_path instead.
    snapshots = tmp_path / "snapshots"
    project_snapshots = _tree_state(ROOT / "tests" / "__snapshots__")
    argv = [str(ROOT / "src" / "quantgate" / "suite"), "--qg-matrix", str(matrix),
            "--qg-thresholds", str(thresholds), "--qg-snapshots", str(snapshots), "-p", "no:cacheprovider", "-q",
            # the stand-in checkpoints hold no weights to inspect; the inspection's own cache is tested below
            "-k", "not test_checkpoint_structure"]

    def rerun() -> dict:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = json.loads(lines[-1].removeprefix("RESULT "))
        assert out["events"] is not None, proc.stdout[-3000:]
        # every result came from the store: nothing built, served or evaluated
        assert out["events"]["reused"] == [f"{fh.MODEL}/{v}:{t}" for v in ("bf16", "w8a8") for t in fh.TASKS], out
        assert (out["events"]["evaluated"], out["events"]["servers_started"], out["events"]["built"]) == (0, 0, 0)
        assert out["heavy"] == [], f"a warm rerun imported {out['heavy']}"
        # a test never writes into the repository: the candidate is in tmp_path, the project's snapshots untouched
        assert list(snapshots.rglob("test_score_table[[]m[]][[]matrix[]].json.candidate")), proc.stdout[-3000:]
        assert _tree_state(ROOT / "tests" / "__snapshots__") == project_snapshots
        return out

    # The first rerun computes the gates with scipy and keeps scipy's numbers in the results' memo
    # (quantgate.gates.scipy_memo); the next one, with identical inputs, reads them back: no scipy.stats.
    first = rerun()
    assert scipy_memo.memo_path(results).is_file(), first
    again = rerun()
    assert again["scipy_stats"] is False, "a warm rerun with the scipy memo filled imported scipy.stats"
    assert again["code"] == first["code"]


def _tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: relative path -> (size, mtime in ns), to see that nothing wrote there."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_inspection_is_read_back_while_the_checkpoints_are_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))
    ckpt = fh.fake_weights_dir(tmp_path / "ckpt")
    first = inspect_mod.inspect_checkpoint_cached(ckpt, "sha-a", ckpt, "sha-a")
    calls = []
    real = inspect_mod.inspect_checkpoint
    monkeypatch.setattr(inspect_mod, "inspect_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = inspect_mod.inspect_checkpoint_cached(ckpt, "sha-a", ckpt, "sha-a")
    assert calls == [] and again == first
    # another content hash (a rebuilt checkpoint) is inspected again
    inspect_mod.inspect_checkpoint_cached(ckpt, "sha-b", ckpt, "sha-a")
    assert len(calls) == 1


def test_task_facts_are_keyed_by_the_lm_eval_index(tmp_path, monkeypatch):
    """A different lm-eval (another version or edited task files: another index fingerprint) recomputes the
    task facts; the same one reads them back without building lm-eval's index."""
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))
    task_registry.task_facts.cache_clear()
    facts = task_registry.task_facts("hellaswag")
    assert facts["dataset_paths"] == ["Rowan/hellaswag"] and len(facts["config_sha256"]) == 64
    task_registry.task_facts.cache_clear()
    monkeypatch.setattr(task_registry, "leaves", lambda name: pytest.fail("recomputed with the index unchanged"))
    assert task_registry.task_facts("hellaswag") == facts
    task_registry.task_facts.cache_clear()
    monkeypatch.setattr(task_registry, "index_fingerprint", lambda: "another-lm-eval")
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        task_registry.task_facts("hellaswag")
    task_registry.task_facts.cache_clear()

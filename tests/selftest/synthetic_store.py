"""A small stored result set for the CLI's reading commands: real ResultStore entries keyed as the runner keys
them, with synthetic per-item samples (fixed, not canned scores: every score and gate is computed from them),
and the checkpoints stood in for so that a reuse_only Run never builds or serves (as test_merge.py does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantgate import runner as runner_mod
from quantgate.evaluation.provenance import versions
from quantgate.matrix import load_matrix, load_thresholds

ROOT = Path(__file__).resolve().parents[2]
THRESHOLDS = ROOT / "thresholds" / "retention.yaml"
MATRIX = """
models:
  - name: m
    source: {kind: local, path: SOURCE}
    variants:
      - {name: bf16, format: bf16}
      - {name: fp8, format: fp8, builder: llmcompressor, recipe: {scheme: FP8_DYNAMIC}}
      - {name: int8, format: int8, builder: llmcompressor, recipe: {scheme: W8A8}}
tasks:
  - {name: hellaswag, metric: acc_norm, limit: 40, regression: true}
  - {name: gsm8k, metric: "exact_match,strict-match", limit: 40, gate: false}
"""
# per-item correctness of each variant on 40 items (synthetic, fixed)
CORRECT = {"bf16": [1, 1, 0, 1] * 10, "fp8": [1, 1, 0, 1] * 10, "int8": [1, 0, 0, 1] * 10}


def samples(correct: list[int], variant: str, task: str) -> list[dict]:
    """lm-eval-shaped per-item samples: doc_id, the metric, responses (as lmeval_runner reads them)."""
    metric = "acc_norm" if task == "hellaswag" else "exact_match"
    rows = []
    for i, ok in enumerate(correct):
        row = {"doc_id": i, metric: float(ok), "resps": [[f"{variant}-{i}-{ok}"]],
               "filtered_resps": [f"{variant}-{i}-{ok}"]}
        if task == "gsm8k":
            row["filter"] = "strict-match"
        rows.append(row)
    return rows


def stand_in_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's baseline and built checkpoints stood in for by empty folders under tmp_path/ckpt (a config.json
    each, sha `sha-<variant>`): nothing is converted or built."""

    def checkpoint(name: str) -> runner_mod.Checkpoint:
        d = tmp_path / "ckpt" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text("{}")
        return runner_mod.Checkpoint(d, f"sha-{name}", "built")

    monkeypatch.setattr(runner_mod, "baseline_checkpoint", lambda model: checkpoint("bf16"))
    monkeypatch.setattr(runner_mod, "built_checkpoint", lambda model, v, base: checkpoint(v.name))


@pytest.fixture
def make_run(tmp_path, monkeypatch):
    """``make_run(root, reuse_only=True)``: a Run over a results directory with stand-in checkpoints; the matrix
    file is ``tmp_path / "matrix.yaml"``."""

    stand_in_checkpoints(tmp_path, monkeypatch)
    source = tmp_path / "source"  # a local checkpoint folder that `quantgate check` finds; never loaded
    source.mkdir(exist_ok=True)
    (source / "config.json").write_text("{}")
    (tmp_path / "matrix.yaml").write_text(MATRIX.replace("SOURCE", str(source)))
    matrix = load_matrix(tmp_path / "matrix.yaml")
    thresholds = load_thresholds(THRESHOLDS)

    def make(root: Path, reuse_only: bool = True) -> runner_mod.Run:
        return runner_mod.Run(matrix, thresholds, root, reuse_only=reuse_only)

    return make


def write_store(run: runner_mod.Run, correct: dict[str, list[int]] | None = None) -> Path:
    """Store every task of every variant in `correct` (default CORRECT) as the runner keys them."""
    correct = correct or CORRECT
    for name, items in correct.items():
        vr = run.variant("m", name)
        kernel = f"kernel-of-{name}"
        run.server_records.put(vr.server_key(), {"kernel_path": kernel, "log": f"{name}.log"})
        for task in run.matrix.tasks:
            rows = samples(items, name, task.name)
            mean = sum(items) / len(items)
            run.store.put("m", name, task.name, vr.eval_key(task, kernel), {"versions": versions()},
                          {task.metric_key: mean}, rows, None)
    return run.store.root

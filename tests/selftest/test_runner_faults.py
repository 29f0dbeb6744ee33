"""Fault injection on the run: a variant whose build fails fails at once on every later use with the same
cause (no second build), and the other variants are unaffected."""

from pathlib import Path

import pytest

from quantgate import runner as runner_mod
from quantgate.errors import BuildError
from quantgate.matrix import load_matrix, load_thresholds

ROOT = Path(__file__).resolve().parents[2]


def test_failed_build_is_remembered_and_isolated(tmp_path, monkeypatch):
    calls = []

    def failing_build(model, variant, base):
        calls.append(variant.name)
        raise BuildError(f"variant {variant.name}: exported checkpoint rejected")

    def fine_baseline(model):
        return runner_mod.Checkpoint(tmp_path, "sha", "converted")

    monkeypatch.setattr(runner_mod, "built_checkpoint", failing_build)
    monkeypatch.setattr(runner_mod, "baseline_checkpoint", fine_baseline)
    run = runner_mod.Run(load_matrix(ROOT / "fixtures" / "demo.yaml"),
                         load_thresholds(ROOT / "thresholds" / "retention.yaml"), tmp_path)
    bad = run.variant("smollm2-135m", "w8a8-int8")
    for _ in range(3):
        with pytest.raises(BuildError, match="w8a8-int8: exported checkpoint rejected"):
            bad.checkpoint()
    assert calls == ["w8a8-int8"], "a failed build must not be retried by every test"
    assert run.variant("smollm2-135m", "bf16").checkpoint().sha256 == "sha"


def test_baseline_built_inside_a_variant_call_counts_its_time_once(tmp_path, monkeypatch):
    clock = [0.0]

    def took(seconds, result):  # noqa: ANN001, ANN202
        clock[0] += seconds
        return result

    monkeypatch.setattr(runner_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runner_mod, "baseline_checkpoint",
                        lambda model: took(100.0, runner_mod.Checkpoint(tmp_path, "base", "converted")))
    monkeypatch.setattr(runner_mod, "built_checkpoint",
                        lambda model, variant, base: took(30.0, runner_mod.Checkpoint(tmp_path, "q", "built")))
    run = runner_mod.Run(load_matrix(ROOT / "fixtures" / "demo.yaml"),
                         load_thresholds(ROOT / "thresholds" / "retention.yaml"), tmp_path)
    run.variant("smollm2-135m", "w8a8-int8").checkpoint()  # builds the baseline first, inside this call
    assert run.events.seconds["build"] == 130.0  # 100 s baseline + 30 s variant, not 230
    run.variant("smollm2-135m", "bf16").checkpoint()  # already obtained: no time added
    assert run.events.seconds["build"] == 130.0


def test_a_failed_evaluation_is_not_retried_in_the_same_run(tmp_path, monkeypatch):
    """A task whose evaluation failed (here lm-eval; in the wild a CPU engine killed by seeded sampling) fails
    every later test of that task at once with the first error, instead of restarting the server and failing
    the same way after minutes; the variant's other tasks are still evaluated."""
    from quantgate.errors import EvaluationError

    calls = []

    class FakeServer:
        completions_url, api_key = "http://127.0.0.1:1/v1/completions", "k"
        startup_seconds, log_path = 1.0, None

        def log_text(self):
            return ""

        def check_alive(self, when):
            return None

        def check_serving(self, when):
            return None

    def fake_run_task(*, task, **kwargs):
        calls.append(task.key)
        if task.key == "ifeval":
            raise EvaluationError("lm-eval failed on task ifeval (ifeval): ServerDisconnectedError")
        return {"acc_norm,none": 0.4}, [{"doc_id": 0, "acc_norm": 1.0}], {}

    monkeypatch.setattr(runner_mod, "run_task", fake_run_task)
    monkeypatch.setattr(runner_mod.VariantRun, "support",
                        property(lambda self: runner_mod.Support("vllm", None)))
    monkeypatch.setattr(runner_mod.VariantRun, "ensure_server", lambda self: FakeServer())
    monkeypatch.setattr(runner_mod.VariantRun, "eval_key", lambda self, task, kernel: {"task": task.key})
    monkeypatch.setattr(runner_mod.VariantRun, "served_checkpoint",
                        lambda self: runner_mod.Checkpoint(tmp_path, "sha", "converted"))
    monkeypatch.setattr(runner_mod.VariantRun, "checkpoint",
                        lambda self: runner_mod.Checkpoint(tmp_path, "sha", "converted"))
    run = runner_mod.Run(load_matrix(ROOT / "fixtures" / "demo.yaml"),
                         load_thresholds(ROOT / "thresholds" / "retention.yaml"), tmp_path)
    bf16 = run.variant("smollm2-135m", "bf16")
    ifeval, hellaswag = run.task("ifeval"), run.task("hellaswag")
    with pytest.raises(EvaluationError, match="ServerDisconnectedError"):
        bf16.results([ifeval])
    for _ in range(2):
        with pytest.raises(EvaluationError, match="task ifeval failed earlier in this run, not retried"):
            bf16.results([ifeval])
    assert bf16.results([hellaswag])["hellaswag"].reused is False
    assert calls == ["ifeval", "hellaswag"]

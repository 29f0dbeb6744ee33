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

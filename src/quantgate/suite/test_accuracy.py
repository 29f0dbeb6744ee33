"""Accuracy gates of the regression suite: paired retention against BF16, and regression against the last
accepted run. Each gate's message carries the numbers needed to decide (n, estimate, interval, floor, mdd, the
n that resolves it, flips) and, for regressions, the items that flipped with both answers. `qg_judge` gives
each gate its tier from thresholds/policy.yaml and ends the test as the policy says for its outcome (PASS,
FAIL, INCONCLUSIVE, NOT GATED) at this cadence (--qg-cadence)."""

import pytest

from quantgate import verdicts
from quantgate.engines.kernel_table import derived_expectation
from quantgate.engines.kernels import kernel_mismatch
from quantgate.suite._support import runnable


def test_accuracy_retention(qg_run, qg_variant, qg_task, qg_judge):
    model, variant = qg_variant
    runnable(qg_run, model, variant)
    verdict = verdicts.retention_verdict(qg_run, model, variant, qg_task)
    qg_judge(f"retention[{qg_task}]", f"{model}/{variant}", verdict)


def test_accuracy_retention_average(qg_run, qg_variant, qg_judge):
    model, variant = qg_variant
    runnable(qg_run, model, variant)
    verdict = verdicts.average_retention_verdict(qg_run, model, variant)
    qg_judge("retention[AVG]", f"{model}/{variant}", verdict)


def test_regression_vs_accepted(qg_session, qg_run, qg_any_variant, qg_regression_task, qg_judge):
    model, variant = qg_any_variant
    runnable(qg_run, model, variant)
    if qg_session.accept:
        path = verdicts.accept(qg_run, model, variant, qg_regression_task)
        print(f"accepted: {path}")
    verdict = verdicts.regression_verdict(qg_run, model, variant, qg_regression_task)
    if verdict is None:
        pytest.skip(
            f"no accepted run for {model}/{variant}/{qg_regression_task}: "
            f"record one with `pytest --qg-accept` or `quantgate accept`"
        )
    qg_judge(f"regression[{qg_regression_task}]", f"{model}/{variant}", verdict)


def test_kernel_path(qg_run, qg_any_variant):
    """The kernel vLLM logged is recorded with every result and matches what the variant expects here."""
    model, variant = qg_any_variant
    vr = runnable(qg_run, model, variant)
    results = verdicts.variant_results(qg_run, model, variant)
    observed = {r.kernel_path for r in results.values()}
    assert len(observed) == 1, f"results of one variant ran on different kernels: {observed}"
    kernel = observed.pop()
    engines = {r.engine for r in results.values()}
    assert engines == {vr.support.engine}, (
        f"results from engine {engines}, this hardware uses {vr.support.engine}"
    )
    here = qg_run.hw.keys[0]
    expected = qg_run.hw.lookup(vr.variant.expected_kernels)
    if expected is None and vr.support.engine == "vllm":
        # nothing declared for this GPU: what vLLM's own selection code says it picks (docs/kernels.md)
        v = vr.variant
        expected = derived_expectation(v.format, v.builder, v.recipe_spec, qg_run.hw.hw_class)
    if expected is None:
        pytest.skip(f"no expected kernel declared for {' or '.join(qg_run.hw.keys)} and none derived; "
                    f"observed {kernel!r}")
    problem = kernel_mismatch(expected, kernel, vr.support.engine)
    if problem and vr.support.engine == "emulated":
        problem += f" ({vr.support.reason}); declare `{here}: emulated` if that is intended"
    assert problem is None, f"{model}/{variant} on {here}: {problem}"

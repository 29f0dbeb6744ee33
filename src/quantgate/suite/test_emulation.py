"""Emulation against real kernels (seed 003's fake-quant vs real INT8 comparison, as a test): the same
checkpoint evaluated by weight-only emulation and by vLLM's real kernel must agree within noise. A gap the
paired interval resolves is a kernel or export bug worth failing on."""

import pytest

from quantgate import verdicts
from quantgate.gates.stats import format_interval
from quantgate.suite._support import runnable


def test_emulation_matches_real_kernels(qg_run, qg_variant):
    model, variant = qg_variant
    vr = runnable(qg_run, model, variant)
    if vr.variant.compare_to is None:
        pytest.skip("variant declares no compare_to twin")
    twin = runnable(qg_run, model, vr.variant.compare_to)
    if twin.support.engine != "vllm":
        pytest.skip(f"{model}/{vr.variant.compare_to} is itself {twin.support.engine} on {qg_run.hw.keys[0]} "
                    f"({twin.support.reason}): there is no real kernel here to compare the emulation with")
    agreement = verdicts.emulation_agreement(qg_run, model, variant)
    lines = [f"{model}/{variant} (emulated) vs {vr.variant.compare_to} (real kernels), ratio emulated/real:"]
    for task, est in agreement.items():
        lines.append(f"  {task:10} {format_interval(est)}  flips {est.flips_down} down / {est.flips_up} up "
                     f"of n = {est.n}, McNemar p = {est.mcnemar_p:.3g}")
    message = "\n".join(lines)
    print(message)
    disagree = [t for t, est in agreement.items() if not est.low <= 1.0 <= est.high]
    assert not disagree, f"emulation and real kernels disagree beyond noise on {disagree}\n{message}"

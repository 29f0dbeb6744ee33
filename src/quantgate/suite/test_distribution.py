"""Distribution gates of the regression suite: each variant's teacher-forced next-token distributions on the
matrix's text set against its BF16 baseline's (mean KL, top-1 agreement; limits per format in
thresholds/distribution.yaml). Each gate's message carries the interval over documents, the limit and where it
comes from, and the n that would resolve it; `qg_judge` gives it its tier (gate names `kl`, `top1_agreement`,
`delta_logp` in thresholds/policy.yaml) and ends the test as the policy says for its outcome."""

from pathlib import Path

import pytest

from quantgate.evaluation.distribution import compare
from quantgate.gates.distribution import LIMITS, distribution_gate
from quantgate.matrix import load_distribution_thresholds
from quantgate.suite._support import runnable


@pytest.fixture(scope="session")
def qg_distribution_limits(qg_session):
    """thresholds/distribution.yaml, beside the retention thresholds in use."""
    path = Path(qg_session.thresholds_path).parent / "distribution.yaml"
    if not path.exists():
        pytest.skip(f"no distribution limits at {path}")
    return load_distribution_thresholds(path)


@pytest.mark.parametrize("qg_distribution_limit", list(LIMITS))
def test_distribution_vs_bf16(qg_run, qg_variant, qg_distribution_limit, qg_distribution_limits, qg_judge):
    model, variant = qg_variant
    vr = runnable(qg_run, model, variant)
    settings = qg_run.matrix.distribution
    if settings is None or not settings.gate:
        pytest.skip("the matrix has no gated `distribution:` section")
    limits = qg_distribution_limits.limits(vr.variant.format)
    limit = getattr(limits, qg_distribution_limit)
    if limit is None:
        pytest.skip(f"thresholds/distribution.yaml sets no {qg_distribution_limit} for {vr.variant.format}")
    comparison = compare(qg_run, model, variant, level=qg_distribution_limits.level)
    verdict = distribution_gate(
        comparison.summaries, qg_distribution_limit, limit, label=f"{model}/{variant}", source=limits.source
    )
    qg_judge(verdict.gate_name, f"{model}/{variant}", verdict)

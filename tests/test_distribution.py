"""Distribution gates of the regression suite: each variant's teacher-forced next-token distributions on the
matrix's text set against its BF16 baseline's (mean KL, top-1 agreement; thresholds/distribution.yaml). The
failure message carries the interval over documents, the limit and where it comes from, and the n that would
resolve an inconclusive gate."""

from pathlib import Path

import pytest

from quantgate.evaluation.distribution import compare
from quantgate.gates.distribution import distribution_verdicts
from quantgate.matrix import load_distribution_thresholds
from tests._support import runnable


@pytest.fixture(scope="session")
def qg_distribution_limits(qg_session):
    """thresholds/distribution.yaml, beside the retention thresholds in use."""
    path = Path(qg_session.thresholds_path).parent / "distribution.yaml"
    if not path.exists():
        pytest.skip(f"no distribution limits at {path}")
    return load_distribution_thresholds(path)


def test_distribution_vs_bf16(qg_run, qg_variant, qg_distribution_limits):
    model, variant = qg_variant
    vr = runnable(qg_run, model, variant)
    settings = qg_run.matrix.distribution
    if settings is None or not settings.gate:
        pytest.skip("the matrix has no gated `distribution:` section")
    comparison = compare(qg_run, model, variant, level=qg_distribution_limits.level)
    verdicts = distribution_verdicts(
        comparison.summaries, qg_distribution_limits.limits(vr.variant.format), label=f"{model}/{variant}"
    )
    assert verdicts, f"thresholds/distribution.yaml sets no limit for {vr.variant.format}"
    for v in verdicts:
        print(v.message())
    failed = [v for v in verdicts if v.status == "fail"]
    assert not failed, "\n".join(v.message() for v in failed)
    for v in verdicts:
        v.raise_for_status()  # an inconclusive gate raises InconclusiveError: not a pass

"""Small helpers shared by the regression suite's test modules."""

import pytest

from quantgate.runner import Run


def runnable(run: Run, model: str, variant: str):
    """The VariantRun, or a skip naming why this hardware cannot run the variant at all."""
    vr = run.variant(model, variant)
    if vr.support.engine is None:
        pytest.skip(vr.support.reason)
    return vr

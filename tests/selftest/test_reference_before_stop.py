"""The BF16 baseline's distribution reference is scored before its server stops, when a later distribution test
of its model needs it (plugin._score_reference_before_stopping): otherwise the first such test restarts the
baseline's server, and then its own variant's."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

THRESHOLDS = Path(__file__).resolve().parents[2] / "thresholds" / "retention.yaml"

MATRIX = """
models:
  - name: m
    source: {kind: local, path: /nonexistent}
    variants:
      - {name: bf16, format: bf16}
      - {name: q, format: int8, builder: llmcompressor, recipe: {scheme: W8A8}}
tasks:
  - {name: hellaswag, metric: acc_norm}
"""

# Stand-ins: a "server" object that records its stop, and distribution_result recording what it was asked for
# and whether the baseline's server was still up then.
TESTS = """
import quantgate.evaluation.distribution as distribution

EVENTS = []

class Live:
    def __init__(self, label):
        self.label = label
    def stop(self):
        EVENTS.append(("stop", self.label))

def recorded(run, model, variant, stored_only=False):
    EVENTS.append(("reference", f"{model}/{variant}", run.variant(model, variant).server is not None))

distribution.distribution_result = recorded

def test_accuracy(qg_run, qg_any_variant):
    model, variant = qg_any_variant
    qg_run.variant(model, variant).server = Live(f"{model}/{variant}")

DISTRIBUTION_TEST

def test_zz_events():
    assert EVENTS == EXPECTED, EVENTS
"""


def _run(pytester: pytest.Pytester, distribution: bool, with_test: bool, expected: list) -> pytest.RunResult:
    matrix = MATRIX + ("distribution: {dataset: wikitext2, documents: 2, tokens: 16}\n" if distribution else "")
    pytester.makefile(".yaml", matrix=textwrap.dedent(matrix))
    (pytester.path / "retention.yaml").write_text(THRESHOLDS.read_text())
    dist_test = "def test_distribution_vs_bf16(qg_variant):\n    pass\n" if with_test else ""
    pytester.makepyfile(test_reference_suite=TESTS.replace("DISTRIBUTION_TEST", dist_test)
                        .replace("EXPECTED", repr(expected)))
    return pytester.runpytest("--qg-matrix", "matrix.yaml", "--qg-thresholds", "retention.yaml",
                              "-p", "no:cacheprovider", "-p", "no:randomly")


def test_the_reference_is_scored_while_the_baseline_is_served(pytester: pytest.Pytester) -> None:
    result = _run(pytester, True, True, [("reference", "m/bf16", True), ("stop", "m/bf16"), ("stop", "m/q")])
    result.assert_outcomes(passed=4)


@pytest.mark.parametrize(("distribution", "with_test"), [(False, True), (True, False)])
def test_nothing_is_scored_when_no_distribution_test_follows(pytester: pytest.Pytester, distribution: bool,
                                                             with_test: bool) -> None:
    result = _run(pytester, distribution, with_test, [("stop", "m/bf16"), ("stop", "m/q")])
    result.assert_outcomes(passed=4 if with_test else 3)

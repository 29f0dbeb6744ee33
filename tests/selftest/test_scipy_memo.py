"""The scipy memo (quantgate.gates.scipy_memo): the same inputs read back, other inputs recomputed, a corrupt
file ignored with a warning. No timing: what a warm rerun saves is measured in benchmarks/warm_rerun.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from quantgate.gates import scipy_memo
from quantgate.gates.distribution import mean_interval
from quantgate.gates.retention import retention_gate
from quantgate.gates.stats import _z, paired_retention, tang_interval


@pytest.fixture
def memo(tmp_path):
    path = scipy_memo.memo_path(tmp_path)
    scipy_memo.use(path)
    _z.cache_clear()  # the level's z is also kept per process; the memo must see its first call
    yield path
    scipy_memo.use(None)
    _z.cache_clear()


@pytest.fixture
def calls(monkeypatch):
    """Names of the scipy computations that really ran (not read back from the memo)."""
    ran: list[str] = []
    real = scipy_memo.memoized

    def counting(name, compute, *args):  # noqa: ANN001, ANN202
        def counted(*a):  # noqa: ANN202
            ran.append(name)
            return compute(*a)

        return real(name, counted, *args)

    monkeypatch.setattr(scipy_memo, "memoized", counting)
    return ran


def _pairs(flips: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    base = np.array([1.0] * (n // 2) + [0.0] * (n - n // 2))
    var = base.copy()
    var[:flips] = 0.0  # the variant loses `flips` items the base got right
    return base, var


def test_identical_inputs_reuse_the_stored_result(memo, calls):
    first = tang_interval(90, 3, 8, 200, 0.95)
    assert calls == ["tang_interval", "norm.ppf"] and memo.is_file()
    calls.clear()
    scipy_memo.use(memo)  # a new process: the entries are read back from the file
    assert tang_interval(90, 3, 8, 200, 0.95) == first
    assert calls == []


def test_a_changed_input_or_level_is_recomputed(memo, calls):
    base, var = _pairs(4)
    est = paired_retention(base, var, level=0.95)
    calls.clear()
    other = paired_retention(*_pairs(9), level=0.95)  # other items: another Tang interval
    assert "tang_interval" in calls and other.low != est.low
    calls.clear()
    wider = paired_retention(base, var, level=0.99)  # the gate's level is an input too
    assert "tang_interval" in calls and "norm.ppf" in calls and wider.low < est.low
    calls.clear()
    assert paired_retention(base, var, level=0.95) == est and calls == []


def test_a_changed_threshold_changes_the_verdict_with_the_memo_in_use(memo):
    base, var = _pairs(4)
    est = paired_retention(base, var, level=0.95)
    # The memo keeps scipy's numbers, not decisions: another floor on the same estimate decides again.
    mode = "no-evidence-of-loss"
    assert retention_gate(est, 0.80, mode).outcome != retention_gate(est, 0.99, mode).outcome


def test_memoized_numbers_equal_scipy_exactly(memo):
    x = np.array([0.1, 0.4, 0.25, 0.3, 0.05])
    direct = stats.ttest_1samp(x, popmean=0.0).confidence_interval(confidence_level=0.9)
    for _ in range(2):  # computed, then read back
        assert mean_interval(x, 0.9) == (float(x.mean()), float(direct.low), float(direct.high))
        assert scipy_memo.norm_ppf(0.975) == float(stats.norm.ppf(0.975))
        assert scipy_memo.binomtest_pvalue(7, 10, 0.5, "greater") == stats.binomtest(7, 10, 0.5, "greater").pvalue
        assert scipy_memo.binom_cdf(3, 10, 0.5) == float(stats.binom.cdf(3, 10, 0.5))
    # NaN and infinities survive the file (exact hex form)
    low, high = scipy_memo.memoized("test.nan", lambda: (math.nan, math.inf))
    assert math.isnan(low) and high == math.inf
    scipy_memo.use(memo)
    low, high = scipy_memo.memoized("test.nan", lambda: pytest.fail("recomputed"))
    assert math.isnan(low) and high == math.inf


def test_the_code_version_is_part_of_the_key(memo, calls, monkeypatch):
    tang_interval(90, 3, 8, 200, 0.95)
    calls.clear()
    monkeypatch.setattr(scipy_memo, "_code_version", "another scipy or another quantgate.gates.stats")
    _z.cache_clear()
    tang_interval(90, 3, 8, 200, 0.95)
    assert calls == ["tang_interval", "norm.ppf"]


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"entries": 3}', 'MALFORMED'])
def test_a_corrupt_memo_is_ignored_with_a_warning(memo, calls, content):
    expected = tang_interval(90, 3, 8, 200, 0.95)
    if content == "MALFORMED":  # well-formed file, entries that are not floats
        content = json.dumps({"entries": {k: 1 for k in json.loads(memo.read_text())["entries"]}})
    memo.write_text(content)
    calls.clear()
    scipy_memo.use(memo)
    with pytest.warns(scipy_memo.MemoWarning):
        assert tang_interval(90, 3, 8, 200, 0.95) == expected
    assert "tang_interval" in calls
    # rewritten whole at the new entry: the next process reads it back without a warning
    scipy_memo.use(memo)
    calls.clear()
    assert tang_interval(90, 3, 8, 200, 0.95) == expected and calls == []


def test_entries_of_another_process_are_merged_not_lost(memo):
    scipy_memo.norm_ppf(0.9)
    other = scipy_memo._Memo(memo)  # a second xdist worker that read the file before the first wrote it
    other._entries = {}
    scipy_memo.use(memo)
    scipy_memo.norm_ppf(0.8)
    other.put("k" * 64, (1.0).hex())
    held = json.loads(memo.read_text())["entries"]
    assert len(held) == 3 and held["k" * 64] == (1.0).hex()


def test_without_a_memo_in_use_nothing_is_stored(tmp_path, calls):
    scipy_memo.use(None)
    tang_interval(90, 3, 8, 200, 0.95)
    tang_interval(90, 3, 8, 200, 0.95)
    assert calls.count("tang_interval") == 2 and not any(tmp_path.iterdir())

"""Unit tests of the gates' pure logic: paired statistics, retention and regression gates, messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from quantgate.errors import InsufficientSampleError, QuantgateError
from quantgate.gates import stats as qs
from quantgate.gates.outcome import Outcome
from quantgate.gates.regression import ItemMismatchError, regression_gate
from quantgate.gates.retention import GateVerdict, retention_gate
from quantgate.gates.stats import (
    MIN_BOOTSTRAP_N,
    PairedEstimate,
    format_interval,
    format_value_interval,
    lossless_interval,
    paired_change,
    paired_retention,
    paired_retention_average,
    required_n,
    resolvable_floor,
    tang_interval,
)

Z95 = float(stats.norm.ppf(0.975))


def table(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired 0/1 arrays: n11 both right, n10 base right & variant wrong, n01 the reverse, n00 both wrong."""
    counts = [n11, n10, n01, n00]
    return np.repeat([1.0, 1.0, 0.0, 0.0], counts), np.repeat([1.0, 0.0, 1.0, 0.0], counts)


def estimate(est: float, low: float, high: float, n: int = 10_000, **kw) -> PairedEstimate:
    fields = dict(
        estimate=est,
        low=low,
        high=high,
        level=0.95,
        n=n,
        base_mean=0.7,
        variant_mean=0.7 * est,
        flips_down=120,
        flips_up=40,
        mcnemar_p=1e-4,
        method="score",
        discordance=0.1,
    )
    fields.update(kw)
    return PairedEstimate(**fields)


# ------------------------------------------------------------------------------------------ retention


class TestPairedRetentionBinary:
    def test_counts_means_and_estimate(self):
        base, variant = table(50, 12, 4, 34)
        e = paired_retention(base, variant)
        assert (e.n, e.flips_down, e.flips_up) == (100, 12, 4)
        assert e.base_mean == pytest.approx(0.62) and e.variant_mean == pytest.approx(0.54)
        assert e.estimate == pytest.approx(54 / 62)
        assert e.method == "score" and e.binary and e.defined and e.note == ""
        assert e.discordance == pytest.approx(0.16)
        assert e.low < e.estimate < e.high

    def test_mcnemar_p_is_the_exact_binomial_test_on_discordant_pairs(self):
        for down, up in [(12, 4), (0, 7), (30, 30), (1, 0), (0, 0), (100, 61)]:
            e = paired_retention(*table(40, down, up, 40))
            expected = 1.0 if down + up == 0 else stats.binomtest(down, down + up, 0.5).pvalue
            assert e.mcnemar_p == pytest.approx(expected, rel=1e-12)

    def test_item_order_does_not_matter_only_pairing(self):
        base, variant = table(50, 12, 4, 34)
        perm = np.random.default_rng(0).permutation(base.size)
        a, b = paired_retention(base, variant), paired_retention(base[perm], variant[perm])
        assert (a.estimate, a.low, a.high) == (b.estimate, b.low, b.high)

    def test_pairing_narrows_the_interval_compared_with_unpaired_runs(self):
        # Same accuracies, but the variant agrees with the base on every item but 10: a narrow interval.
        paired = paired_retention(*table(600, 10, 0, 390))
        # Same marginals with maximal disagreement: a much wider one.
        shuffled = paired_retention(*table(210, 390, 380, 20))
        assert paired.half_width < shuffled.half_width / 3

    def test_lower_is_better_uses_base_over_variant(self):
        # 1 = error. Base errs on 30 items, the variant on 36: retention 30/36.
        base, variant = table(20, 10, 16, 54)
        e = paired_retention(base, variant, higher_is_better=False)
        assert e.estimate == pytest.approx(30 / 36)
        assert (e.flips_down, e.flips_up) == (16, 10)  # variant worse = it errs where the base did not
        assert e.low < e.estimate < e.high

    def test_zero_base_score_is_undefined_not_an_exception(self):
        e = paired_retention(np.zeros(20), np.zeros(20))
        assert not e.defined and math.isnan(e.estimate) and math.isnan(e.low)
        assert "undefined" in e.note and "n = 20" in e.note
        assert e.required_n(0.95) is None

    def test_no_items_is_undefined(self):
        e = paired_retention([], [])
        assert not e.defined and e.n == 0 and "no items" in e.note

    def test_identical_answers_are_not_infinitely_precise(self):
        base, variant = table(7, 0, 0, 3)
        e = paired_retention(base, variant)
        assert e.estimate == 1.0
        # Tang's bound with no flips is Wilson-like: n11 / (n11 + z^2) and 1 + z^2 / n11.
        assert e.low == pytest.approx(7 / (7 + Z95**2), rel=1e-9)
        assert e.high == pytest.approx(1 + Z95**2 / 7, rel=1e-9)
        assert e.required_n(0.95) > 10

    def test_variant_all_wrong_gives_zero_lower_bound(self):
        e = paired_retention(*table(0, 30, 0, 70))
        assert e.estimate == 0 and e.low == 0 and 0 < e.high < 0.2

    def test_bool_inputs_and_lists_are_accepted(self):
        e = paired_retention([True, True, False, True], [True, False, False, True])
        assert e.estimate == pytest.approx(2 / 3) and e.method == "score"

    def test_higher_level_gives_wider_interval(self):
        base, variant = table(500, 40, 20, 440)
        e90 = paired_retention(base, variant, level=0.90)
        e99 = paired_retention(base, variant, level=0.99)
        assert e99.low < e90.low and e99.high > e90.high

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(base=[1, 0], variant=[1]), "same items"),
            (dict(base=[1, float("nan")], variant=[1, 1]), "non-finite"),
            (dict(base=[[1, 0]], variant=[[1, 0]]), "1-d"),
            (dict(base=[1, 0], variant=[1, 0], level=1.0), "level"),
            (dict(base=[1, 0], variant=[1, 0], level=0.3), "level"),
            (dict(base=[1, 0], variant=[1, 0], method="exact"), "method"),
            (dict(base=[0.5, 0.2], variant=[0.4, 0.1], method="score"), "0/1"),
            (dict(base=[1, 0], variant=[1, 0], aggregate="median"), "aggregate"),
            (
                dict(base=[-1.0, -2.0], variant=[-1.0, -2.0], aggregate="perplexity", higher_is_better=False),
                "needs weights",
            ),
            (dict(base=[-1.0], variant=[-1.0], weights=[2.0], aggregate="perplexity"), "lower-is-better"),
            (dict(base=[1, 0], variant=[1, 0], weights=[1.0, 0.0]), "positive"),
            (dict(base=[1, 0], variant=[1, 0], weights=[1.0]), "one value per item"),
            (dict(base=[0.5, 0.2], variant=[0.4, 0.1], n_boot=10), "n_boot"),
        ],
    )
    def test_invalid_inputs_raise_value_error(self, kwargs, match):
        base, variant = kwargs.pop("base"), kwargs.pop("variant")
        with pytest.raises(ValueError, match=match):
            paired_retention(base, variant, **kwargs)


class TestTangInterval:
    def test_constrained_mle_matches_a_numerical_optimiser(self):
        # The closed-form p21 under H0 must be the maximiser of the multinomial likelihood.
        n11, n12, n21, n22 = 59, 6, 16, 80
        n = n11 + n12 + n21 + n22
        for phi in (0.75, 0.9, 1.1):

            def nll(p, phi=phi):
                p22 = 1 - p.sum()
                if np.any(p <= 0) or p22 <= 0:
                    return 1e10
                return -(n11 * np.log(p[0]) + n12 * np.log(p[1]) + n21 * np.log(p[2]) + n22 * np.log(p22))

            cons = {"type": "eq", "fun": lambda p, phi=phi: p[0] + p[1] - phi * (p[0] + p[2])}
            res = optimize.minimize(
                nll, [0.35, 0.05, 0.1], constraints=[cons], method="SLSQP", options={"ftol": 1e-14}
            )
            p11, p12, p21 = res.x
            # Score variance of n1+ - phi n+1 at the constrained MLE vs the closed form inside the statistic.
            var = n * (p11 * (1 - phi) ** 2 + p12 + phi**2 * p21)
            t = (n11 + n12 - phi * (n11 + n21)) / math.sqrt(var)
            assert qs._tang_statistic(phi, n11, n12, n21, n) == pytest.approx(t, rel=1e-5)

    def test_known_table(self):
        # Cavo et al. (2012) table from Fagerland, Lydersen & Laake, ch. 8: estimate 65/75.
        low, high = tang_interval(59, 6, 16, 161)
        assert (round(low, 4), round(high, 4)) == (0.7476, 0.9876)

    def test_bounds_solve_the_score_equation(self):
        low, high = tang_interval(300, 20, 45, 600, level=0.9)
        z = float(stats.norm.ppf(0.95))
        assert qs._tang_statistic(low, 300, 20, 45, 600) == pytest.approx(z, abs=1e-6)
        assert qs._tang_statistic(high, 300, 20, 45, 600) == pytest.approx(-z, abs=1e-6)

    def test_undefined_denominator_raises(self):
        with pytest.raises(ValueError, match="undefined"):
            tang_interval(0, 5, 0, 10)


class TestBootstrap:
    def test_continuous_values_use_the_bootstrap_deterministically(self):
        rng = np.random.default_rng(0)
        base = rng.uniform(0.2, 1.0, 400)
        variant = base * rng.normal(0.97, 0.05, 400)
        a = paired_retention(base, variant, seed=3)
        b = paired_retention(base, variant, seed=3)
        c = paired_retention(base, variant, seed=4)
        assert a.method == "bootstrap" and not a.binary
        assert a == b
        assert (a.low, a.high) != (c.low, c.high)
        assert a.low < a.estimate < a.high
        assert a.estimate == pytest.approx(variant.sum() / base.sum())
        assert a.item_var > 0

    def test_bootstrap_agrees_with_the_score_interval_on_large_binary_samples(self):
        base, variant = table(1500, 150, 60, 1290)
        score = paired_retention(base, variant)
        boot = paired_retention(base, variant, method="bootstrap", n_boot=4000)
        assert boot.estimate == score.estimate
        assert boot.low == pytest.approx(score.low, abs=0.006)
        assert boot.high == pytest.approx(score.high, abs=0.006)

    def test_perplexity_is_a_ratio_of_sums_and_lower_is_better(self):
        rng = np.random.default_rng(1)
        w = rng.integers(50, 300, 200).astype(float)
        base = -2.0 * w + rng.normal(0, 5, 200)
        variant = base - 0.05 * w
        e = paired_retention(base, variant, weights=w, aggregate="perplexity", higher_is_better=False)
        ppl_b, ppl_v = math.exp(-base.sum() / w.sum()), math.exp(-variant.sum() / w.sum())
        assert e.base_mean == pytest.approx(ppl_b) and e.variant_mean == pytest.approx(ppl_v)
        assert e.estimate == pytest.approx(ppl_b / ppl_v) and e.estimate == pytest.approx(math.exp(-0.05))
        # Every document lost log-likelihood: all flips are "worse", and the interval is tight.
        assert (e.flips_down, e.flips_up) == (200, 0)
        assert e.low <= e.estimate <= e.high and e.high - e.low < 1e-9

    def test_weights_cancel_in_a_mean_retention(self):
        rng = np.random.default_rng(2)
        w = rng.uniform(1, 5, 100)
        base, variant = rng.uniform(1, 2, 100) * w, rng.uniform(1, 2, 100) * w
        e = paired_retention(base, variant, weights=w)
        assert e.estimate == pytest.approx(variant.sum() / base.sum())
        assert e.base_mean == pytest.approx(base.sum() / w.sum())

    def test_continuous_flips_and_sign_test(self):
        base = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
        variant = np.array([0.5, 2.0, 3.5, 3.0, 4.0])
        e = paired_retention(base, variant)
        assert (e.flips_down, e.flips_up) == (3, 1)
        assert e.mcnemar_p == pytest.approx(stats.binomtest(3, 4, 0.5).pvalue)

    def test_negative_scores_are_meaningless_for_a_ratio(self):
        e = paired_retention([-1.0, -2.0], [-1.5, -2.5])
        assert not e.defined and ("negative" in e.note or "undefined" in e.note)

    def test_bootstrap_required_n_has_a_floor(self):
        base = np.linspace(1, 2, 10)
        e = paired_retention(base, base)
        assert e.high == e.low == 1.0  # the bootstrap alone would call this infinitely precise
        assert e.required_n(0.95) == MIN_BOOTSTRAP_N


class TestAverage:
    def test_average_of_task_means_weighs_tasks_equally(self):
        t1 = table(80, 10, 0, 10)  # 0.90 -> 0.80
        t2 = table(100, 100, 0, 800)  # 0.20 -> 0.10 over ten times the items
        e = paired_retention_average([t1, t2])
        assert e.base_mean == pytest.approx((0.9 + 0.2) / 2)
        assert e.variant_mean == pytest.approx((0.8 + 0.1) / 2)
        assert e.estimate == pytest.approx(0.45 / 0.55)
        assert (e.n, e.n_tasks, e.flips_down, e.flips_up) == (1100, 2, 110, 0)
        assert e.method == "stratified-bootstrap" and e.low < e.estimate < e.high

    def test_pairing_is_preserved_within_tasks(self):
        # Identical answers: resampling items with their pairs keeps every resampled ratio at exactly 1...
        tasks = [table(60, 0, 0, 40), table(30, 0, 0, 70)]
        rng = np.random.default_rng(0)
        boot = qs._resample_sums(rng, 500, *tasks[0])
        assert np.array_equal(boot[0], boot[1])
        # ...so the interval and the min-n rule are floored at what "no flips in n items" implies.
        e = paired_retention_average(tasks)
        assert e.low < 1.0 < e.high
        assert e.required_n(0.95) > e.n
        assert retention_gate(e, 0.95).outcome is Outcome.INCONCLUSIVE
        # With many more identical items the floor shrinks and the gate can pass.
        big = paired_retention_average([table(600, 0, 0, 400), table(300, 0, 0, 700)])
        assert big.required_n(0.95) < big.n and retention_gate(big, 0.95).outcome is Outcome.PASS

    def test_deterministic_in_seed(self):
        tasks = [table(60, 8, 3, 29), table(40, 5, 5, 50)]
        assert paired_retention_average(tasks, seed=1) == paired_retention_average(tasks, seed=1)
        assert paired_retention_average(tasks, seed=1) != paired_retention_average(tasks, seed=2)

    def test_single_task_average_matches_the_paired_bootstrap_estimate(self):
        t = table(500, 50, 20, 430)
        avg, single = paired_retention_average([t]), paired_retention(*t)
        assert avg.estimate == pytest.approx(single.estimate)
        assert avg.low == pytest.approx(single.low, abs=0.01) and avg.high == pytest.approx(
            single.high, abs=0.01
        )

    def test_undefined_and_invalid(self):
        assert not paired_retention_average([table(0, 0, 5, 5)]).defined
        assert "no items" in paired_retention_average([table(5, 0, 0, 5), ([], [])]).note
        with pytest.raises(ValueError, match="at least one task"):
            paired_retention_average([])
        with pytest.raises(ValueError, match="task 1"):
            paired_retention_average([table(5, 0, 0, 5), ([1, 0], [1])])


# ------------------------------------------------------------------------------------------ min-n rule


class TestRequiredN:
    def test_lossless_interval_clears_the_floor_exactly_at_required_n(self):
        for p, d, floor in [(0.42, 0.10, 0.95), (0.30, 0.10, 0.95), (0.45, 0.15, 0.90), (0.77, 0.0, 0.90)]:
            n = required_n(p, d, floor)
            assert lossless_interval(n, p, d)[0] >= floor
            assert lossless_interval(n - 1, p, d)[0] < floor
            assert resolvable_floor(n, p, d) >= floor > resolvable_floor(n - 1, p, d)

    def test_zero_discordance_is_finite_and_wilson_like(self):
        # With no flips the lower bound is np / (np + z^2): n = z^2 floor / (p (1 - floor)).
        assert required_n(0.7, 0.0, 0.95) == math.ceil(Z95**2 * 0.95 / (0.7 * 0.05))

    def test_delta_method_approximation_for_large_discordance(self):
        n = required_n(0.5, 0.4, 0.95)
        assert n == pytest.approx(Z95**2 * 0.4 / (0.5 * math.log(0.95)) ** 2, rel=0.08)

    def test_monotonicity(self):
        assert required_n(0.5, 0.05, 0.95) < required_n(0.5, 0.10, 0.95) < required_n(0.5, 0.20, 0.95)
        assert required_n(0.5, 0.10, 0.90) < required_n(0.5, 0.10, 0.95) < required_n(0.5, 0.10, 0.98)
        assert required_n(0.8, 0.10, 0.95) < required_n(0.4, 0.10, 0.95)
        assert required_n(0.5, 0.10, 0.95, level=0.9) < required_n(0.5, 0.10, 0.95, level=0.99)

    def test_discordance_is_capped_at_what_a_lossless_variant_can_flip(self):
        assert required_n(0.1, 0.9, 0.9) == required_n(0.1, 0.2, 0.9)

    @pytest.mark.parametrize(
        "args, match",
        [((0.0, 0.1, 0.95), "base_mean"), ((0.5, -0.1, 0.95), "discordance"), ((0.5, 0.1, 1.0), "floor")],
    )
    def test_invalid(self, args, match):
        with pytest.raises(ValueError, match=match):
            required_n(*args)


# --------------------------------------------------------------------------------------------- display


class TestFormat:
    def test_percent_one_decimal_with_half_width_and_bounds(self):
        e = estimate(0.718, 0.699, 0.737)
        assert format_interval(e) == "71.8 ± 1.9 [69.9, 73.7]"

    def test_fraction_and_asymmetric(self):
        assert format_value_interval(0.9, 0.8, 0.95, percent=False) == "0.900 ± 0.075 [0.800, 0.950]"

    def test_undefined_and_unbounded(self):
        assert format_interval(estimate(math.nan, math.nan, math.nan)) == "n/a (undefined)"
        assert format_value_interval(2.0, 0.5, math.inf) == "200.0 [50.0, inf]"


# ---------------------------------------------------------------------------------------- retention gate


class TestRetentionGate:
    @pytest.mark.parametrize(
        "interval, expected",
        [
            # (estimate, low, high): point, confident, no-evidence-of-loss. FAIL only on evidence of loss
            # (upper bound < floor) in every mode; a mode's unmet pass rule without it is INCONCLUSIVE.
            ((0.99, 0.97, 1.01), ("PASS", "PASS", "PASS")),
            ((0.96, 0.93, 0.99), ("PASS", "INCONCLUSIVE", "PASS")),
            ((0.94, 0.91, 0.97), ("INCONCLUSIVE", "INCONCLUSIVE", "PASS")),
            ((0.90, 0.87, 0.93), ("FAIL", "FAIL", "FAIL")),
        ],
    )
    def test_modes(self, interval, expected):
        expected = tuple(Outcome(x) for x in expected)
        e = estimate(*interval)
        got = tuple(
            retention_gate(e, 0.95, mode).outcome for mode in ("point", "confident", "no-evidence-of-loss")
        )
        assert got == expected

    def test_default_mode_is_no_evidence_of_loss(self):
        assert retention_gate(estimate(0.94, 0.91, 0.97), 0.95).mode == "no-evidence-of-loss"

    def test_values_are_compared_unrounded(self):
        # llm-compressor rounds 0.9499 to 0.95 and passes; quantgate does not.
        v = retention_gate(estimate(0.9499, 0.93, 0.97), 0.95, "point")
        assert v.outcome is Outcome.INCONCLUSIVE and "94.99" not in v.reason  # displayed rounded, compared exact
        assert retention_gate(estimate(0.95, 0.93, 0.97), 0.95, "point").outcome is Outcome.PASS

    def test_too_few_items_is_inconclusive_and_never_passes(self):
        e = estimate(1.0, 0.90, 1.10, n=100)
        for mode in ("point", "confident", "no-evidence-of-loss"):
            v = retention_gate(e, 0.95, mode)
            assert v.outcome is Outcome.INCONCLUSIVE and v.required_n == required_n(0.7, 0.1, 0.95)
            assert f"needs n >= {v.required_n}" in v.message()

    def test_significant_loss_fails_even_below_required_n(self):
        v = retention_gate(estimate(0.6, 0.45, 0.8, n=50), 0.95)
        assert v.outcome is Outcome.FAIL and "significant" in v.reason

    def test_baseline_scoring_zero_is_not_gated(self):
        # gsm8k 0/40 for a 135M model: nothing to retain, so the gate cannot fail and must not count as a pass.
        v = retention_gate(paired_retention(np.zeros(40), np.zeros(40)), 0.95)
        assert v.outcome is Outcome.NOT_GATED and not v.passed and v.required_n is None
        assert "not gated: the baseline scores 0" in v.message()
        v.raise_for_status()  # neither pass nor fail: nothing to raise

    def test_undefined_estimate_is_inconclusive(self):
        v = retention_gate(paired_retention([], []), 0.95)
        assert v.outcome is Outcome.INCONCLUSIVE and v.required_n is None
        with pytest.raises(InsufficientSampleError, match="no items"):
            v.raise_for_status()

    def test_raise_for_status(self):
        retention_gate(estimate(0.99, 0.97, 1.01), 0.95).raise_for_status()
        with pytest.raises(AssertionError, match="FAIL"):
            retention_gate(estimate(0.90, 0.87, 0.93), 0.95).raise_for_status()
        with pytest.raises(InsufficientSampleError) as info:
            retention_gate(estimate(1.0, 0.9, 1.1, n=20), 0.95).raise_for_status()
        assert isinstance(info.value, QuantgateError)

    def test_failing_message_carries_everything_on_one_screen(self):
        base, variant = table(760, 163, 40, 356)
        v = retention_gate(paired_retention(base, variant), 0.95, label="gsm8k / Qwen3-0.6B int4")
        msg = v.message()
        assert isinstance(v, GateVerdict) and v.outcome is Outcome.FAIL and not v.passed
        lines = msg.splitlines()
        assert len(lines) <= 25 and max(map(len, lines)) <= 120
        e = v.estimate
        for needle in (
            "FAIL gsm8k / Qwen3-0.6B int4",
            "n = 1319",
            format_interval(e),
            "floor 95.0%",
            "no-evidence-of-loss",
            "95% confidence",
            "163 worse",
            "40 better",
            f"McNemar exact p = {e.mcnemar_p:.3g}",
            "upper bound",
        ):
            assert needle in msg, (needle, msg)

    def test_continuous_message_uses_sign_test_wording(self):
        rng = np.random.default_rng(0)
        base = rng.uniform(1, 2, 200)
        msg = retention_gate(paired_retention(base, base * 0.99), 0.95).message()
        assert "sign test p" in msg and "bootstrap" in msg and "PASS" in msg

    def test_invalid_arguments(self):
        with pytest.raises(ValueError, match="mode"):
            retention_gate(estimate(1, 0.9, 1.1), 0.95, "strict")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="floor"):
            retention_gate(estimate(1, 0.9, 1.1), 1.0)


# ---------------------------------------------------------------------------------------- paired change


class TestPairedChange:
    def test_binary_one_sided_mcnemar_and_interval(self):
        before, after = table(400, 40, 15, 545)
        c = paired_change(before, after)
        assert c.binary and c.change == pytest.approx(-25 / 1000) and c.drop == pytest.approx(0.025)
        assert c.p_value == pytest.approx(stats.binomtest(40, 55, 0.5, alternative="greater").pvalue)
        assert c.low < c.change < c.high < 0
        assert c.interval_level == pytest.approx(0.90)

    def test_no_flips_is_not_degenerate(self):
        c = paired_change(*table(7, 0, 0, 3))
        assert c.p_value == 1.0 and c.low < 0 < c.high

    def test_continuous_sign_flip_is_exact_for_small_n(self):
        c = paired_change([1.0, 2.0, 3.0], [0.5, 1.0, 2.5])
        assert c.p_value == pytest.approx(1 / 8) and not c.binary
        assert c.flips_down == 3

    def test_lower_is_better(self):
        c = paired_change([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5], higher_is_better=False)
        assert c.change == pytest.approx(0.5) and c.drop == pytest.approx(0.5) and c.flips_down == 4

    def test_continuous_large_n_randomisation(self):
        rng = np.random.default_rng(0)
        before = rng.normal(0, 1, 300)
        c = paired_change(before, before - 0.3 + rng.normal(0, 0.5, 300))
        assert c.p_value == pytest.approx(1 / 5001) and c.high < 0

    def test_invalid(self):
        with pytest.raises(ValueError, match="same items"):
            paired_change([1, 0], [1])
        with pytest.raises(ValueError, match="no items"):
            paired_change([], [])


# ------------------------------------------------------------------------------------- regression gate


def runs(before: np.ndarray, after: np.ndarray, drop_current: int = 0) -> tuple[dict, dict]:
    ids = [f"doc{i}" for i in range(before.size)]
    accepted = dict(zip(ids, before.tolist(), strict=True))
    current = dict(zip(ids[drop_current:], after[drop_current:].tolist(), strict=True))
    return accepted, current


class TestRegressionGate:
    def test_significant_drop_fails_with_counts_and_missing_items(self):
        accepted, current = runs(*table(500, 40, 10, 450), drop_current=3)
        current["extra1"] = 1.0
        v = regression_gate(accepted, current, label="gsm8k/int4")
        assert v.outcome is Outcome.FAIL and not v.passed
        assert (v.missing_in_current, v.new_in_current) == (3, 1)
        assert v.n == 997 and v.before > v.after
        assert (v.change.flips_down, v.change.flips_up) == (40, 10)
        msg = v.message()
        assert "3 accepted items missing" in msg and "1 new items ignored" in msg
        assert "McNemar exact, one-sided" in msg and "significant drop" in msg
        with pytest.raises(AssertionError, match="regression gate"):
            v.raise_for_status()

    def test_no_change_passes(self):
        v = regression_gate(*runs(*table(500, 12, 13, 475)))
        assert v.outcome is Outcome.PASS and "no significant drop" in v.reason
        v.raise_for_status()

    def test_max_drop_tolerates_a_small_significant_drop(self):
        accepted, current = runs(*table(5000, 150, 60, 4790))  # -0.9 points, p << 0.05
        assert regression_gate(accepted, current).outcome is Outcome.FAIL
        v = regression_gate(accepted, current, max_drop=0.02)
        assert v.outcome is Outcome.PASS and "within max_drop 2.0 pts" in v.reason

    def test_no_overlap_is_a_clear_error(self):
        with pytest.raises(ItemMismatchError, match="no doc ids in common") as info:
            regression_gate({"a": 1.0, "b": 0.0}, {"c": 1.0})
        assert isinstance(info.value, QuantgateError) and isinstance(info.value, ValueError)
        assert "2 items" in str(info.value) and "has 1" in str(info.value)

    def test_too_few_common_items_is_inconclusive(self):
        v = regression_gate({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.0, "b": 0.0, "c": 0.0})
        assert v.outcome is Outcome.INCONCLUSIVE and v.parameters.n_needed == 5
        with pytest.raises(InsufficientSampleError):
            v.raise_for_status()

    def test_flipped_items_show_both_answers_worse_first_and_truncated(self):
        accepted, current = runs(*table(80, 6, 2, 12))
        long_answer = "Natalia sold 48 clips in April and half as many in May. " * 10 + "#### 72"
        acc_answers = {k: long_answer for k in accepted}
        cur_answers = {k: "She sold 70 clips.\n#### 70" for k in current}
        v = regression_gate(
            accepted, current, accepted_answers=acc_answers, current_answers=cur_answers, show=5
        )
        assert len(v.examples) == 5 and v.n_flipped == 8
        assert all(x.before == 1 and x.after == 0 for x in v.examples)  # all six drops outrank the gains
        msg = v.message()
        assert "#### 72" in msg and " ... " in msg and "'She sold 70 clips. #### 70'" in msg
        assert max(map(len, msg.splitlines())) <= 120

    def test_message_fits_one_screen_whatever_show_is(self):
        accepted, current = runs(*table(100, 60, 5, 35))
        answers = {k: "x" * 500 for k in accepted}
        v = regression_gate(accepted, current, accepted_answers=answers, current_answers=answers, show=50)
        assert len(v.message().splitlines()) <= 25

    def test_missing_answers_are_marked(self):
        accepted, current = runs(*table(80, 6, 2, 12))
        v = regression_gate(accepted, current, accepted_answers={}, show=1)
        assert v.examples[0].accepted_answer == "<missing>" and v.examples[0].current_answer is None

    def test_continuous_and_lower_is_better(self):
        rng = np.random.default_rng(0)
        before = rng.uniform(5, 10, 200)
        accepted, current = runs(before, before * 1.05)  # perplexity-like: higher is worse
        v = regression_gate(accepted, current, higher_is_better=False)
        assert v.outcome is Outcome.FAIL and not v.change.binary and "sign-flip" in v.message()
        assert regression_gate(accepted, current, higher_is_better=True).outcome is Outcome.PASS

    def test_invalid_arguments(self):
        with pytest.raises(ValueError, match="max_drop"):
            regression_gate({"a": 1.0}, {"a": 1.0}, max_drop=-0.1)
        with pytest.raises(ValueError, match="show"):
            regression_gate({"a": 1.0}, {"a": 1.0}, show=-1)


def test_resolution_table_prints(capsys):
    qs.main()
    out = capsys.readouterr().out
    assert "hellaswag-like" in out and "GSM8K" in out
    rows = {r["task"]: r for r in qs.resolution_table()}
    assert rows["hellaswag-like"]["required_n"] == required_n(0.42, 0.10, 0.95)


def test_regression_message_names_what_changed_since_the_accepted_run():
    from dataclasses import replace

    from quantgate.verdicts import key_changes

    before = {"kernel_path": "MarlinNvFp4LinearKernel", "limit": 400, "generation": {"max_gen_toks": 256},
              "served_sha256": "a" * 64}
    after = {"kernel_path": "CutlassNvFp4LinearKernel", "limit": 400, "generation": {"max_gen_toks": None},
             "served_sha256": "b" * 64}
    changed = key_changes(before, after)
    assert changed[0] == 'generation: {"max_gen_toks": 256} -> {"max_gen_toks": null}'
    assert changed[1] == "kernel_path: MarlinNvFp4LinearKernel -> CutlassNvFp4LinearKernel"
    assert changed[2].startswith("served_sha256: aaaa") and "..." in changed[2]
    assert len(changed) == 3 and key_changes(before, dict(before)) == ()
    verdict = regression_gate({str(i): 1.0 for i in range(20)}, {str(i): 1.0 for i in range(20)})
    assert "changed" not in verdict.message()
    assert "changed  since the accepted run: generation" in replace(verdict, changed=changed).message()

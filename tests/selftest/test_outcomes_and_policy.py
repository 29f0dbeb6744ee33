"""Unit tests of the verdict logic: outcome classification, the policy's tiers and dispositions, the run's exit
code, the minimum detectable drop, agreement of our fast paths with scipy, and `quantgate plan`'s arithmetic."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from quantgate import cli
from quantgate.errors import MatrixError
from quantgate.gates import stats as qs
from quantgate.gates.outcome import Gate, GateParameters, Outcome
from quantgate.gates.regression import regression_gate
from quantgate.gates.retention import retention_gate
from quantgate.gates.stats import minimum_detectable_drop, paired_retention, required_n
from quantgate.matrix import Matrix, load_distribution_thresholds, load_matrix, load_thresholds
from quantgate.plan import (
    MEASURED_DISTRIBUTION,
    distribution_plan_rows,
    documents_needed,
    parse_assumptions,
    parse_doc_sd,
    plan_rows,
    render_plan,
)
from quantgate.policy import DEFAULT_POLICY, Policy, load_policy, missing_gates
from quantgate.run_verdict import EXIT_ERROR, EXIT_FAIL, EXIT_INCONCLUSIVE, EXIT_PASS, summarize

ROOT = Path(__file__).resolve().parents[2]
Z95 = float(stats.norm.ppf(0.975))
Z80 = float(stats.norm.ppf(0.8))


def table(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    counts = [n11, n10, n01, n00]
    return np.repeat([1.0, 1.0, 0.0, 0.0], counts), np.repeat([1.0, 0.0, 1.0, 0.0], counts)


def gate(name: str, outcome: Outcome, tier: str = "supporting", subject: str = "m/q") -> Gate:
    return Gate(name, subject, tier, outcome, GateParameters(0.95, 0.95, 400, 0.08, 860), "")


# ------------------------------------------------------------------------------------------- outcomes


class TestOutcomes:
    def test_fail_only_on_evidence_inconclusive_when_straddling(self):
        b, v = table(2000, 100, 100, 1800)  # lossless, resolvable
        assert retention_gate(paired_retention(b, v), 0.95).outcome is Outcome.PASS
        b, v = table(600, 150, 10, 240)  # clear loss
        assert retention_gate(paired_retention(b, v), 0.95).outcome is Outcome.FAIL
        b, v = table(150, 10, 10, 230)  # lossless, n too small: straddles the floor
        verdict = retention_gate(paired_retention(b, v), 0.95)
        assert verdict.outcome is Outcome.INCONCLUSIVE
        assert "FAIL" not in verdict.message()

    def test_inconclusive_and_fail_print_n_needed_and_mdd(self):
        for counts in [(150, 10, 10, 230), (600, 150, 10, 240)]:
            verdict = retention_gate(paired_retention(*table(*counts)), 0.95)
            p = verdict.parameters
            assert p.n_needed == verdict.required_n and p.n == sum(counts) and p.mdd and 0 < p.mdd < 1
            assert f"resolves from n >= {p.n_needed}" in verdict.message() and "mdd " in verdict.message()

    def test_regression_against_an_accepted_zero_is_not_gated(self):
        ids = [f"d{i}" for i in range(40)]
        zeros = dict.fromkeys(ids, 0.0)
        verdict = regression_gate(zeros, zeros)
        assert verdict.outcome is Outcome.NOT_GATED and not verdict.passed
        assert "not gated: the baseline scores 0" in verdict.message()
        # A current run that got better is still not a pass of a gate that could not fail.
        assert regression_gate(zeros, {**zeros, "d0": 1.0}).outcome is Outcome.NOT_GATED

    def test_gate_round_trips_through_json(self):
        g = gate("retention[hellaswag]", Outcome.INCONCLUSIVE)
        back = Gate.from_json(g.as_json())
        assert back.outcome is Outcome.INCONCLUSIVE and back.parameters == g.parameters and back.tier == g.tier

    def test_parameters_text(self):
        text = GateParameters(0.95, 0.95, 400, 0.0791, 860).text()
        assert text == "level 95%, floor 95.0%, n 400, mdd 7.9% (80% power), resolves from n >= 860"


# ----------------------------------------------------------------------------------------------- mdd


class TestMinimumDetectableDrop:
    def test_matches_tensorrt_llm_theta_for_independent_runs(self):
        # theta = (z_alpha + z_beta) sigma sqrt(2/n): the paired form with item_sd = sigma sqrt(2).
        sigma, n = 0.5, 400
        got = minimum_detectable_drop(sigma * math.sqrt(2), n, level=0.95, power=0.8)
        assert got == pytest.approx((Z95 + Z80) * sigma * math.sqrt(2 / n))

    def test_log_scale_is_a_fraction_of_the_base(self):
        theta = (Z95 + Z80) * 0.7 / math.sqrt(500)
        assert minimum_detectable_drop(0.7, 500, log_scale=True) == pytest.approx(1 - math.exp(-theta))

    def test_estimate_mdd_uses_the_discordance(self):
        b, v = table(300, 20, 20, 260)  # p = 0.533, d = 0.0667
        e = paired_retention(b, v)
        expected = 1 - math.exp(-(Z95 + Z80) * math.sqrt(e.discordance) / e.base_mean / math.sqrt(e.n))
        assert e.mdd() == pytest.approx(expected)

    def test_mdd_shrinks_with_n(self):
        assert minimum_detectable_drop(1.0, 1600) == pytest.approx(minimum_detectable_drop(1.0, 400) / 2)

    @pytest.mark.parametrize("kw", [{"power": 1.0}, {"n": 0}, {"level": 0.3}])
    def test_bad_input(self, kw):
        args = {"item_sd": 1.0, "n": 10, **kw}
        with pytest.raises(ValueError):
            minimum_detectable_drop(**args)


# ------------------------------------------------------------------------------- scipy agreement


class TestScipyAgreement:
    @pytest.mark.parametrize("worse, better", [(0, 0), (3, 0), (7, 2), (40, 25), (120, 160)])
    def test_sign_test_fast_path_equals_binomtest(self, worse, better):
        expected = 1.0 if worse + better == 0 else stats.binomtest(worse, worse + better, 0.5).pvalue
        assert qs._sign_test_p(worse, better) == pytest.approx(expected, rel=1e-9)

    def test_sign_flip_exact_enumeration(self):
        gain = np.array([-0.5, -0.2, 0.1, -0.3, -0.05, 0.2, -0.4, -0.1])
        signs = np.array([[1 - 2 * ((i >> j) & 1) for j in range(gain.size)] for i in range(2**gain.size)])
        expected = np.mean(signs @ np.abs(gain) <= gain.sum() + 1e-12)
        got = qs._sign_flip_p(gain, 5000, np.random.default_rng(0))
        assert got == pytest.approx(expected)

    def test_paired_bootstrap_fast_path_agrees_with_scipy_bootstrap(self):
        rng = np.random.default_rng(5)
        n = 300
        base = rng.normal(-50, 10, n)
        variant = base + rng.normal(-0.3, 1.0, n)
        weights = rng.integers(20, 60, n).astype(float)
        ours = paired_retention(base, variant, weights=weights, higher_is_better=False, aggregate="perplexity",
                                n_boot=4000)

        def ppl_ratio(b, v, w, axis=-1):
            return np.exp((v.sum(axis=axis) - b.sum(axis=axis)) / w.sum(axis=axis))

        ref = stats.bootstrap((base, variant, weights), ppl_ratio, paired=True, vectorized=True,
                              n_resamples=4000, confidence_level=0.95, method="percentile",
                              rng=np.random.default_rng(1))
        width = ours.high - ours.low
        assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.1 * width)
        assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.1 * width)

    def test_wilson_from_binomtest(self):
        lo, hi = qs._wilson_interval(42, 100, 0.95)
        p, n = 0.42, 100
        centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
        assert (lo, hi) == pytest.approx((centre - half, centre + half))


# ------------------------------------------------------------------------------------------- policy

POLICY = """
default_tier: supporting
tiers: {hellaswag: critical, ifeval: supporting, "retention[AVG]": supporting, "regression[gsm8k]": advisory}
on_fail: {critical: fail, supporting: fail, advisory: warn}
on_inconclusive:
  critical:   {commit: fail, nightly: fail}
  supporting: {commit: warn, nightly: fail}
  advisory:   {commit: pass-with-note, nightly: warn}
require_snapshot: {commit: false, nightly: true}
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture
def policy(tmp_path) -> Policy:
    return load_policy(write(tmp_path, POLICY))


class TestPolicy:
    def test_shipped_policy_is_valid(self):
        p = load_policy(ROOT / "thresholds" / "policy.yaml")
        assert p.tier("retention[hellaswag]") in ("critical", "supporting", "advisory")

    def test_tier_lookup_exact_then_task_then_default(self, policy):
        assert policy.tier("retention[hellaswag]") == "critical"  # by task
        assert policy.tier("regression[gsm8k]") == "advisory"  # exact
        assert policy.tier("retention[AVG]") == "supporting"
        assert policy.tier("kl") == "supporting"  # default

    @pytest.mark.parametrize(
        "outcome, tier, cadence, expected",
        [
            (Outcome.PASS, "critical", "commit", "pass"),
            (Outcome.FAIL, "supporting", "commit", "fail"),
            (Outcome.FAIL, "advisory", "nightly", "warn"),
            (Outcome.INCONCLUSIVE, "critical", "commit", "fail"),
            (Outcome.INCONCLUSIVE, "supporting", "commit", "warn"),
            (Outcome.INCONCLUSIVE, "supporting", "nightly", "fail"),
            (Outcome.INCONCLUSIVE, "supporting", "weekly", "fail"),  # weekly falls back to nightly
            (Outcome.INCONCLUSIVE, "advisory", "commit", "note"),
            (Outcome.NOT_GATED, "critical", "nightly", "not-gated"),
            (Outcome.MISSING, "critical", "commit", "fail"),
        ],
    )
    def test_disposition(self, policy, outcome, tier, cadence, expected):
        assert policy.disposition(outcome, tier, cadence) == expected

    def test_require_snapshot_per_cadence(self, policy):
        assert not policy.require_snapshot.at("commit") and policy.require_snapshot.at("nightly")
        assert policy.require_snapshot.at("weekly")

    @pytest.mark.parametrize(
        "edit, match",
        [
            (("default_tier: supporting", "default_tier: blocker"), "default_tier"),
            (("require_snapshot:", "requre_snapshot:"), "unknown key"),
            (("  advisory:   {commit: pass-with-note, nightly: warn}\n", ""), "missing \\['advisory'\\]"),
            (("critical: fail, supporting", "critical: warn, supporting"), "on_fail.critical must be fail"),
            (("{commit: warn, nightly: fail}", "{commit: ignore, nightly: fail}"), "on_inconclusive.supporting"),
            (("hellaswag: critical", "'hella swag': critical"), "not a gate or task name"),
        ],
    )
    def test_strict_validation_names_the_key(self, tmp_path, edit, match):
        with pytest.raises(MatrixError, match=match):
            load_policy(write(tmp_path, POLICY.replace(*edit)))

    def test_describe_prints_every_tier(self, policy):
        text = policy.describe("nightly")
        assert "supporting FAIL -> fail, INCONCLUSIVE -> fail; ifeval, retention[AVG]" in text
        assert "critical   FAIL -> fail, INCONCLUSIVE -> fail; hellaswag" in text


# --------------------------------------------------------------------------------------- exit codes


class TestRunVerdict:
    def test_a_negative_control_caught_is_expected_and_one_missed_fails_the_run(self, policy):
        good = gate("retention[hellaswag]", Outcome.PASS, "critical", subject="m/q")

        def control(outcome: Outcome, tier: str = "critical") -> Gate:
            g = gate("retention[hellaswag]", outcome, tier, subject="m/damaged")
            return Gate(g.name, g.subject, g.tier, g.outcome, g.parameters, g.message, control=True)

        caught = summarize([good, control(Outcome.FAIL)], policy, "commit")
        assert caught.exit_code == EXIT_PASS and caught.headline == "PASS"
        assert any("caught as expected" in line for line in caught.lines(policy))
        # the gates stopped catching it: PASS or INCONCLUSIVE on a critical gate of a control fails the run
        for outcome in (Outcome.PASS, Outcome.INCONCLUSIVE):
            missed = summarize([good, control(outcome)], policy, "commit")
            assert missed.exit_code == EXIT_FAIL, outcome
            assert any("NOT caught" in line for line in missed.lines(policy))
        # a supporting gate of a control is only reported, whatever it says
        assert summarize([good, control(Outcome.INCONCLUSIVE, "supporting")], policy, "commit").exit_code == EXIT_PASS
        assert policy.disposition(Outcome.FAIL, "supporting", "commit", control=True) == "expected-fail"
        # the flag survives the JUnit round trip the CLI reads gates back through
        assert Gate.from_json(control(Outcome.FAIL).as_json()).control is True

    def test_all_pass_is_0(self, policy):
        gates = [gate("retention[hellaswag]", Outcome.PASS, "critical"), gate("retention[AVG]", Outcome.PASS)]
        v = summarize(gates, policy, "commit")
        assert v.exit_code == EXIT_PASS and v.headline == "PASS"

    def test_inconclusive_supporting_warns_on_commit_blocks_nightly_never_prints_fail(self, policy):
        gates = [gate("retention[hellaswag]", Outcome.PASS, "critical"), gate("retention[AVG]", Outcome.INCONCLUSIVE)]
        assert summarize(gates, policy, "commit").exit_code == EXIT_PASS
        nightly = summarize(gates, policy, "nightly")
        assert nightly.exit_code == EXIT_INCONCLUSIVE and nightly.headline == "INCONCLUSIVE"
        assert "FAIL" not in "\n".join(line for line in nightly.lines(policy) if "FAIL ->" not in line)

    def test_fail_on_evidence_is_1_even_with_inconclusive_gates(self, policy):
        gates = [gate("retention[hellaswag]", Outcome.INCONCLUSIVE, "critical"), gate("retention[AVG]", Outcome.FAIL)]
        v = summarize(gates, policy, "commit")
        assert v.exit_code == EXIT_FAIL and v.headline == "FAIL"

    def test_advisory_fail_only_warns(self, policy):
        gates = [
            gate("retention[hellaswag]", Outcome.PASS, "critical"),
            gate("regression[gsm8k]", Outcome.FAIL, "advisory"),
        ]
        v = summarize(gates, policy, "nightly")
        assert v.exit_code == EXIT_PASS and any("warning" in line for line in v.lines())

    def test_not_gated_counts_as_neither(self, policy):
        gates = [gate("retention[hellaswag]", Outcome.PASS, "critical"), gate("regression[gsm8k]", Outcome.NOT_GATED)]
        v = summarize(gates, policy, "nightly")
        assert v.exit_code == EXIT_PASS and v.counts() == {"PASS": 1, "NOT GATED": 1}
        assert any("NOT GATED" in line and "not counted" in line for line in v.lines())

    def test_missing_critical_gate_fails(self, policy):
        gates = [gate("retention[ifeval]", Outcome.PASS, subject="m/a"), gate("retention[hellaswag]", Outcome.PASS,
                 "critical", subject="m/b"), gate("regression[gsm8k]", Outcome.PASS, "advisory", subject="m/bf16")]
        missing = missing_gates(gates, policy)
        # m/a judged gates but not the critical hellaswag one; the baseline (regression only) misses nothing.
        assert [(g.subject, g.name, g.outcome) for g in missing] == [("m/a", "hellaswag", Outcome.MISSING)]
        v = summarize(gates, policy, "commit")
        assert v.exit_code == EXIT_FAIL and any("MISSING" in line for line in v.lines())

    def test_other_failures_and_errors_fail(self, policy):
        assert summarize([], policy, "commit", other_failures=["t::k"]).exit_code == EXIT_FAIL
        assert summarize([], policy, "commit", errors=["t::build"]).exit_code == EXIT_FAIL

    def test_a_run_where_nothing_ran_is_not_a_pass(self, policy, tmp_path):
        """Every test skipped (or none collected) and no gate judged: exit 3, not a green PASS; the job summary
        read from the JUnit XML says the same. Control: one test that ran and passed is a PASS."""
        from quantgate.report.job_summary import annotations, markdown, read_junit, verdict_of
        from quantgate.run_verdict import EXIT_ERROR

        v = summarize([], policy, "commit", ran=0)
        assert v.exit_code == EXIT_ERROR and v.headline == "NOTHING RAN" and "skipped" in v.lines()[-1]
        assert summarize([], policy, "commit", ran=1).exit_code == EXIT_PASS  # a test ran and passed
        assert summarize([], policy, "commit").exit_code == EXIT_PASS  # unknown count: as before
        assert summarize([], policy, "commit", ran=0, errors=["t::build"]).exit_code == EXIT_FAIL
        skipped = tmp_path / "skipped.xml"
        skipped.write_text('<testsuites><testsuite name="pytest" tests="2"><testcase classname="s" name="a">'
                           '<skipped message="no snapshot"/></testcase><testcase classname="s" name="b">'
                           '<skipped message="no baseline"/></testcase></testsuite></testsuites>')
        run = read_junit(skipped)
        verdict = verdict_of(run, policy)
        assert (run.tests, run.skipped, verdict.exit_code) == (2, 2, EXIT_ERROR)
        text = markdown(verdict, run, [], policy)
        assert "NOTHING RAN (exit 3)" in text and "Every judged gate passed" not in text
        assert any("nothing ran" in line for line in annotations(verdict, run))
        ran = tmp_path / "ran.xml"
        ran.write_text('<testsuites><testsuite name="pytest" tests="1"><testcase classname="s" name="a"/>'
                       '</testsuite></testsuites>')
        assert verdict_of(read_junit(ran), policy).exit_code == EXIT_PASS

    def test_default_policy_has_every_tier(self):
        assert DEFAULT_POLICY.disposition(Outcome.INCONCLUSIVE, "supporting", "commit") == "warn"


# ---------------------------------------------------------------------------------------------- plan


class TestPlan:
    def test_rows_use_the_gates_arithmetic(self):
        m = load_matrix(ROOT / "fixtures" / "demo.yaml")
        th = load_thresholds(ROOT / "thresholds" / "retention.yaml")
        tasks = [t.name for t in m.tasks]
        base = parse_assumptions("0.5,hellaswag=0.42,ifeval=0", tasks, "--base")
        disc = parse_assumptions("0.10", tasks, "--discordance")
        rows = {(r.subject, r.gate): r for r in plan_rows(m, th, base, disc)}
        r = rows[("smollm2-135m/w8a8-int8", "retention[hellaswag]")]
        assert r.n == 400 and r.floor == 0.95 and r.n_needed == required_n(0.42, 0.10, 0.95)
        assert r.mdd == pytest.approx(1 - math.exp(-(Z95 + Z80) * math.sqrt(0.10) / 0.42 / math.sqrt(400)))
        assert r.resolved is False
        assert rows[("smollm2-135m/w4a16-g64", "retention[hellaswag]")].resolved is True  # 90% floor
        assert rows[("smollm2-135m/w8a8-int8", "retention[ifeval]")].note.startswith("not gated")
        text = render_plan(list(rows.values()), 0.95, 0.8)
        assert "INCONCLUSIVE expected" in text and "retention[AVG]" in text

    @pytest.mark.parametrize("spec, match", [("x", "not a number"), ("1.5", "in \\[0, 1\\]"),
                                             ("mmlu=0.1,0.2", "no task 'mmlu'"), ("hellaswag=0.1", "no value")])
    def test_bad_assumptions(self, spec, match):
        with pytest.raises(MatrixError, match=match):
            parse_assumptions(spec, ["hellaswag", "gsm8k"], "--base")

    def test_every_metric_of_a_multi_metric_task_gets_a_row(self):
        doc = load_matrix(ROOT / "fixtures" / "demo.yaml").model_dump()
        doc["tasks"] = [{"name": "ifeval", "metrics": ["inst_level_strict_acc", "prompt_level_strict_acc"],
                         "limit": 40}]
        m = Matrix.model_validate(doc)
        th = load_thresholds(ROOT / "thresholds" / "retention.yaml")
        rows = {(r.subject, r.gate): r for r in plan_rows(m, th, {"ifeval": 0.3}, {"ifeval": 0.2})}
        gated = rows[("smollm2-135m/w8a8-int8", "retention[ifeval]")]
        reported = rows[("smollm2-135m/w8a8-int8", "retention[ifeval:prompt_level_strict_acc,none]")]
        assert reported.n_needed == gated.n_needed and reported.mdd == gated.mdd
        assert reported.note.startswith("reported, not gated")
        text = render_plan(list(rows.values()), 0.95, 0.8, policy=DEFAULT_POLICY)
        assert "retention[ifeval:prompt_level_strict_acc,none]  reported" in text

    def test_distribution_rows_use_the_t_interval_over_documents(self):
        m = load_matrix(ROOT / "fixtures" / "demo.yaml")
        limits = load_distribution_thresholds(ROOT / "thresholds" / "distribution.yaml")
        rows = {(r.subject, r.gate): r for r in distribution_plan_rows(m, limits)}
        quantized = [v.name for v in m.models[0].variants if v.format != "bf16"]
        assert {s.split("/")[1] for s, _ in rows} == set(quantized)  # every variant, no baseline
        assert all((f"smollm2-135m/{v}", g) in rows for v in quantized for g in ("kl", "top1_agreement"))
        r = rows[("smollm2-135m/fp8-dynamic", "top1_agreement")]
        mean, sd = MEASURED_DISTRIBUTION["fp8"][1]["top1_agreement"]
        floor = limits.formats["fp8"].top1_agreement_min
        assert (r.mean, r.sd, r.n, r.limit, r.side) == (mean, sd, 32, floor, "min")
        # the gate's own t interval just clears the limit at n_needed and not one document earlier
        half = lambda n: stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)  # noqa: E731
        assert half(r.n_needed) < mean - floor <= half(r.n_needed - 1)
        assert r.mdd == pytest.approx((Z95 + Z80) * sd / math.sqrt(32))
        assert r.resolved is True and r.expected == "PASS"
        control = rows[("smollm2-135m/w4a16-channel-control", "kl")]
        assert control.control and control.expected == "FAIL" and control.resolved
        # a looser sd from the command line: more documents needed
        wide = {(x.subject, x.gate): x for x in distribution_plan_rows(m, limits, doc_sd={"top1_agreement": 0.1})}
        assert wide[("smollm2-135m/fp8-dynamic", "top1_agreement")].n_needed > 32
        assert "--doc-sd" in wide[("smollm2-135m/fp8-dynamic", "top1_agreement")].source
        policy = load_policy(ROOT / "thresholds" / "policy.yaml")
        text = render_plan([], 0.95, 0.8, list(wide.values()), 0.95, policy)
        assert "INCONCLUSIVE expected" in text and "negative control" in text
        assert "smollm2-135m/fp8-dynamic            top1_agreement  critical" in text

    def test_documents_needed_edges(self):
        assert documents_needed(0.5, 0.1, 0.5, 0.95) is None  # on the limit: no n resolves it
        assert documents_needed(0.0, 0.1, 1.0, 0.95) == 2  # far from the limit: the smallest t interval
        assert documents_needed(0.0, 1.0, 1e-4, 0.95, n_max=100) is None

    @pytest.mark.parametrize("spec, match", [("kl", "GATE=SD"), ("foo=1", "GATE=SD"), ("kl=x", "not a number"),
                                             ("kl=0", "must be > 0")])
    def test_bad_doc_sd(self, spec, match):
        with pytest.raises(MatrixError, match=match):
            parse_doc_sd(spec)

    def test_cli_plan_and_usage_errors(self, capsys, monkeypatch):
        monkeypatch.chdir(ROOT)
        assert cli.main(["plan", "fixtures/gpu.yaml", "--base", "0.41", "--discordance", "0.1"]) == 0
        out = capsys.readouterr().out
        assert "smollm2-135m/fp8-modelopt" in out
        assert "smollm2-135m/fp8-modelopt    kl" in out and "critical" in out and "distribution gates" in out
        with pytest.raises(SystemExit) as info:
            cli.main(["check", "--bogus"])
        assert info.value.code == EXIT_ERROR


# -------------------------------------------------------------------------------- clustered intervals


class TestClustered:
    def _data(self, rng, k=40, per=25, shared=0.0):
        labels = np.repeat([f"s{i}" for i in range(k)], per)
        # Per-subject difficulty shifts both runs alike; `shared` adds a per-subject shift of the variant only.
        p_subject = rng.uniform(0.3, 0.8, k)
        base = (rng.random(k * per) < np.repeat(p_subject, per)).astype(float)
        flip = rng.random(k * per) < np.repeat(0.1 + shared * rng.random(k), per)
        variant = np.where(flip, 1 - base, base)
        return base, variant, labels

    def test_one_item_per_cluster_is_the_paired_bootstrap(self):
        rng = np.random.default_rng(2)
        b, v, _ = self._data(rng, k=400, per=1)
        ours = qs.paired_retention_clustered(b, v, [str(i) for i in range(b.size)], n_boot=4000)
        ref = paired_retention(b, v, method="bootstrap", n_boot=4000)
        assert ours.estimate == pytest.approx(ref.estimate)
        assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high), abs=0.2 * (ref.high - ref.low))

    def test_clustered_flips_widen_the_interval_and_raise_required_n(self):
        rng = np.random.default_rng(3)
        b, v, labels = self._data(rng, shared=0.6)
        clustered = qs.paired_retention_clustered(b, v, labels)
        flat = paired_retention(b, v, method="bootstrap")
        assert clustered.method == "cluster-bootstrap" and clustered.n == b.size
        assert clustered.high - clustered.low > flat.high - flat.low
        assert clustered.required_n(0.95) > flat.required_n(0.95)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="label every item"):
            qs.paired_retention_clustered([1, 0], [1, 0], ["a"])
        few = qs.paired_retention_clustered([1, 0, 1], [1, 1, 1], ["a", "b", "c"])
        assert not few.defined and "5" in few.note

    def test_group_items_cluster_by_their_subtask(self):
        from quantgate.matrix import Task
        from quantgate.verdicts import subject_clusters

        # a group's item ids are 'subtask/doc id' (lmeval_runner.item_id): the subtask is the subject
        ids = ("mmlu_anatomy/0", "mmlu_anatomy/1", "mmlu_virology/0")
        assert subject_clusters(Task(name="mmlu", metric="acc"), ids) == {
            "mmlu_anatomy/0": "mmlu_anatomy", "mmlu_anatomy/1": "mmlu_anatomy", "mmlu_virology/0": "mmlu_virology"}
        assert subject_clusters(Task(name="hellaswag", metric="acc_norm"), ("0", "1")) is None

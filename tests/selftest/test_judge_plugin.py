"""The plugin's `qg_judge` in a pytest run of its own (pytester): each outcome ends its test as the policy says,
JUnit XML carries a property per gate, and the terminal summary gives the run's verdict."""

from __future__ import annotations

import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

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

TESTS = """
import pytest
from quantgate.gates.outcome import GateParameters, Outcome

class J:
    def __init__(self, outcome):
        self.outcome = Outcome(outcome)
        self.parameters = GateParameters(level=0.95, floor=0.95, n=400, mdd=0.079, n_needed=860)
    def message(self):
        return f"{self.outcome.label}: a gate"

@pytest.mark.parametrize("name, outcome", [
    ("retention[hellaswag]", "PASS"), ("kl", "PASS"), ("top1_agreement", "PASS"), ("retention[AVG]", "INCONCLUSIVE"),
    ("regression[gsm8k]", "INCONCLUSIVE"), ("retention[ifeval]", "NOT_GATED"),
])
def test_gate(qg_judge, name, outcome):
    qg_judge(name, "m/q", J(outcome))
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".yaml", matrix=textwrap.dedent(MATRIX))
    (pytester.path / "policy.yaml").write_text((ROOT / "thresholds" / "policy.yaml").read_text())
    (pytester.path / "retention.yaml").write_text((ROOT / "thresholds" / "retention.yaml").read_text())
    pytester.makepyfile(test_gates=TESTS)
    return pytester


def _run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    return project.runpytest(
        "--qg-matrix", "matrix.yaml", "--qg-thresholds", "retention.yaml", "--qg-policy", "policy.yaml",
        "-p", "no:cacheprovider", "-rxs", *args,
    )


def test_commit_cadence_warns_on_inconclusive_and_skips_not_gated(project):
    result = _run(project, "--junitxml", "out.xml")
    # PASS passes; supporting AVG INCONCLUSIVE -> warn (xfail); advisory regression -> pass with note;
    # NOT GATED -> skipped.
    # (kl and top1_agreement are critical in thresholds/policy.yaml: without them the subject would be MISSING)
    result.assert_outcomes(passed=4, xfailed=1, skipped=1, warnings=1)
    out = result.stdout.str()
    assert "VERDICT: PASS (exit 0)" in out and "NOT GATED" in out and "policy at cadence commit" in out
    props = {
        (case.get("name"), p.get("name")): p.get("value")
        for case in ET.parse(project.path / "out.xml").iter("testcase")
        for p in case.iter("property")
    }
    key = "test_gate[retention[AVG]-INCONCLUSIVE]"
    assert props[(key, "quantgate.outcome")] == "INCONCLUSIVE" and props[(key, "quantgate.disposition")] == "warn"
    assert props[(key, "quantgate.floor")] == "0.95" and props[(key, "quantgate.mdd")] == "0.079"
    assert props[(key, "quantgate.n")] == "400" and props[(key, "quantgate.n_needed")] == "860"


def test_nightly_blocks_on_inconclusive_without_calling_it_fail(project):
    result = _run(project, "--qg-cadence", "nightly")
    # The blocking INCONCLUSIVE gate is red for pytest (exit status 1) but counted and named as inconclusive.
    assert result.ret == 1
    assert result.parseoutcomes() == {"passed": 3, "inconclusive": 1, "xfailed": 1, "skipped": 1}
    out = result.stdout.str()
    assert "VERDICT: INCONCLUSIVE (exit 2)" in out and "INCONCLUSIVE -> fail" in out
    # Neither pytest nor quantgate says FAIL or FAILED (XFAIL is the `warn` disposition's pytest word).
    assert not re.search(r"\bFAIL(ED)?\b(?! ->)", out), out


def test_quantgate_run_exit_codes(tmp_path, monkeypatch, capsys):
    """`quantgate run` over a suite of judged gates: 0 on a commit (INCONCLUSIVE warns), 2 nightly (it blocks),
    1 once a gate fails on evidence."""
    from quantgate import cli

    monkeypatch.chdir(ROOT)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_gates.py").write_text(textwrap.dedent(TESTS))
    common = ["run", "--tests", str(suite), "--matrix", str(tmp_path / "matrix.yaml"), "-q"]
    (tmp_path / "matrix.yaml").write_text(textwrap.dedent(MATRIX))
    monkeypatch.setenv("QUANTGATE_RESULTS", str(tmp_path / "results"))
    assert cli.main(common) == 0
    out = capsys.readouterr().out
    # the gates and the policy in pytest's summary, the VERDICT line once, last (with the wall time)
    assert out.count("VERDICT:") == 1 and re.search(r"VERDICT: PASS \(exit 0\).*\(\d+s wall\)", out), out
    assert "policy at cadence commit" in out.split("VERDICT:")[0]
    # quantgate is imported before pytest marks it for assertion rewriting (quantgate/__init__.py says why)
    assert "PytestAssertRewriteWarning" not in out, out
    assert cli.main([*common, "--qg-cadence", "nightly"]) == 2
    out = capsys.readouterr().out
    assert "VERDICT: INCONCLUSIVE (exit 2)" in out and "VERDICT: FAIL" not in out
    (suite / "test_more.py").write_text(TESTS.replace('("kl", "PASS")', '("kl", "FAIL")'))
    assert cli.main(common) == 1
    assert "VERDICT: FAIL (exit 1)" in capsys.readouterr().out
    # a marker that selects nothing: NOTHING RAN, exit 3, naming the selection; no history entry for it
    history = tmp_path / "results" / "history.jsonl"
    lines_before = history.read_text().count("\n") if history.exists() else 0
    assert cli.main([*common, "-m", "nvfp"]) == 3
    assert "VERDICT: NOTHING RAN (exit 3): no test matched -m 'nvfp'" in capsys.readouterr().out
    # QUANTGATE_VLLM_ARGS that sets a flag quantgate owns: refused before pytest starts, one line, exit 3
    monkeypatch.setenv("QUANTGATE_VLLM_ARGS", "--api_server_count=2")
    assert cli.main(common) == 3
    printed = capsys.readouterr()
    assert "QUANTGATE_VLLM_ARGS may not set ['--api-server-count']" in printed.err and "VERDICT" not in printed.out
    assert (history.read_text().count("\n") if history.exists() else 0) == lines_before


CONTROL_TESTS = """
import pytest
from quantgate.gates.outcome import GateParameters, Outcome

class J:
    def __init__(self, outcome):
        self.outcome = Outcome(outcome)
        self.parameters = GateParameters(level=0.95, floor=0.03, n=32, mdd=0.01, n_needed=None)
    def message(self):
        return f"{self.outcome.label}: kl of the damaged build"

@pytest.mark.parametrize("outcome", ["FAIL", "PASS"])
def test_control(qg_judge, outcome):
    qg_judge("kl", "m/damaged", J(outcome))
"""


def test_a_negative_control_xfails_when_caught_and_fails_when_missed(pytester: pytest.Pytester):
    matrix = MATRIX.replace(
        "tasks:",
        "      - {name: damaged, format: int4, builder: llmcompressor, recipe: {scheme: W4A16}, control: true}\ntasks:")
    pytester.makefile(".yaml", matrix=textwrap.dedent(matrix))
    (pytester.path / "policy.yaml").write_text((ROOT / "thresholds" / "policy.yaml").read_text())
    (pytester.path / "retention.yaml").write_text((ROOT / "thresholds" / "retention.yaml").read_text())
    pytester.makepyfile(test_control=CONTROL_TESTS)
    result = _run(pytester)
    result.assert_outcomes(xfailed=1, failed=1)
    out = result.stdout.str()
    assert "negative control caught, as expected" in out
    assert "negative control NOT caught" in out and "VERDICT: FAIL (exit 1)" in out


@pytest.mark.parametrize("how", ["env", "option"])
def test_quantgate_report_on_an_empty_results_directory_fails_naming_it_and_creates_nothing(tmp_path, monkeypatch,
                                                                                            capsys, how):
    """A report of nothing is a wrong folder (or a matrix never run), not a success: exit 3 (the CLI's usage and
    configuration error) with one line naming the folder read, `quantgate run` and how to name another."""
    from quantgate import cli

    monkeypatch.chdir(ROOT)
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(textwrap.dedent(MATRIX))
    results = tmp_path / "no-results-yet"
    args = ["report", "--matrix", str(matrix)]
    if how == "env":
        monkeypatch.setenv("QUANTGATE_RESULTS", str(results))
    else:
        results.mkdir()  # --results must name a folder that exists; this one holds nothing of the matrix
        (results / "another-model").mkdir()
        args += ["--results", str(results)]
    assert cli.main(args) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"quantgate: error: no stored results for any model of matrix.yaml in {results} (the results folder read): "
        f"`quantgate run --matrix {matrix} --qg-results {results}` (or QUANTGATE_RESULTS={results}) stores them "
        "there, or name the folder a run stored them in with --results DIR or QUANTGATE_RESULTS\n")
    assert results.exists() == (how == "option")  # a reader creates no results folder


def test_a_session_where_every_test_skipped_says_nothing_ran(project):
    """pytest exits 0 when every test skips; the plugin says no checkpoint was checked. Control: the gates of
    the same project ran, and it does not say it."""
    (project.path / "test_gates.py").unlink()  # module names must not repeat across this process's pytester runs
    project.makepyfile(test_gates_that_run=TESTS)
    assert "NOTHING RAN" not in _run(project).stdout.str()
    (project.path / "test_gates_that_run.py").unlink()
    project.makepyfile(test_all_skipped="""
        import pytest

        def test_skipped_a():
            pytest.skip("no baseline accepted yet")

        def test_skipped_b():
            pytest.skip("no GPU")
    """)
    result = _run(project)
    result.assert_outcomes(skipped=2)
    assert "quantgate: NOTHING RAN" in result.stdout.str()


def test_a_matrix_outside_the_project_finds_the_projects_thresholds(pytester: pytest.Pytester, tmp_path_factory):
    """pytest takes the folder of an existing path among its arguments as rootdir when no ini file is there,
    option values included: `--qg-matrix /elsewhere/m.yaml` made /elsewhere the rootdir, and thresholds/ was
    looked for there. Relative paths now resolve from the ini file's folder, else where pytest was started."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "m.yaml").write_text(textwrap.dedent(MATRIX))
    (pytester.path / "thresholds").mkdir()
    (pytester.path / "thresholds" / "retention.yaml").write_text(
        (ROOT / "thresholds" / "retention.yaml").read_text())
    pytester.makepyfile(test_nothing_here="def test_x():\n    pass\n")
    result = pytester.runpytest("--qg-matrix", str(elsewhere / "m.yaml"), "--collect-only", "-q",
                                "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    assert "file not found" not in result.stderr.str()
    # with a pytest ini file here, that moved rootdir would drop its testpaths and settings: refused, saying why
    (pytester.path / "pytest.ini").write_text("[pytest]\nquantgate_thresholds = thresholds/retention.yaml\n")
    result = pytester.runpytest("--qg-matrix", str(elsewhere / "m.yaml"), "--collect-only", "-q",
                                "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "Give the matrix as --qg-matrix=PATH (with '=')" in result.stderr.str()
    result = pytester.runpytest(f"--qg-matrix={elsewhere / 'm.yaml'}", "--collect-only", "-q",
                                "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()

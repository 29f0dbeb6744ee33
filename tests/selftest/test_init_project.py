"""Adoption without a fork: `quantgate init` scaffolds only the team-owned files, the regression suite comes
with the package (quantgate.suite) and is collected from a scaffolded project, and score-table snapshots are
stored in the project, not beside the installed suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quantgate import cli
from quantgate.errors import QuantgateError
from quantgate.scaffold import FILES, INSTALL_PLACEHOLDER, MATRIX_HEADER, init_project, template_text

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
# The repository files each template is (templates/ holds symlinks to them; the wheel holds their contents).
REPO_SOURCES = {
    "fixtures/demo.yaml": "fixtures/demo.yaml",
    **{f"thresholds/{n}.yaml": f"thresholds/{n}.yaml" for n in ("retention", "policy", "distribution", "perf")},
    **{f"workflows/{n}.yml": f"ci/workflows/{n}.yml" for n in ("pr-gate", "nightly", "promote")},
}
SUITE_MODULES = ["test_accuracy", "test_checkpoints", "test_distribution", "test_emulation", "test_perf",
                 "test_score_table"]


def test_templates_are_the_repository_files():
    for template, source in REPO_SOURCES.items():
        assert template_text(template) == (ROOT / source).read_text(), template
    assert set(REPO_SOURCES) | {"pytest.ini", "gitignore"} == set(FILES)


def test_init_writes_the_team_files_and_keeps_existing_ones(tmp_path, capsys):
    project = tmp_path / "team"
    assert cli.main(["init", str(project)]) == 0
    written = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file())
    assert written == sorted(FILES.values())
    matrix = (project / "fixtures" / "demo.yaml").read_text()
    assert matrix.startswith(MATRIX_HEADER) and yaml.safe_load(matrix)["models"][0]["name"] == "smollm2-135m"
    for wf in (project / ".github" / "workflows").glob("*.yml"):
        text = wf.read_text()
        # a team's workflow installs the package, not the checkout it runs in
        assert "'.[gpu]'" not in text and '".[gpu]"' not in text, wf.name
        # quantgate is not on PyPI: the default is the README's git URL, a placeholder the team sets
        assert f'default: "{INSTALL_PLACEHOLDER}"' in text, wf.name
        assert "not on PyPI" in text, wf.name
    ini = (project / "pytest.ini").read_text()
    assert "testpaths = quantgate.suite" in ini and "addopts = --pyargs" in ini
    assert "pip install -U quantgate`" not in ini and "not on PyPI" in ini
    assert "/results/" in (project / ".gitignore").read_text()
    assert "*.candidate" in (project / ".gitignore").read_text()  # a run must not leave the checkout dirty
    capsys.readouterr()

    (project / "thresholds" / "policy.yaml").write_text("# the team's own\n")
    report = init_project(project)
    assert report.written == [] and "thresholds/policy.yaml" in report.kept
    assert (project / "thresholds" / "policy.yaml").read_text() == "# the team's own\n"
    assert "thresholds/policy.yaml" in init_project(project, force=True).written
    assert (project / "thresholds" / "policy.yaml").read_text() == (ROOT / "thresholds" / "policy.yaml").read_text()

    (tmp_path / "afile").write_text("x")
    with pytest.raises(QuantgateError, match="not a directory"):
        init_project(tmp_path / "afile")


def test_readme_commands_work_in_a_scaffolded_project(tmp_path, monkeypatch, capsys):
    """`quantgate init`, then check, plan and pytest's collection of the installed suite, from the new folder
    (here quantgate comes from this checkout's src on PYTHONPATH; the report of issue 13 has the same steps
    against an installed wheel)."""
    assert cli.main(["init", str(tmp_path)]) == 0
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check"]) == 0
    assert cli.main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "fixtures/demo.yaml: 1 model(s), 6 variant(s), 2 task(s): valid" in out
    assert "retention[hellaswag]" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    assert "--tests DIR" in capsys.readouterr().out

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "QUANTGATE_RESULTS": str(tmp_path / "results")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for module in SUITE_MODULES:
        assert f"{module}.py::" in proc.stdout, module
    assert "test_accuracy.py::test_accuracy_retention[smollm2-135m/w8a8-int8-hellaswag]" in proc.stdout
    assert f"rootdir: {tmp_path}" in proc.stdout or "tests collected" in proc.stdout
    assert not (tmp_path / "results").exists()  # collecting alone leaves no results folder behind


RELOCATED_TEST = """
from quantgate.report.snapshot import per_hardware
from quantgate.report.table import Cell, Row, ScoreTable

def make(kernel):
    rows = [Row("m", "w8a8-int8", "int8", "vllm", kernel, 0.163, {"ifeval": Cell(28.9, 7.2, 80)}, (1.0, 0.9, 1.1),
                "PASS", {"retention[AVG]": "PASS"})]
    return ScoreTable("m on cpu", ["ifeval"], rows, task_info={"ifeval": {"n": 80}}, hardware_class="cpu")

def test_table(snapshot, request):
    import os
    root = request.config.rootpath / "tests" / "__snapshots__"
    assert make(os.environ["KERNEL"]) == snapshot.use_extension(per_hardware("cpu-test", root))(name="demo")
"""


def test_snapshots_of_an_installed_suite_live_in_the_project(pytester, monkeypatch):
    """A suite module outside the project (as quantgate.suite in site-packages) stores its snapshot under the
    project's tests/__snapshots__, reads it back, fails on a change, and leaves nothing beside the module."""
    installed = pytester.path / "site" / "pkg"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    (installed / "test_relocated.py").write_text(RELOCATED_TEST)
    project = pytester.path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("KERNEL", "CPUInt8ScaledMMLinearKernel")
    args = [str(installed / "test_relocated.py"), "--rootdir", str(project), "-p", "no:cacheprovider"]
    pytester.runpytest(*args, "--snapshot-update").assert_outcomes(passed=1)
    stored = project / "tests" / "__snapshots__" / "test_relocated" / "cpu-test" / "test_table[demo].json"
    assert json.loads(stored.read_text())["variants"]["w8a8-int8"]["kernel"] == "CPUInt8ScaledMMLinearKernel"
    assert not (installed / "__snapshots__").exists()
    pytester.runpytest(*args).assert_outcomes(passed=1)
    pytester.runpytest(*args, "--snapshot-update").assert_outcomes(passed=1)  # not deleted as unused
    assert stored.exists()
    monkeypatch.setenv("KERNEL", "SomethingElse")
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*kernel: stored 'CPUInt8ScaledMMLinearKernel', new 'SomethingElse'*"])


def test_the_suite_without_a_matrix_is_a_usage_error_not_a_green_run(pytester):
    # an empty folder: no fixtures/demo.yaml, no pytest.ini naming a matrix
    result = pytester.runpytest_subprocess("--pyargs", "quantgate.suite", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the quantgate regression suite needs a matrix, and there is none at "
                                 "*fixtures/demo.yaml*quantgate init*"])

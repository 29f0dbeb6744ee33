"""Variants of a later cadence (quantgate.cadence): a run at `--qg-cadence commit` deselects a nightly variant's
tests and names it in one line; nothing it reports (score table and snapshot, plan, report, history) depends on
whether a nightly run stored results for it; `--qg-cadence nightly` runs it as any other variant."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from quantgate import cli, history, verdicts
from quantgate import runner as runner_mod
from quantgate.cadence import (
    at_cadence,
    baseline_cadence_errors,
    deferred_line,
    deferred_variants,
    runs_at,
    snapshot_name,
)
from quantgate.errors import MatrixError
from quantgate.matrix import Matrix, load_matrix, load_thresholds
from quantgate.matrix_checks import check_matrix
from quantgate.report.snapshot import table_document
from tests.selftest.synthetic_store import CORRECT, MATRIX, ROOT, THRESHOLDS, stand_in_checkpoints, write_store

pytest_plugins = ["pytester"]

DEMO = ROOT / "fixtures" / "demo.yaml"
NIGHTLY_FP8 = MATRIX.replace("recipe: {scheme: FP8_DYNAMIC}}", "recipe: {scheme: FP8_DYNAMIC}, cadence: nightly}")


def test_order_is_commit_nightly_weekly():
    assert [runs_at("nightly", c) for c in ("commit", "nightly", "weekly")] == [False, True, True]
    assert [runs_at("weekly", c) for c in ("commit", "nightly", "weekly")] == [False, False, True]
    assert all(runs_at("commit", c) for c in ("commit", "nightly", "weekly"))
    with pytest.raises(MatrixError, match="cadence must be one of"):
        runs_at("hourly", "commit")


def test_the_demo_runs_fp8_dynamic_nightly_and_everything_else_at_commit():
    demo = load_matrix(DEMO)
    assert [(d.label, d.cadence) for d in deferred_variants(demo, "commit")] == [
        ("smollm2-135m/fp8-dynamic", "nightly")]
    assert deferred_variants(demo, "nightly") == []
    commit = at_cadence(demo, "commit")
    names = [v.name for v in demo.models[0].variants]
    assert [v.name for v in commit.models[0].variants] == [n for n in names if n != "fp8-dynamic"]
    assert at_cadence(demo, "nightly") is demo  # nothing left out: the matrix itself
    assert baseline_cadence_errors(demo) == []
    assert snapshot_name("demo", demo, "commit") == "demo"
    assert snapshot_name("demo", demo, "nightly") == snapshot_name("demo", demo, "weekly") == "demo-nightly"
    assert deferred_line(deferred_variants(demo, "commit"), "commit") == (
        "cadence: left out at commit cadence, each to the cadence named: smollm2-135m/fp8-dynamic (nightly); "
        "run them with --qg-cadence nightly")
    assert deferred_line([], "commit") is None


def _with_cadences(**cadences: str) -> Matrix:
    doc = load_matrix(DEMO).model_dump(exclude_unset=True)
    for v in doc["models"][0]["variants"]:
        v["cadence"] = cadences.get(v["name"], v.get("cadence", "commit"))
    return Matrix.model_validate(doc)


def test_a_baseline_later_than_its_quantized_variants_is_a_check_error_and_a_usage_error(tmp_path):
    m = _with_cadences(bf16="nightly", **{"fp8-dynamic": "weekly"})
    errors = baseline_cadence_errors(m)
    assert len(errors) == 1
    assert errors[0].startswith("models.smollm2-135m.variants.bf16: the BF16 baseline has cadence nightly, but "
                                "w8a8-int8, w4a16-g64, nvfp4-modelopt, w4a16-channel-control run at commit")
    assert "give the baseline the earliest cadence of its variants (commit" in errors[0]
    with pytest.raises(MatrixError, match="would have no baseline at --qg-cadence commit"):
        at_cadence(m, "commit")
    assert [v.name for v in at_cadence(m, "nightly").models[0].variants] == [
        v.name for v in m.models[0].variants if v.cadence != "weekly"]
    # a model all of whose variants are later is left out whole; its baseline with it
    everything_weekly = _with_cadences(**{v.name: "weekly" for v in m.models[0].variants})
    assert baseline_cadence_errors(everything_weekly) == []
    assert at_cadence(everything_weekly, "nightly").models == []
    # `quantgate check` reports it among its errors (before any lm-eval lookup could matter)
    report = check_matrix(m, tmp_path / "m.yaml", None)
    assert any("the BF16 baseline has cadence nightly" in e for e in report.errors)
    assert not any("BF16 baseline has cadence" in e for e in check_matrix(load_matrix(DEMO), DEMO, None).errors)


# ---- collection -----------------------------------------------------------------------------------------

PLUGIN_MATRIX = """
models:
  - name: m
    source: {kind: local, path: /nonexistent}
    variants:
      - {name: bf16, format: bf16}
      - {name: q, format: int8, builder: llmcompressor, recipe: {scheme: W8A8}}
      - {name: slow, format: fp8, builder: llmcompressor, recipe: {scheme: FP8_DYNAMIC}, cadence: nightly}
  - name: big
    source: {kind: local, path: /nonexistent}
    variants:
      - {name: bf16, format: bf16, cadence: weekly}
      - {name: q, format: int8, builder: llmcompressor, recipe: {scheme: W8A8}, cadence: weekly}
tasks:
  - {name: hellaswag, metric: acc_norm}
"""

PLUGIN_TESTS = """
def test_quantized(qg_variant):
    pass

def test_any(qg_any_variant):
    pass

def test_per_model(qg_model):
    pass

def test_other():
    pass
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".yaml", matrix=textwrap.dedent(PLUGIN_MATRIX))
    (pytester.path / "retention.yaml").write_text(THRESHOLDS.read_text())
    pytester.makepyfile(test_cadence_suite=PLUGIN_TESTS)
    return pytester


def _collect(project: pytest.Pytester, cadence: str) -> pytest.RunResult:
    return project.runpytest("--qg-matrix", "matrix.yaml", "--qg-thresholds", "retention.yaml",
                             "-p", "no:cacheprovider", "--qg-cadence", cadence, "-v")


def _ran(result: pytest.RunResult) -> list[str]:
    return sorted(line.split(" ")[0].removeprefix("test_cadence_suite.py::") for line in result.outlines
                  if line.startswith("test_cadence_suite.py::") and " PASSED" in line)


def test_commit_deselects_the_later_variants_tests_and_says_how_to_run_them(project):
    result = _collect(project, "commit")
    assert result.ret == 0
    assert _ran(result) == sorted([
        "test_quantized[m/q]", "test_any[m/bf16]", "test_any[m/q]", "test_per_model[m]", "test_other"])
    result.assert_outcomes(passed=5, deselected=6)  # m/slow twice; big/bf16, big/q, big/q and the model big
    assert ("quantgate cadence: left out at commit cadence, each to the cadence named: m/slow (nightly), "
            "big/bf16 (weekly), big/q (weekly); run them with --qg-cadence nightly or --qg-cadence weekly"
            ) in result.outlines


def test_nightly_runs_the_nightly_variant_as_any_other(project):
    result = _collect(project, "nightly")
    assert _ran(result) == sorted([
        "test_quantized[m/q]", "test_quantized[m/slow]", "test_any[m/bf16]", "test_any[m/q]", "test_any[m/slow]",
        "test_per_model[m]", "test_other"])
    result.assert_outcomes(passed=7, deselected=4)
    assert any("left out at nightly cadence, each to the cadence named: big/bf16 (weekly), big/q (weekly)" in line
               for line in result.outlines)
    weekly = _collect(project, "weekly")
    weekly.assert_outcomes(passed=11)
    assert not any("left out" in line for line in weekly.outlines)


def test_a_later_baseline_is_a_usage_error_before_anything_runs(project):
    (project.path / "matrix.yaml").write_text(textwrap.dedent(PLUGIN_MATRIX).replace(
        "- {name: bf16, format: bf16}", "- {name: bf16, format: bf16, cadence: nightly}", 1))
    result = _collect(project, "commit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "the BF16 baseline has cadence nightly, but q runs at commit" in "\n".join(result.errlines)


# ---- what a commit run reports, with and without stored nightly results --------------------------------

@pytest.fixture
def nightly_fp8(tmp_path, monkeypatch) -> Path:
    """synthetic_store's matrix with its fp8 variant at the nightly cadence, at tmp_path/matrix.yaml."""
    stand_in_checkpoints(tmp_path, monkeypatch)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    path = tmp_path / "matrix.yaml"
    path.write_text(NIGHTLY_FP8.replace("SOURCE", str(source)))
    monkeypatch.chdir(ROOT)
    return path


def _stores(tmp_path: Path, matrix_path: Path) -> tuple[Path, Path]:
    """Two results directories with the same commit results: `cold` without fp8's, `warm` with a nightly run's."""
    full, th = load_matrix(matrix_path), load_thresholds(THRESHOLDS)
    cold = write_store(runner_mod.Run(full, th, tmp_path / "cold"), {k: CORRECT[k] for k in ("bf16", "int8")})
    warm = write_store(runner_mod.Run(full, th, tmp_path / "warm"), CORRECT)
    return cold, warm


def test_commit_table_and_its_snapshot_are_the_same_with_or_without_stored_nightly_results(tmp_path, nightly_fp8):
    cold, warm = _stores(tmp_path, nightly_fp8)
    full, th = load_matrix(nightly_fp8), load_thresholds(THRESHOLDS)
    commit = at_cadence(full, "commit")
    docs = [table_document(verdicts.score_table(runner_mod.Run(commit, th, root, reuse_only=True), "m",
                                                partial=True)) for root in (cold, warm)]
    assert docs[0] == docs[1]
    assert list(docs[0]["variants"]) == ["bf16", "int8"]
    # the same matrix at nightly: fp8's row, from the nightly run's results
    nightly = verdicts.score_table(runner_mod.Run(at_cadence(full, "nightly"), th, warm, reuse_only=True), "m")
    assert [r.variant for r in nightly.rows] == ["bf16", "fp8", "int8"]
    # the history line of a commit run records the commit variants only
    records = [history.variant_records(runner_mod.Run(commit, th, root, reuse_only=True)) for root in (cold, warm)]
    assert list(records[0]) == list(records[1]) == ["m/bf16", "m/int8"]


def _rows(report: str) -> list[str]:
    """The variants of the printed score table's rows ("| m | bf16 (bf16) | ...")."""
    return [line.split("|")[2].split()[0] for line in report.splitlines() if line.startswith("| m |")]


def test_report_lists_the_nightly_variant_as_nightly_and_shows_it_at_nightly(tmp_path, nightly_fp8, capsys):
    cold, warm = _stores(tmp_path, nightly_fp8)
    outputs = []
    for root in (cold, warm):
        args = ["report", "--matrix", str(nightly_fp8), "--thresholds", str(THRESHOLDS), "--results", str(root),
                "--no-figures"]
        assert cli.main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("cadence: left out at commit cadence, each to the cadence named: m/fp8 "
                                 "(nightly); report them with --qg-cadence nightly\n")
    assert _rows(outputs[0]) == ["bf16", "int8"]
    assert cli.main([*args, "--qg-cadence", "nightly"]) == 0
    out = capsys.readouterr().out
    assert "left out" not in out
    assert _rows(out) == ["bf16", "fp8", "int8"]


def test_plan_plans_the_commit_variants_and_names_the_nightly_one(nightly_fp8, capsys):
    base = ["plan", str(nightly_fp8), "--thresholds", str(THRESHOLDS), "--base", "0.5", "--discordance", "0.1"]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    subjects = {line.split()[0] for line in out.splitlines() if line.startswith("m/")}
    assert subjects == {"m/bf16", "m/int8"}
    assert out.rstrip().splitlines()[-1] == ("cadence: left out at commit cadence, each to the cadence named: "
                                            "m/fp8 (nightly); plan them with --qg-cadence nightly")
    assert cli.main([*base, "--qg-cadence", "nightly"]) == 0
    out = capsys.readouterr().out
    assert {line.split()[0] for line in out.splitlines() if line.startswith("m/")} == {"m/bf16", "m/fp8", "m/int8"}
    assert "left out" not in out


def test_committed_demo_snapshots_match_the_cadence_their_name_says():
    """The demo's commit snapshots hold no fp8-dynamic row; the nightly one holds every variant."""
    demo = load_matrix(DEMO)
    folder = ROOT / "tests" / "__snapshots__" / "test_score_table"
    for cadence in ("commit", "nightly"):
        name = snapshot_name("demo", demo, cadence)
        expected = [v.name for m in at_cadence(demo, cadence).models for v in m.variants]
        for path in folder.glob(f"*/test_score_table[smollm2-135m][{name}].json"):
            stored = list(json.loads(path.read_text())["variants"])
            # an older tier's snapshot may lack variants added since (it records a candidate then), never more
            assert set(stored) <= set(expected) and stored == [v for v in expected if v in stored], path
            assert ("fp8-dynamic" in stored) == (cadence == "nightly"), path

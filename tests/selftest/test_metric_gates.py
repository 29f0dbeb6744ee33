"""Every metric of a task gets its own paired retention gate (issue 11): gate keys, test ids, the score table's
extra columns and the response counters, on real ResultStore entries with synthetic per-item samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantgate import runner as runner_mod
from quantgate import verdicts
from quantgate.errors import MatrixError
from quantgate.evaluation.provenance import versions
from quantgate.matrix import Matrix, load_thresholds
from quantgate.policy import DEFAULT_POLICY
from quantgate.report.snapshot import table_document
from tests.selftest.synthetic_store import stand_in_checkpoints

ROOT = Path(__file__).resolve().parents[2]
N = 40


def _matrix(source: Path) -> Matrix:
    return Matrix.model_validate({
        "models": [{"name": "m", "source": {"kind": "local", "path": str(source)}, "variants": [
            {"name": "bf16", "format": "bf16"},
            {"name": "int8", "format": "int8", "builder": "llmcompressor", "recipe": {"scheme": "W8A8"}},
        ]}],
        "tasks": [
            {"name": "hellaswag", "metrics": ["acc", "acc_norm"], "limit": N},
            {"name": "gsm8k", "metric": "exact_match,strict-match", "limit": N},
            {"name": "ifeval", "limit": N, "metrics": [
                {"name": "ifeval_avg", "mean_of": ["prompt_level_strict_acc", "inst_level_strict_acc"]},
                "prompt_level_strict_acc"]},
        ],
    })


def _samples(task: str, variant: str) -> list[dict]:
    rows = []
    for i in range(N):
        if task == "hellaswag":
            # acc_norm loses every 4th item in int8, acc is unchanged: only the acc_norm gate sees the loss
            rows.append({"doc_id": i, "filter": "none", "acc": float(i % 2 == 0),
                         "acc_norm": float(not (variant == "int8" and i % 4 == 0)),
                         "resps": [[[-1.0, False]]], "filtered_resps": [[-1.0, False]]})
        elif task == "gsm8k":
            cut = variant == "int8" and i % 5 == 0
            answer = "and so on and so on" if cut else f"The answer is {i}"
            for flt in ("strict-match", "flexible-extract"):
                rows.append({"doc_id": i, "filter": flt, "exact_match": float(not cut),
                             "arguments": [[f"Q{i}", {}]], "resps": [[answer]],
                             "filtered_resps": ["[invalid]" if cut else str(i)],
                             "responses": [{"answer": answer, "reasoning": None,
                                            "finish_reason": "length" if cut else "stop",
                                            "output_tokens": 256 if cut else 16}]})
        else:
            ok = [i % 3 != 0, True]
            rows.append({"doc_id": i, "filter": "none", "prompt_level_strict_acc": all(ok),
                         "inst_level_strict_acc": ok, "resps": [["text"]], "filtered_resps": ["text"]})
    return rows


@pytest.fixture
def run(tmp_path, monkeypatch):
    stand_in_checkpoints(tmp_path, monkeypatch)
    source = tmp_path / "source"
    source.mkdir()
    r = runner_mod.Run(_matrix(source), load_thresholds(ROOT / "thresholds" / "retention.yaml"),
                       tmp_path / "results", reuse_only=True)
    for variant in ("bf16", "int8"):
        vr = r.variant("m", variant)
        kernel = f"kernel-of-{variant}"
        r.server_records.put(vr.server_key(), {"kernel_path": kernel, "log": "x.log"})
        for task in r.matrix.tasks:
            r.store.put("m", variant, task.key, vr.eval_key(task, kernel), {"versions": versions()},
                        {k: 0.5 for k in task.lm_eval_metric_keys()}, _samples(task.key, variant), None)
    return r


def test_gate_keys_keep_the_first_metric_on_the_task_key(run):
    hs, gsm, ifeval = run.matrix.tasks
    assert hs.gate_keys == ["hellaswag", "hellaswag:acc_norm"]
    assert gsm.gate_keys == ["gsm8k"]
    assert ifeval.gate_keys == ["ifeval", "ifeval:prompt_level_strict_acc"]
    assert run.matrix.gate_target("hellaswag:acc_norm") == (hs, "acc_norm,none")
    assert run.matrix.gate_target("ifeval")[1] == "mean:prompt_level_strict_acc,none+inst_level_strict_acc,none"
    with pytest.raises(MatrixError, match="no metric gate 'hellaswag:acc_normx'"):
        run.matrix.gate_target("hellaswag:acc_normx")


def test_metric_labels_name_the_filter_and_must_differ(tmp_path):
    from pydantic import ValidationError

    from quantgate.matrix import Task

    t = Task(name="gsm8k", metrics=["exact_match,strict-match", "exact_match,flexible-extract"])
    assert t.gate_keys == ["gsm8k", "gsm8k:exact_match.flexible-extract"]
    with pytest.raises(ValidationError, match="share a label"):
        Task(name="hellaswag", metrics=["acc", {"name": "acc", "mean_of": ["acc", "acc_norm"]}])


def test_each_metric_has_its_own_gate_and_outcome(run):
    first = verdicts.retention_verdict(run, "m", "int8", "hellaswag")
    second = verdicts.retention_verdict(run, "m", "int8", "hellaswag:acc_norm")
    assert first.estimate.estimate == pytest.approx(1.0)  # acc: same items right
    assert second.estimate.estimate == pytest.approx(0.75)  # acc_norm: a quarter of the items lost
    assert second.outcome.value == "FAIL" and first.outcome.value != "FAIL"
    derived = verdicts.retention_verdict(run, "m", "int8", "ifeval")
    assert derived.estimate.estimate == pytest.approx(1.0)


def test_table_adds_columns_and_gates_only_for_extra_metrics(run):
    table = verdicts.score_table(run, "m")
    assert table.tasks == ["hellaswag", "hellaswag:acc_norm", "gsm8k", "ifeval", "ifeval:prompt_level_strict_acc"]
    int8 = table.rows[1]
    assert int8.cells["hellaswag:acc_norm"].score == pytest.approx(75.0)
    assert int8.gates["retention[hellaswag:acc_norm]"] == "FAIL"
    assert {"retention[hellaswag]", "retention[gsm8k]", "retention[ifeval]",
            "retention[ifeval:prompt_level_strict_acc]", "retention[AVG]"} <= set(int8.gates)
    doc = table_document(table)
    assert doc["tasks"]["hellaswag:acc_norm"]["metric"] == "acc_norm,none"
    assert doc["tasks"]["gsm8k"] == {"metric": "exact_match,strict-match", "n": N, "num_fewshot": 0, "gated": True}
    # the AVG is over each task's first metric only: hellaswag acc (50), gsm8k, ifeval's derived metric
    base = table.rows[0]
    expected = (base.cells["hellaswag"].score + base.cells["gsm8k"].score + base.cells["ifeval"].score) / 3
    assert base.average(table.avg_columns) == pytest.approx(expected)
    assert f"| {expected:.1f} |" in table.render()


def test_counters_in_the_table_beside_the_baseline(run):
    table = verdicts.score_table(run, "m")
    int8, bf16 = table.rows[1].counters["gsm8k"], table.rows[0].counters["gsm8k"]
    assert (int8.length, int8.unparsed, int8.mean_tokens) == (0.2, 0.2, pytest.approx(0.2 * 256 + 0.8 * 16))
    assert (bf16.length, bf16.unparsed, bf16.mean_tokens) == (0.0, 0.0, 16.0)
    assert "hellaswag" not in table.rows[0].counters  # loglikelihood: no generated text
    text = table.render()
    assert "| int8 (int8) | len 20% · empty 0% · invalid 20% · 64 tok (len 0% · empty 0% · invalid 0% · 16 tok)" \
        in text
    assert "counters" not in table_document(table)["context"]  # not part of the snapshot


def test_policy_tier_of_an_extra_metric_follows_its_task():
    policy = DEFAULT_POLICY.model_copy(
        update={"tiers": {"hellaswag": "critical", "retention[gsm8k]": "advisory"}, "default_tier": "supporting"})
    assert policy.tier("retention[hellaswag:acc_norm]") == "critical"
    assert policy.tier("retention[gsm8k:exact_match.flexible-extract]") == "advisory"
    assert policy.tier("retention[ifeval:x]") == policy.default_tier


class _Items:
    def __init__(self) -> None:
        self.ids: list[str] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.ids = [item.name for item in session.items]


def test_collected_ids_one_per_metric_first_unchanged(tmp_path):
    """`qg_task` is parametrized per metric: the first metric keeps the task's id, the others add `:label`."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (tmp_path / "matrix.yaml").write_text(f"""
models:
  - name: m
    source: {{kind: local, path: {source}}}
    variants:
      - {{name: bf16, format: bf16}}
      - {{name: int8, format: int8, builder: llmcompressor, recipe: {{scheme: W8A8}}}}
tasks:
  - {{name: hellaswag, metrics: [acc, acc_norm]}}
  - {{name: gsm8k, metric: "exact_match,strict-match"}}
""")
    (tmp_path / "test_metric_ids_suite.py").write_text("def test_retention(qg_variant, qg_task):\n    pass\n")
    got = _Items()
    code = pytest.main(
        [str(tmp_path / "test_metric_ids_suite.py"), "--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), "--qg-matrix", str(tmp_path / "matrix.yaml"),
         "--qg-thresholds", str(ROOT / "thresholds" / "retention.yaml")],
        plugins=[got],
    )
    assert code == 0
    assert got.ids == ["test_retention[m/int8-hellaswag]", "test_retention[m/int8-hellaswag:acc_norm]",
                       "test_retention[m/int8-gsm8k]"]


def test_policy_may_name_an_extra_metric_gate_and_check_knows_it(run):
    from quantgate.matrix_checks import policy_coverage_warnings
    from quantgate.policy import Policy

    policy = Policy.model_validate({**DEFAULT_POLICY.model_dump(), "tiers": {
        "retention[hellaswag:acc_norm]": "critical", "retention[hellaswag:nope]": "critical"}})
    assert policy.tier("retention[hellaswag:acc_norm]") == "critical"
    problems = policy_coverage_warnings(run.matrix, policy, None)
    assert any("no metric gate 'hellaswag:nope'" in p for p in problems), problems
    assert not any("critical retention[hellaswag:acc_norm]" in p for p in problems), problems

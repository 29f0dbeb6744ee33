"""The run history and the trend: three synthetic runs over a real result store (the INT8 variant loses items in
the third), each judged by the real gates and appended by quantgate.history; the trend reads them back, marks
the gate that changed outcome and the first drop, and draws the plot."""

from __future__ import annotations

import json

import pytest

from quantgate import history, verdicts
from quantgate.cli import main as cli_main
from quantgate.errors import QuantgateError
from quantgate.gates.outcome import Gate
from quantgate.policy import load_policy
from quantgate.run_verdict import summarize
from tests.selftest.synthetic_store import CORRECT, ROOT, make_run, write_store  # noqa: F401 - fixture

POLICY = load_policy(ROOT / "thresholds" / "policy.yaml")


def judged_run(run) -> dict:  # noqa: ANN001 - a reading quantgate.runner.Run
    """What `quantgate run` appends: the gates judged on the stored results, the verdict, the records."""
    gates = []
    for v in ("fp8", "int8"):
        for name, judgement in (
            ("retention[hellaswag]", verdicts.retention_verdict(run, "m", v, "hellaswag")),
            ("retention[AVG]", verdicts.average_retention_verdict(run, "m", v)),
        ):
            gates.append(Gate(name, f"m/{v}", POLICY.tier(name), judgement.outcome, judgement.parameters,
                              judgement.message()))
    verdict = summarize(gates, POLICY, "nightly")
    return history.run_entry(verdict, exit_code=verdict.exit_code, variants=history.variant_records(run),
                             hardware=run.hw.as_dict(), cadence="nightly")


@pytest.fixture
def three_runs(tmp_path, make_run):  # noqa: F811 - the imported fixture
    results = tmp_path / "results"
    dropped = [1, 0, 0, 0] * 10  # 10/40 where BF16 has 30/40: a loss no interval can hide
    for int8 in (CORRECT["bf16"], CORRECT["bf16"], dropped):
        write_store(make_run(results, reuse_only=False), {**CORRECT, "int8": int8})
        history.append_entry(results, judged_run(make_run(results)))
    return results


def test_each_run_appends_one_line_with_gates_and_pointers(three_runs):
    lines = history.history_path(three_runs).read_text().splitlines()
    assert len(lines) == 3
    entries = [json.loads(x) for x in lines]
    last = entries[-1]
    assert last["schema"] == history.SCHEMA and last["cadence"] == "nightly"
    assert {"commit", "dirty"} <= set(last["git"]) and "vllm" in last["versions"] and last["hardware"]["hw_class"]
    outcomes = {(g["subject"], g["name"]): g["outcome"] for g in last["gates"]}
    assert outcomes[("m/int8", "retention[hellaswag]")] == "FAIL"
    # identical to BF16 on 40 items: no evidence of loss (PASS or, at this n, INCONCLUSIVE), never FAIL
    assert outcomes[("m/fp8", "retention[hellaswag]")] in ("PASS", "INCONCLUSIVE")
    # pointers resolve to the store entries the scores came from
    for subject, record in last["variants"].items():
        for task, rel in record["results"].items():
            assert (three_runs / rel / "samples.jsonl").exists(), (subject, task, rel)
    assert last["variants"]["m/int8"]["scores"]["hellaswag"][0] == pytest.approx(25.0)
    assert entries[0]["variants"]["m/int8"]["retention"][0] == pytest.approx(1.0)


def test_trend_marks_the_gate_change_and_the_first_drop(three_runs):
    entries = history.read_history(history.history_path(three_runs))
    series = history.trend(entries)
    int8, fp8 = series["m/int8"], series["m/fp8"]
    assert [p.run for p in int8] == [0, 1, 2]
    before = int8[1].gates["retention[hellaswag]"]
    assert before in ("PASS", "INCONCLUSIVE")
    assert (2, "retention[hellaswag]", before, "FAIL") in history.gate_changes(int8)
    assert history.first_drop(int8) == 2
    assert history.gate_changes(fp8) == [] and history.first_drop(fp8) is None
    text = history.render_trend(entries)
    int8_lines = text.split("m/int8\n")[1].splitlines()
    assert "DROP" in int8_lines[2] and f"retention[hellaswag]: {before} -> FAIL" in int8_lines[2]
    assert "DROP" not in int8_lines[1] and "retention 100.0%" in int8_lines[0]


def test_trend_plot_has_one_series_per_quantized_variant(three_runs, capsys):
    """The PNG is written (by the CLI too), and its series, read back from the figure's axes, are the quantized
    variants with one point per run; the third run's INT8 point is the drop."""
    pytest.importorskip("matplotlib", reason="the trend plot needs matplotlib (pip install matplotlib)")
    from matplotlib import image

    from quantgate.report import plots

    entries = history.read_history(history.history_path(three_runs))
    png = history.plot_trend(entries, three_runs / "trend.png")
    assert image.imread(png).shape[:2] > (200, 300)
    ax = plots.trend_figure(entries).axes[0]
    series = {c.get_label(): c.lines[0] for c in ax.containers if c.get_label().startswith("m/")}
    assert sorted(series) == ["m/fp8", "m/int8"]
    assert list(series["m/int8"].get_xdata()) == [0, 1, 2]
    y = series["m/int8"].get_ydata()
    assert y[0] == pytest.approx(100.0) and y[2] < 50
    assert "run" in ax.get_xlabel() and "retention" in ax.get_ylabel()
    assert cli_main(["trend", "--results", str(three_runs), "--png", str(three_runs / "cli.png")]) == 0
    out = capsys.readouterr().out
    assert "m/int8" in out and "DROP" in out and (three_runs / "cli.png").stat().st_size > 1000


def test_a_bad_history_line_is_named(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"schema": "quantgate-history/1"}\nnot json\n')
    with pytest.raises(QuantgateError, match=r"history.jsonl:2: not a JSON line"):
        history.read_history(path)
    with pytest.raises(QuantgateError, match="no run history"):
        history.read_history(tmp_path / "none.jsonl")

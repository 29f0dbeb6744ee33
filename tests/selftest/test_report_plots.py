"""The report's figures (quantgate.report.plots) and page (quantgate.report.document), drawn from a synthetic
result store judged by the real gates: the images exist, their axes hold the expected series, labels and
legends, the size axis reads GB, every figure carries its provenance, and a nightly-style history of three runs
renders its trend plot. `quantgate report` writes them beside the table; the job summary links them."""

from __future__ import annotations

import argparse

import pytest

from quantgate import history, verdicts
from quantgate.cli import _figure_links
from quantgate.cli import main as cli_main
from quantgate.report import plots
from quantgate.report.document import REPORT_FILE, retention_bars, write_report
from quantgate.report.job_summary import JunitRun, markdown
from quantgate.run_verdict import summarize
from tests.selftest.synthetic_store import CORRECT, THRESHOLDS, make_run, write_store  # noqa: F401 - fixture
from tests.selftest.test_history import POLICY, judged_run

pytest.importorskip("matplotlib", reason="the report's figures need matplotlib (a dependency of quantgate)")

DROPPED = [1, 0, 0, 0] * 10  # INT8 right on 10 of 40 items where BF16 is right on 30: a loss beyond noise
# stand-in checkpoint sizes in bytes: BF16 the largest, as a real BF16 checkpoint is
SIZES = {"bf16": 4_000_000, "fp8": 2_000_000, "int8": 1_000_000}


@pytest.fixture
def nightly(tmp_path, make_run):  # noqa: F811 - the imported fixture
    """Three nightly runs over one results directory, each appended to its history; INT8 drops in the third."""
    results = tmp_path / "results"
    for int8 in (CORRECT["bf16"], CORRECT["bf16"], DROPPED):
        write_store(make_run(results, reuse_only=False), {**CORRECT, "int8": int8})
        history.append_entry(results, judged_run(make_run(results)))
    for name, size in SIZES.items():  # stand-in weights, so that sizes differ (Checkpoint.size_bytes)
        (tmp_path / "ckpt" / name / "model.safetensors").write_bytes(b"\0" * size)
    return results


def legend_labels(ax) -> list[str]:  # noqa: ANN001 - a matplotlib Axes
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_pareto_plot_has_avg_and_each_task_against_size_in_gb(nightly, make_run):  # noqa: F811
    table = verdicts.score_table(make_run(nightly), "m", partial=True)
    fig = plots.pareto_figure(table)
    ax = fig.axes[0]
    assert "GB" in ax.get_xlabel()
    assert sorted(legend_labels(ax)) == ["AVG", "Pareto frontier (AVG)", "gsm8k", "hellaswag"]
    avg = next(line for line in ax.lines if line.get_label() == "AVG")
    assert sorted(avg.get_xdata()) == pytest.approx(sorted(s / 1e9 for s in SIZES.values()))
    by_size = dict(zip(avg.get_xdata(), avg.get_ydata(), strict=True))
    assert by_size[SIZES["int8"] / 1e9] == pytest.approx(25.0)  # (25 hellaswag + 25 gsm8k) / 2, dropped
    assert by_size[SIZES["bf16"] / 1e9] == pytest.approx(75.0)
    # each task's series is an errorbar container with one point per variant
    tasks = {c.get_label(): c for c in ax.containers}
    assert set(tasks) == {"hellaswag", "gsm8k"} and all(len(c.lines[0].get_xdata()) == 3 for c in tasks.values())
    # FP8 (75 at 2 MB) beats BF16 (75 at 4 MB) on size; INT8 is smallest: all three but BF16 on the frontier
    front = next(line for line in ax.lines if line.get_label() == "Pareto frontier (AVG)")
    assert list(front.get_xdata()) == pytest.approx([SIZES["int8"] / 1e9, SIZES["fp8"] / 1e9])
    footer = fig.get_supxlabel()
    assert "versions:" in footer and "vllm" in footer and "kernels:" in footer and "hellaswag=40" in footer
    assert "hardware:" in footer


def test_retention_bars_with_intervals_floors_and_outcomes(nightly, make_run):  # noqa: F811
    run = make_run(nightly)
    table = verdicts.score_table(run, "m", partial=True)
    bars = retention_bars(run, table)
    assert {(b.variant, b.gate) for b in bars} == {(v, g) for v in ("fp8", "int8") for g in ("AVG", "hellaswag")}
    fig = plots.retention_figure(bars, table.title, plots.provenance(table))
    ax = fig.axes[0]
    assert sorted(legend_labels(ax)) == ["AVG", "floor", "hellaswag"]
    patches = {c.get_label(): c.patches for c in ax.containers if hasattr(c, "patches")}
    assert {k: len(v) for k, v in patches.items()} == {"AVG": 2, "hellaswag": 2}
    int8 = next(b for b in bars if b.variant == "int8" and b.gate == "hellaswag")
    assert int8.outcome == "FAIL" and int8.high < int8.floor
    # the bar's height is the estimate, its colour the outcome, and the floor's tick sits at the floor
    from matplotlib.colors import to_rgba

    bar = patches["hellaswag"][1]
    assert bar.get_height() == pytest.approx(100 * int8.estimate)
    assert bar.get_facecolor()[:3] == pytest.approx(to_rgba(plots.OUTCOME_COLORS["FAIL"])[:3])
    floors = next(c for c in ax.collections if c.get_label() == "floor")
    assert sorted({round(seg[0][1], 6) for seg in floors.get_segments()}) == sorted(
        {round(100 * b.floor, 6) for b in bars})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp8", "int8"]
    assert "retention" in ax.get_ylabel() and "versions:" in fig.get_supxlabel()


def test_distribution_plot_has_kl_and_top1_panels_with_limits():
    points = [
        plots.DistributionPoint("fp8", "kl", 0.002, 0.0015, 0.0025, 0.01, "PASS", 64),
        plots.DistributionPoint("int4", "kl", 0.40, 0.35, 0.45, 0.2, "FAIL", 64),
        plots.DistributionPoint("fp8", "top1_agree", 0.97, 0.96, 0.98, 0.9, "PASS", 64),
        plots.DistributionPoint("int4", "top1_agree", 0.85, 0.83, 0.87, None, "NOT_GATED", 64),
    ]
    fig = plots.distribution_figure(points, "m on cpu", "hardware: x; versions: vllm 0; kernels: k; n: 64")
    kl, top1 = fig.axes
    assert "KL" in kl.get_xlabel() and "top-1" in top1.get_xlabel()
    assert [len(ax.containers) for ax in (kl, top1)] == [2, 2]  # one interval per variant
    # dashed limit marks: both KL ceilings, one top-1 floor (int4's is not gated)
    assert [sorted({x for line in ax.lines if line.get_linestyle() == "--" for x in line.get_xdata()})
            for ax in (kl, top1)] == [[0.01, 0.2], [0.9]]
    assert [t.get_text() for t in kl.get_yticklabels()] == ["fp8 (PASS, n=64)", "int4 (FAIL, n=64)"]
    assert kl.containers[1].lines[0].get_xdata()[0] == pytest.approx(0.40)
    assert "versions: vllm 0" in fig.get_supxlabel()
    with pytest.raises(Exception, match="no distribution metrics"):
        plots.distribution_figure([], "m", "")


def test_nightly_history_of_three_runs_renders_its_trend(nightly):
    entries = history.read_history(history.history_path(nightly))
    assert len(entries) == 3 and {e["cadence"] for e in entries} == {"nightly"}
    fig = plots.trend_figure(entries)
    ax = fig.axes[0]
    series = {c.get_label(): c.lines[0] for c in ax.containers}
    assert sorted(series) == ["m/fp8", "m/int8"]
    assert [list(s.get_xdata()) for s in series.values()] == [[0, 1, 2], [0, 1, 2]]
    assert legend_labels(ax) == ["m/fp8", "m/int8"]
    red = (1.0, 0.0, 0.0)
    drop = [c for c in ax.collections if len(c.get_offsets()) == 1 and c.get_offsets()[0][0] == 2
            and red in {tuple(x[:3]) for x in [*c.get_facecolor(), *c.get_edgecolor()]}]
    assert drop, "the first drop (run 2 of INT8) is marked"
    assert "3 runs" in fig.get_supxlabel() and "vllm" in fig.get_supxlabel()
    png = plots.save(fig, nightly / "trend.png")
    assert png.stat().st_size > 10_000


def test_quantgate_report_writes_the_figures_beside_the_table(nightly, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["report", "--matrix", str(tmp_path / "matrix.yaml"), "--thresholds", str(THRESHOLDS),
            "--results", str(nightly), "--out", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| m | int8 (int8)" in printed and f"report: {out / REPORT_FILE} (3 figures)" in printed
    assert "(no distribution-m figure: no distribution metrics" in printed  # the matrix has no distribution:
    page = (out / REPORT_FILE).read_text()
    for name in ("pareto-m", "retention-m", "trend"):
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert f"]({name}.png)" in page
    assert "| m | int8 (int8)" in page and "distribution metrics" in page and "not drawn" in page


def test_job_summary_links_the_figures(nightly, tmp_path, make_run):  # noqa: F811
    write_report(make_run(nightly), nightly / "report", history_entries=history.read_history(
        history.history_path(nightly)))
    args = argparse.Namespace(results=str(nightly), report_url="https://example.invalid/artifacts/42")
    links = _figure_links(args)
    assert links["trend.png"] == "https://example.invalid/artifacts/42/trend.png"
    assert set(links) == {"report.md", "pareto-m.png", "retention-m.png", "trend.png"}
    verdict = summarize([], POLICY, "nightly")
    text = markdown(verdict, JunitRun([], {}), [], figures=links)
    assert "### Figures" in text and "- [retention-m.png](https://example.invalid/artifacts/42/retention-m.png)" in text
    assert _figure_links(argparse.Namespace(results=str(nightly), report_url=None))["trend.png"] == "report/trend.png"

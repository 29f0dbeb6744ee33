"""The pure parts of benchmarks/server_levers.py: request phase, flips, ratios, the lever table, /metrics
parsing and the cProfile package grouping. The benchmark itself runs real servers and is not a test."""

from __future__ import annotations

import cProfile
import importlib.util
import json
import os
import pstats
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def levers():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("server_levers", ROOT / "benchmarks" / "server_levers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["server_levers"] = mod  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("server_levers", None)


def test_request_phase_spans_first_sent_to_last_done(levers) -> None:
    spans = [levers.Span(2.0, 5.0), levers.Span(1.5, 3.0), levers.Span(4.0, 7.5)]
    assert levers.request_phase(spans) == (1.5, 7.5)
    with pytest.raises(ValueError, match="no request"):
        levers.request_phase([])


def test_flips_count_direction_and_missing_items(levers) -> None:
    base = {"0": 1.0, "1": 0.0, "2": 1.0, "3": 0.0}
    other = {"0": 1.0, "1": 1.0, "2": 0.0, "4": 1.0}
    assert levers.flips(base, other) == {"n": 3, "flips": 2, "worse": 1, "better": 1, "missing": 2}
    assert levers.flips(base, base)["flips"] == 0
    assert levers.differing({"0": "a", "1": "b"}, {"0": "a", "1": "c"}) == 1


def test_ratios_are_offline_seconds_over_server_seconds(levers) -> None:
    run = {"items": 400, "call_s": 20.0, "request_s": 8.0}
    q = levers.ratios(run, offline_seconds=7.2)
    assert q["items_per_s"] == pytest.approx(20.0)
    assert q["request_ratio"] == pytest.approx(0.9)
    assert q["e2e_ratio"] == pytest.approx(0.36)
    assert levers.ratios(run, None)["e2e_ratio"] is None


def test_lever_table_rows_flips_against_the_first_baseline(levers) -> None:
    def run(lever: str, outcomes: dict[str, float], call_s: float) -> dict:
        return {"lever": lever, "items": len(outcomes), "call_s": call_s, "request_s": call_s - 3, "before_s": 2.0,
                "after_s": 1.0, "outcomes": outcomes, "answers": {k: str(v) for k, v in outcomes.items()}}

    runs = [run("baseline", {"0": 1.0, "1": 0.0}, 10.0), run("baseline (repeat)", {"0": 1.0, "1": 1.0}, 11.0),
            {"lever": "concurrency 256", "error": "StepTimeout: timed out after 240 s"}]
    table = levers.lever_table("gsm8k", runs, {"items": 2, "engine_s": 5.0})
    lines = table.splitlines()
    assert lines[2].startswith("| lever | items | items/s | request phase s | request-phase ratio | end-to-end ratio")
    assert "| baseline | 2 | 0.2 | 7.00 | 0.71 | 0.50 | 2.00 / 1.00 | (reference) | — |" in lines
    assert "| baseline (repeat) | 2 | 0.2 | 8.00 | 0.62 | 0.45 | 2.00 / 1.00 | 1 / 2 (0 worse, 1 better) | 1 |" in lines
    assert any("StepTimeout" in line for line in lines)
    assert "no offline reference" in levers.lever_table("gsm8k", runs[:1], None)


def test_parse_metrics_sums_label_sets_and_delta(levers) -> None:
    text = "\n".join([
        "# HELP vllm:request_prefill_time_seconds Histogram",
        "# TYPE vllm:request_prefill_time_seconds histogram",
        'vllm:request_prefill_time_seconds_sum{engine="0",model_name="bf16"} 1.5',
        'vllm:request_prefill_time_seconds_sum{engine="1",model_name="bf16"} 0.5',
        'vllm:request_prefill_time_seconds_count{engine="0",model_name="bf16"} 4',
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="bf16"} 3',
        "",
    ])
    m = levers.parse_metrics(text)
    assert m["vllm:request_prefill_time_seconds_sum"] == pytest.approx(2.0)
    assert m["vllm:prompt_tokens_total"] == 0.0  # absent counters read as 0, so a delta is defined
    assert levers.parse_metrics(text, ("vllm:num_requests_running",)) == {"vllm:num_requests_running": 3.0}
    assert levers.delta({"a": 1.0}, {"a": 3.5, "b": 2.0}) == {"a": 2.5, "b": 2.0}


def test_by_package_groups_self_time_and_sums_to_the_total(levers) -> None:
    prof = cProfile.Profile()
    prof.enable()
    json.loads(json.dumps({"k": list(range(2000))}))
    prof.disable()
    stats = pstats.Stats(prof)
    groups = dict(levers.by_package(stats))
    assert "stdlib:json" in groups
    assert sum(groups.values()) == pytest.approx(stats.total_tt, rel=1e-6)
    assert levers._package("/x/lib/python3.11/site-packages/aiohttp/client.py") == "aiohttp"
    assert levers._package("~") == "builtins"


def test_plan_keeps_baseline_and_only_the_asked_levers(levers) -> None:
    args = levers.argparse.Namespace(batch_sizes=[1, 64], concurrencies=[256], api_server_count=4,
                                     prefix_caching_tasks=["hellaswag"], levers=["batch", "prefix"])
    plan = levers.plan(args)
    assert [name for name, *_ in plan] == ["base", "prefix"]
    assert [lv.name for lv in plan[0][3]] == ["baseline", "baseline (repeat)", "1 prompt(s) per request",
                                              "64 prompt(s) per request"]
    assert plan[1][3][0].tasks == ("hellaswag",)
    plan = levers.plan(levers.argparse.Namespace(
        batch_sizes=[], concurrencies=[], api_server_count=4, prefix_caching_tasks=[],
        levers=["api-servers", "workaround-off"]))
    assert [(name, options) for name, _, options, _ in plan] == [
        ("base", {}), ("api4", {"api_server_count": 4}),
        ("api4-nofix", {"api_server_count": 4, "env": {"VLLM_MSGPACK_ZERO_COPY_THRESHOLD": "256"}})]
    with pytest.raises(levers.argparse.ArgumentTypeError, match="TASK=N"):
        levers._kv(["mmlu=3"])
    assert levers._kv(["gsm8k=8", "hellaswag=all"]) == {"gsm8k": 8, "hellaswag": 0}


@pytest.mark.parametrize("script", ["client_cost.py", "fixed_cost.py"])
def test_the_benchmarks_built_on_server_levers_import_it_when_run_as_scripts(script, tmp_path) -> None:
    """Run from anywhere (here tmp_path), `python benchmarks/<script>` imports server_levers as its sibling."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: {script}")

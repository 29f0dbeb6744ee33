"""Performance budgets of every variant (`pytest -m perf`): serving latency and throughput measured with
`vllm bench serve` against the suite's own server, the server's memory and KV-cache capacity, and the
checkpoint's size. Budgets live in perf.yaml beside the thresholds file (thresholds/perf.yaml); relative
budgets compare with the model's BF16 baseline measured on this machine in this session.

Collected always, run only when selected: without `-m perf` each test skips at once, so the accuracy suite
never pays for benchmarking.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from quantgate.engines.hardware import detect
from quantgate.errors import MatrixError
from quantgate.perf.budgets import (
    BudgetVerdict,
    PerfConfig,
    evaluate_budget,
    load_perf,
)
from quantgate.perf.serve_bench import (
    BenchRound,
    ServingMetrics,
    kv_cache_capacity,
    model_memory,
    run_serving_benchmark,
    server_memory,
)
from quantgate.plugin import STASH
from quantgate.runner import Run, VariantRun
from quantgate.suite._support import runnable

pytestmark = [pytest.mark.perf]
PERF_FILE = "perf.yaml"


def _perf_path(config: pytest.Config) -> Path:
    qs = config.stash.get(STASH, None)
    base = qs.thresholds_path.parent if qs is not None else Path(config.rootpath) / "thresholds"
    return base / PERF_FILE


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "perf_concurrency" not in metafunc.fixturenames:
        return
    try:
        levels = load_perf(_perf_path(metafunc.config)).workload_for(detect().hw_class).concurrency
    except MatrixError:
        # A broken perf.yaml must not break collection of the accuracy suite; the perf_config fixture
        # raises the full error when a perf test actually runs.
        levels = [0]
    metafunc.parametrize("perf_concurrency", levels, ids=[f"c{c}" for c in levels])


def _only_with_m_perf(request: pytest.FixtureRequest) -> None:
    # Markers cannot deselect by default, so each test skips itself unless `-m` selects perf.
    if "perf" not in (request.config.getoption("-m") or ""):
        pytest.skip("perf budgets run with -m perf")


@pytest.fixture(scope="session")
def perf_config(request: pytest.FixtureRequest) -> PerfConfig:
    _only_with_m_perf(request)  # before reading perf.yaml: a default run must not fail on a perf-only file
    try:
        return load_perf(_perf_path(request.config))
    except MatrixError as exc:
        raise pytest.UsageError(str(exc)) from None


# ---- per-session cache on the Run: the BF16 baseline's numbers for relative budgets -------------------

def _cache(run: Run) -> dict[Any, Any]:
    cache = getattr(run, "_perf", None)
    if cache is None:
        cache = {}
        run._perf = cache  # type: ignore[attr-defined]
    return cache


def _out_dir(qg_session, vr: VariantRun) -> Path:
    """Raw `vllm bench serve` JSON and logs, one folder per session, kept beside the results."""
    stamp = _cache(vr.run).setdefault("stamp", time.strftime("%Y%m%dT%H%M%S"))
    return qg_session.results / "_perf" / stamp / f"{vr.model.name}__{vr.variant.name}"


def _measure_serving(qg_session, vr: VariantRun, cfg: PerfConfig, concurrency: int,
                     benchmark=None) -> list[ServingMetrics]:
    """`rounds` rounds at one concurrency level. Every variant gets the same seeds, hence the same prompts;
    the seed differs per round and per level, because vLLM caches prefixes and a repeated prompt would time
    a cache hit instead of a prefill."""
    cache = _cache(vr.run)
    key = ("serving", vr.model.name, vr.variant.name, concurrency)
    if key in cache:
        return cache[key]
    w = cfg.workload_for(vr.run.hw.hw_class)
    server = vr.ensure_server()
    out = _out_dir(qg_session, vr)
    rounds: list[ServingMetrics] = []

    def one_round() -> None:
        t0 = time.monotonic()
        workload = BenchRound(concurrency, w.input_len, w.output_len, w.num_prompts, w.warmups,
                              seed=1000 * concurrency + len(rounds))
        rounds.append(run_serving_benchmark(
            server.base_url, server.served_name, vr.served_checkpoint().path, workload, out_dir=out,
            api_key=server.api_key, trust_remote_code=vr.model.trust_remote_code,
        ))
        vr.run.events.seconds["benchmark"] += time.monotonic() - t0  # its own line in the suite-cost split

    if benchmark is not None:
        benchmark.pedantic(one_round, rounds=w.rounds, iterations=1, warmup_rounds=0)
    # pytest-benchmark runs the target once when disabled (--benchmark-disable, xdist): finish the rounds.
    while len(rounds) < w.rounds:
        one_round()
    cache[key] = rounds[: w.rounds]
    return cache[key]


def _baseline(vr: VariantRun) -> VariantRun:
    return vr.run.variant(vr.model.name, vr.model.baseline.name)


def _needs_baseline(verdict_inputs: list) -> bool:
    return any(b.relative_to_bf16 for b in verdict_inputs)


def _report(verdicts: list[BudgetVerdict], what: str) -> None:
    for v in verdicts:
        print(v.message())
    failed = [v for v in verdicts if not v.skipped and not v.passed]
    if failed:
        pytest.fail("\n".join(v.message() for v in failed), pytrace=False)
    if all(v.skipped for v in verdicts):
        reasons = "; ".join(v.reason for v in verdicts) or f"no {what} budget in perf.yaml"
        pytest.skip(reasons)


def _applicable(cfg: PerfConfig, kinds: tuple[str, ...], vr: VariantRun, concurrency: int | None = None):
    hw = vr.run.hw.hw_class
    return [b for b in cfg.budgets_for(kinds)
            if b.applies(hw_class=hw, fmt=vr.variant.format, model=vr.model.name, concurrency=concurrency)
            is None]


def _skip_emulated(vr: VariantRun) -> None:
    if vr.support.engine == "emulated":
        pytest.skip(f"{vr.label} is emulated here ({vr.support.reason}): the server runs a dequantized BF16 "
                    f"checkpoint, whose speed and memory say nothing about {vr.variant.format}")


def test_serving_budgets(request, qg_session, qg_run, qg_any_variant, perf_concurrency, perf_config,
                         benchmark):
    """TTFT, TPOT, ITL (p50, p99), output tokens/s and requests/s at one concurrency level."""
    _only_with_m_perf(request)
    model, variant = qg_any_variant
    vr = runnable(qg_run, model, variant)
    _skip_emulated(vr)
    rounds = _measure_serving(qg_session, vr, perf_config, perf_concurrency, benchmark)
    workload = perf_config.workload_for(qg_run.hw.hw_class)
    benchmark.extra_info.update({
        "model": model, "variant": variant, "format": vr.variant.format, "hardware": qg_run.hw.hw_class,
        "workload": {**workload.model_dump(), "concurrency": perf_concurrency},
        "rounds": [m.as_dict() for m in rounds],
    })
    budgets = perf_config.budgets_for(("serving",))
    baseline_rounds: list[ServingMetrics] | None = None
    if vr.variant.format != "bf16" and _needs_baseline(_applicable(perf_config, ("serving",), vr,
                                                                    perf_concurrency)):
        baseline_rounds = _measure_serving(qg_session, _baseline(vr), perf_config,
                                           perf_concurrency)
        vr.ensure_server()  # measuring the baseline here stopped this variant's server; later tests reuse it
    verdicts = [
        evaluate_budget(
            b, [m.value(b.metric) for m in rounds],
            [m.value(b.metric) for m in baseline_rounds] if baseline_rounds else None,
            label=f"{vr.label} c={perf_concurrency}", hw_class=qg_run.hw.hw_class, fmt=vr.variant.format,
            model=model, concurrency=perf_concurrency,
        )
        for b in budgets
    ]
    benchmark.extra_info["verdicts"] = [v.message() for v in verdicts]
    _report(verdicts, "serving")


def _memory(vr: VariantRun) -> dict[str, Any]:
    cache = _cache(vr.run)
    key = ("memory", vr.model.name, vr.variant.name)
    if key not in cache:
        server = vr.ensure_server()
        assert server.proc is not None
        mem = server_memory(server.proc.pid)
        kv = kv_cache_capacity(server.log_text())
        model = model_memory(server.log_text(), mem["pss_bytes"])
        cache[key] = {
            "server_rss_bytes": mem["rss_bytes"], "server_pss_bytes": mem["pss_bytes"],
            "gpu_memory_used_bytes": mem["gpu_memory_used_bytes"],
            "model_memory_bytes": model.get("model_memory_bytes"),
            "kv_cache_tokens": kv.get("kv_cache_tokens"),
            "detail": {**mem, **kv, **model},
        }
    return cache[key]


def test_memory_budgets(request, qg_run, qg_any_variant, perf_config):
    """Server memory (whole process tree; GPU memory in use) and the KV-cache capacity vLLM logged.
    Measured after the serving rounds where they ran, so the numbers include a loaded KV cache."""
    _only_with_m_perf(request)
    model, variant = qg_any_variant
    vr = runnable(qg_run, model, variant)
    _skip_emulated(vr)
    measured = _memory(vr)
    base = None
    if vr.variant.format != "bf16" and _needs_baseline(_applicable(perf_config, ("memory",), vr)):
        base = _memory(_baseline(vr))
        vr.ensure_server()
    print(f"{vr.label}: {measured['detail']}")
    verdicts = [
        evaluate_budget(
            b, [measured[b.metric]] if measured[b.metric] is not None else [],
            [base[b.metric]] if base and base[b.metric] is not None else None,
            label=vr.label, hw_class=qg_run.hw.hw_class, fmt=vr.variant.format, model=model,
        )
        for b in perf_config.budgets_for(("memory",))
    ]
    _report(verdicts, "memory")


def test_checkpoint_size_budget(request, qg_run, qg_any_variant, perf_config):
    """Bytes on disk of the variant's own checkpoint (not an emulation's BF16 form); BF16 bytes / those."""
    _only_with_m_perf(request)
    model, variant = qg_any_variant
    vr = qg_run.variant(model, variant)
    size = vr.checkpoint().size_bytes
    base = _baseline(vr).checkpoint().size_bytes
    values = {"checkpoint_bytes": float(size), "compression_ratio": base / size if size else float("inf")}
    print(f"{vr.label}: {size:,} bytes; bf16 {base:,} bytes; compression {values['compression_ratio']:.3f}x")
    verdicts = [
        evaluate_budget(
            b, [values[b.metric]], [float(base)] if b.relative_to_bf16 else None,
            label=vr.label, hw_class=qg_run.hw.hw_class, fmt=vr.variant.format, model=model,
        )
        for b in perf_config.budgets_for(("size",))
    ]
    _report(verdicts, "size")

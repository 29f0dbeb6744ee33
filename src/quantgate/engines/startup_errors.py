"""vLLM's out-of-memory refusals at start, read from the server log and restated with their numbers.

A server refused for memory ends with a Python traceback a screen long; the one line that says how much was
asked for and how much was there is somewhere in it. `memory_refusal` finds that line and says it plainly, so
the error a user sees names the numbers and the setting to change.

The patterns are vLLM's own messages (vLLM 0.2x-0.31; the message sources are named per pattern) and PyTorch's
CUDA caching allocator's. Numbers from vLLM's `format_gib` are GiB rounded to two places.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_NUM = r"[\d.]+"
_SIZE = r"[\d.]+ (?:[KMGT]iB|bytes)"


def _cpu_startup(m: re.Match[str]) -> str:
    return (
        f"CPU memory: vLLM reserves {m['req']} GiB ({m['util']} of NUMA node {m['node']}'s {m['total']} GiB, "
        f"--gpu-memory-utilization) but only {m['avail']} GiB was available at start; lower "
        "--gpu-memory-utilization, size the KV cache in bytes (--kv-cache-memory-bytes) or free memory"
    )


def _cpu_kv(m: re.Match[str]) -> str:
    asked = f"{m['kv']} GiB" + (f" (of {m['req']} GiB requested)" if m["req"] else "")
    return (
        f"CPU memory: the KV cache needs {asked} but only {m['avail']} of {m['total']} GiB was available on "
        f"NUMA node {m['node']}; lower the KV cache (QUANTGATE_KV_CACHE_BYTES, the model's max_model_len) or "
        "free memory"
    )


def _gpu_startup(m: re.Match[str]) -> str:
    return (
        f"GPU memory: vLLM reserves {m['req']} GiB ({m['util']} of device {m['dev']}'s {m['total']} GiB, "
        f"--gpu-memory-utilization) but only {m['free']} GiB was free at start; another process holds the rest, "
        "or lower --gpu-memory-utilization (QUANTGATE_GPU_MEMORY_UTILIZATION)"
    )


def _kv_too_small(m: re.Match[str]) -> str:
    hint = f"; at most max_model_len {m['est']} fits" if m["est"] else ""
    return (
        f"KV cache: one request at max_model_len {m['len']} needs {m['need']} GiB but only {m['avail']} GiB is "
        f"left for the KV cache{hint}; raise --gpu-memory-utilization or lower the model's max_model_len"
    )


def _no_cache(log_text: str) -> str:
    # The refusal itself carries no number; the lines before it say where the memory went.
    said = []
    for label, pattern in (("model loading took", r"Model loading took ([\d.]+) GiB"),
                           ("non-KV usage", r"([\d.]+) GiB memory was consumed by non-kv usages"),
                           ("available KV cache memory", r"Available KV cache memory: (-?[\d.]+) GiB")):
        found = re.findall(pattern, log_text)
        if found:
            said.append(f"{label} {found[-1]} GiB")
    detail = f" ({', '.join(said)})" if said else ""
    return (
        "KV cache: no memory left for the cache blocks after loading the model" + detail
        + "; raise --gpu-memory-utilization"
    )


def _cuda_oom(m: re.Match[str]) -> str:
    return (
        f"CUDA out of memory: tried to allocate {m['ask']} on GPU {m['gpu']}, which has {m['total']} "
        f"of which {m['free']} was free" + (f"; {m['others'].strip()}" if m["others"] else "")
    )


# (pattern, message); the last match in the log wins, since a restarted engine logs again.
_REFUSALS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    # vllm/v1/worker/cpu_worker.py, init_device
    (re.compile(rf"Available memory on node (?P<node>\d+) \((?P<avail>{_NUM})/(?P<total>{_NUM}) GiB\) on startup "
                rf"is less than desired CPU memory utilization \((?P<util>{_NUM}), (?P<req>{_NUM}) GiB\)"),
     _cpu_startup),
    # vllm/v1/worker/cpu_worker.py, determine_available_memory (explicit and automatic KV size)
    (re.compile(rf"Available memory on node (?P<node>\d+) \((?P<avail>{_NUM})/(?P<total>{_NUM}) GiB\) on kv cache "
                rf"allocation is less than requested memory for kv \((?P<kv>-?{_NUM})(?:/(?P<req>{_NUM}))? GiB\)"),
     _cpu_kv),
    # vllm/v1/worker/utils.py, request_memory
    (re.compile(rf"Free memory on device (?P<dev>\S+) \((?P<free>{_NUM})/(?P<total>{_NUM}) GiB\) on startup is "
                rf"less than desired GPU memory utilization \((?P<util>{_NUM}), (?P<req>{_NUM}) GiB\)"),
     _gpu_startup),
    # vllm/v1/core/kv_cache_utils.py, _check_enough_kv_cache_memory
    (re.compile(rf"To serve at least one request with the model's max seq len \((?P<len>\d+)\), "
                rf"\((?P<need>{_NUM}) GiB KV cache is needed, which is larger than the available KV cache memory "
                rf"\((?P<avail>-?{_NUM}) GiB\)\.(?: Based on the available memory, the estimated maximum model "
                rf"length is (?P<est>\d+)\.)?"),
     _kv_too_small),
    # torch CUDACachingAllocator (torch >= 2.2 wording)
    (re.compile(rf"CUDA out of memory\. Tried to allocate (?P<ask>{_SIZE})\. GPU (?P<gpu>\d+) has a total "
                rf"capacity of (?P<total>{_SIZE}) of which (?P<free>{_SIZE}) is free\.(?: (?P<others>(?:Process "
                rf"\d+ has {_SIZE} memory in use\. ?)+))?"),
     _cuda_oom),
    # vllm/v1/worker/gpu_model_runner.py, load_model (the torch message above is usually logged with it)
    (re.compile(r"Failed to load model - not enough GPU memory\."),
     lambda m: "GPU memory: the model's weights did not fit (Failed to load model - not enough GPU memory); "
               "lower --gpu-memory-utilization or free the device"),
    # vllm/v1/core/kv_cache_utils.py, auto-fit of max_model_len
    (re.compile(r"Cannot auto-fit max_model_len: not enough GPU memory available to serve even a single token"),
     lambda m: "GPU memory: not enough left after the weights to serve a single token; raise "
               "--gpu-memory-utilization"),
)
_NO_CACHE = re.compile(r"No available memory for the cache blocks\.")


def memory_refusal(log_text: str) -> str | None:
    """The memory refusal a vLLM server log records, as one sentence with its numbers; None if there is none.

    Where several refusals are logged, the most specific one with numbers is kept (a CUDA OOM and vLLM's
    "Failed to load model" come together; the OOM names the sizes).
    """
    found: list[tuple[int, str]] = []
    for priority, (pattern, say) in enumerate(_REFUSALS):
        matches = list(pattern.finditer(log_text))
        if matches:
            found.append((priority, say(matches[-1])))
    if found:
        return min(found)[1]
    if _NO_CACHE.search(log_text):
        return _no_cache(log_text)
    return None

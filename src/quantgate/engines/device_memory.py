"""GPU memory before a server starts: wait (bounded) until the device is back to the level this process found it.

vLLM checks at start that free device memory covers `--gpu-memory-utilization` of the total and refuses
otherwise ("Free memory on device ... is less than desired GPU memory utilization"). A previous server's engine
core that outlived its API server, or one still releasing its memory, makes the next variant fail with that
error, reported as the next variant's fault. So before every start after the first, quantgate waits until the
device's used memory is back to what it was before this process started its first server; if it is not within
the bound, it fails naming the processes that hold the difference.

The decision (`release_verdict`) is a pure function of two readings; NVML is read only in `read_devices`.
On a machine without NVML (a CPU), every function here is a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil

from quantgate.errors import ServerError

# Used memory may exceed the first reading by this much and still count as released. NVML's "used" moves by a
# few MiB with driver bookkeeping; the smallest thing worth waiting for, a CUDA context left by an orphaned
# worker, is ~500 MiB on Hopper, and an engine core holding weights and KV cache is many GiB.
TOLERANCE_BYTES = 256 * 2**20
DEFAULT_WAIT_S = 60.0
MiB = 2**20


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None where NVML cannot attribute memory (some containers, MIG)


@dataclass(frozen=True)
class DeviceReading:
    """One NVML reading of one device: `used_bytes` of `total_bytes`, and the compute processes on it."""

    index: int
    used_bytes: int
    total_bytes: int
    processes: tuple[GpuProcess, ...] = ()


def release_verdict(
    before: Sequence[DeviceReading],
    now: Sequence[DeviceReading],
    tolerance_bytes: int = TOLERANCE_BYTES,
    describe: Callable[[int], str] = str,
) -> str | None:
    """None where every device is back to its `before` level (within `tolerance_bytes`), else what holds it.

    Devices are matched by index; a device absent from `before` is not judged. The message names each device's
    excess in MiB and the processes on it that were not there before (pid, what `describe(pid)` says of it,
    MiB held), which are the candidates for the excess.
    """
    base = {d.index: d for d in before}
    problems: list[str] = []
    for dev in now:
        ref = base.get(dev.index)
        if ref is None or dev.used_bytes <= ref.used_bytes + tolerance_bytes:
            continue
        old = {p.pid for p in ref.processes}
        new = [p for p in dev.processes if p.pid not in old]
        held = ", ".join(
            f"pid {p.pid} ({describe(p.pid)}, "
            f"{'? MiB' if p.used_bytes is None else f'{p.used_bytes / MiB:.0f} MiB'})"
            for p in new
        ) or "no process NVML can see from here (another container, or a process that is exiting)"
        problems.append(
            f"GPU {dev.index}: {dev.used_bytes / MiB:.0f} MiB used of {dev.total_bytes / MiB:.0f} MiB, "
            f"{(dev.used_bytes - ref.used_bytes) / MiB:.0f} MiB more than before the first server "
            f"({ref.used_bytes / MiB:.0f} MiB); held by: {held}"
        )
    return "; ".join(problems) or None


def describe_pid(pid: int) -> str:
    """`name, pgid N` of a process, or why it cannot be said (another pid namespace, gone)."""
    try:
        proc = psutil.Process(pid)
        return f"{proc.name()}, pgid {os.getpgid(pid)}"
    except (psutil.Error, OSError):
        return "not visible from this process"


def _visible_indices(count: int) -> list[int]:
    """NVML indices of the devices CUDA_VISIBLE_DEVICES names (integers; a UUID list means all devices)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts):
        return [int(p) for p in parts if int(p) < count]
    return list(range(count)) if parts else []


def read_devices() -> list[DeviceReading] | None:
    """The visible GPUs as NVML reports them now; None where there is no NVML (a CPU machine)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML library or driver: a CPU machine
        return None
    try:
        out = []
        for index in _visible_indices(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except pynvml.NVMLError:
                running = []
            procs = tuple(GpuProcess(p.pid, p.usedGpuMemory) for p in running)
            out.append(DeviceReading(index, int(mem.used), int(mem.total), procs))
        return out
    finally:
        pynvml.nvmlShutdown()


def wait_timeout() -> float:
    """Seconds to wait for the device memory (env QUANTGATE_GPU_RELEASE_TIMEOUT, default 60)."""
    raw = os.environ.get("QUANTGATE_GPU_RELEASE_TIMEOUT", str(DEFAULT_WAIT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ServerError(f"QUANTGATE_GPU_RELEASE_TIMEOUT={raw!r}: give seconds, a number >= 0")
    return value


def wait_for_release(
    before: Sequence[DeviceReading] | None,
    *,
    timeout: float,
    read: Callable[[], list[DeviceReading] | None] | None = None,
    poll_s: float = 1.0,
) -> None:
    """Return once the devices are back to `before` (see `release_verdict`); raise ServerError after `timeout` s.

    `read` takes a reading (default: `read_devices`). No-op when `before` is None (a CPU machine, or no server
    started yet in this process).
    """
    if before is None:
        return
    read = read or read_devices
    deadline = time.monotonic() + timeout
    while True:
        now = read()
        if now is None:
            return
        verdict = release_verdict(before, now, describe=describe_pid)
        if verdict is None:
            return
        if time.monotonic() >= deadline:
            raise ServerError(
                f"GPU memory was not released within {timeout:.0f}s of the previous server's teardown, so the "
                f"next server would be refused for memory: {verdict}. Stop those processes, or raise "
                "QUANTGATE_GPU_RELEASE_TIMEOUT if they are exiting slowly."
            )
        time.sleep(poll_s)

"""Which GPUs each pytest-xdist worker, and each vLLM server it starts, may use.

`pytest -n N` starts N workers (`gw0` ... `gw{N-1}`, PYTEST_XDIST_WORKER / PYTEST_XDIST_WORKER_COUNT). Each takes
its own contiguous slice of the devices this run may see, so two servers never share a card: the slice is set
as CUDA_VISIBLE_DEVICES in the worker's environment, which every server it starts inherits. The visible list is
what CUDA_VISIBLE_DEVICES already names (indices or GPU-/MIG- UUIDs, as CUDA accepts them), else every device
NVML counts; a CI runner that was handed `CUDA_VISIBLE_DEVICES=4,5` therefore splits 4 and 5 between its workers.

A model with `gpus: K` serves with `--tensor-parallel-size K` on the first K devices of its worker's slice, so each
worker reserves as many devices as the largest `gpus` in the matrix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence

from quantgate.errors import QuantgateError

TP_FLAGS = ("--tensor-parallel-size", "-tp")


class DeviceError(QuantgateError):
    """Too few devices for the workers and models asked for, or a malformed device list."""


def parse_visible(value: str) -> list[str]:
    """The entries of a CUDA_VISIBLE_DEVICES value, in order ("0,1" -> ["0", "1"]; "" -> []).

    CUDA stops at the first invalid entry; a duplicate would put two workers on one card, so both are refused.
    """
    entries = [e.strip() for e in value.split(",") if e.strip()]
    dupes = sorted({e for e in entries if entries.count(e) > 1})
    if dupes:
        raise DeviceError(f"CUDA_VISIBLE_DEVICES={value!r} names {dupes} more than once")
    return entries


def nvml_device_count() -> int:
    """Devices NVML sees on this host (0 without a driver or NVML). NVML does not initialise CUDA here."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML library or no driver: no GPU
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def visible_devices(env: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """The devices this process may use: CUDA_VISIBLE_DEVICES's entries where it is set, else "0".."count-1"
    (`count` defaults to NVML's device count)."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return parse_visible(env["CUDA_VISIBLE_DEVICES"])
    n = nvml_device_count() if count is None else count
    return [str(i) for i in range(n)]


def worker_devices(visible: Sequence[str], worker: int, workers: int, per_worker: int = 1) -> list[str]:
    """Worker `worker` of `workers` gets `visible[worker*per_worker : (worker+1)*per_worker]`.

    Raises DeviceError, naming what was asked and what is visible, when `workers * per_worker` devices are not
    there: a worker short of devices would otherwise share one with another worker's server.
    """
    if workers < 1 or not 0 <= worker < workers:
        raise DeviceError(f"worker {worker} of {workers}: not a valid xdist worker index")
    if per_worker < 1:
        raise DeviceError(f"{per_worker} GPUs per worker: must be at least 1")
    need = workers * per_worker
    if need > len(visible):
        raise DeviceError(
            f"{workers} worker(s) x {per_worker} GPU(s) each need {need} devices, but only {len(visible)} are "
            f"visible ({','.join(visible) or 'none'}): run with -n {max(len(visible) // per_worker, 1)} or fewer, "
            "or make more devices visible (CUDA_VISIBLE_DEVICES)"
        )
    return list(visible[worker * per_worker : (worker + 1) * per_worker])


def server_devices(available: Sequence[str], gpus: int, label: str = "model") -> list[str]:
    """The first `gpus` of the devices this process holds, for one server; DeviceError when fewer are held."""
    if gpus > len(available):
        raise DeviceError(
            f"{label} needs {gpus} GPU(s) (gpus: {gpus}, served with --tensor-parallel-size {gpus}) but this "
            f"worker holds {len(available)} ({','.join(available) or 'none'})"
        )
    return list(available[:gpus])


def server_env(gpus: int, label: str = "model", env: Mapping[str, str] | None = None,
               count: int | None = None) -> dict[str, str]:
    """Environment for one GPU server: CUDA_VISIBLE_DEVICES = the first `gpus` devices this process holds
    (its worker's slice under xdist), plus CUDA_DEVICE_ORDER=PCI_BUS_ID where the indices come from NVML.
    Empty where no device is visible (a CPU host). DeviceError when fewer than `gpus` are held."""
    env = os.environ if env is None else env
    held = visible_devices(env, count)
    if not held:
        return {}
    out = {"CUDA_VISIBLE_DEVICES": ",".join(server_devices(held, gpus, label))}
    if "CUDA_VISIBLE_DEVICES" not in env:
        out["CUDA_DEVICE_ORDER"] = env.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return out


def tensor_parallel_args(gpus: int) -> list[str]:
    """vLLM's flag for serving over `gpus` devices; nothing for one, so single-GPU result keys do not change."""
    return ["--tensor-parallel-size", str(gpus)] if gpus > 1 else []


def xdist_worker(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(index, count) of this pytest-xdist worker, None in the controller or without xdist."""
    env = os.environ if env is None else env
    name = env.get("PYTEST_XDIST_WORKER")
    if not name:
        return None
    try:
        index = int(name.removeprefix("gw"))
        count = int(env["PYTEST_XDIST_WORKER_COUNT"])
    except (KeyError, ValueError):
        raise DeviceError(f"cannot read the xdist worker from PYTEST_XDIST_WORKER={name!r}") from None
    return index, count


def pin_xdist_worker(per_worker: int, env: MutableMapping[str, str] | None = None,
                     count: int | None = None) -> list[str] | None:
    """Set CUDA_VISIBLE_DEVICES in this xdist worker's environment to its own devices; return them.

    Call at worker start, before anything in the worker initialises CUDA (it reads the device list only through
    NVML). None (nothing changed) outside xdist or on a host without GPUs. Where the indices come from NVML,
    CUDA_DEVICE_ORDER=PCI_BUS_ID is set unless given, so they mean the same devices to CUDA as to NVML (CUDA's
    default order is fastest first).
    """
    env = os.environ if env is None else env
    worker = xdist_worker(env)
    if worker is None:
        return None
    given = "CUDA_VISIBLE_DEVICES" in env
    visible = visible_devices(env, count)
    if not visible:
        return None  # a CPU host: workers share the cores, as before
    mine = worker_devices(visible, worker[0], worker[1], per_worker)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    if not given:  # indices from NVML: make CUDA count in NVML's order; a given list keeps its own meaning
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return mine

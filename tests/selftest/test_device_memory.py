"""The GPU memory release check before a server starts, on fake NVML readings (the decision is pure logic)."""

import pytest

from quantgate.engines import device_memory as dm
from quantgate.engines.device_memory import DeviceReading, GpuProcess, release_verdict, wait_for_release
from quantgate.errors import ServerError

GiB = 2**30
BEFORE = [DeviceReading(0, 2 * GiB, 140 * GiB, (GpuProcess(100, GiB),))]


def _now(used_gib: float, *procs: GpuProcess, index: int = 0) -> list[DeviceReading]:
    return [DeviceReading(index, int(used_gib * GiB), 140 * GiB, procs)]


def test_back_to_the_level_before_the_first_server_is_released():
    assert release_verdict(BEFORE, _now(2)) is None
    assert release_verdict(BEFORE, _now(1.5)) is None
    assert release_verdict(BEFORE, _now(2 + 0.2)) is None  # within the tolerance (256 MiB)


def test_an_orphan_holding_memory_is_named_with_its_share():
    verdict = release_verdict(BEFORE, _now(120, GpuProcess(100, GiB), GpuProcess(4242, 118 * GiB)),
                              describe=lambda pid: f"proc{pid}")
    assert verdict == (
        "GPU 0: 122880 MiB used of 143360 MiB, 120832 MiB more than before the first server (2048 MiB); "
        "held by: pid 4242 (proc4242, 120832 MiB)"
    )


def test_excess_that_no_visible_process_holds_says_so():
    verdict = release_verdict(BEFORE, _now(60, GpuProcess(100, GiB), GpuProcess(7, None)), describe=str)
    assert "held by: pid 7 (7, ? MiB)" in verdict
    assert "held by: no process NVML can see" in release_verdict(BEFORE, _now(60, GpuProcess(100, GiB)))


def test_only_devices_read_before_are_judged():
    assert release_verdict(BEFORE, _now(100, index=1)) is None


def test_wait_returns_once_released_and_fails_naming_holders_at_the_bound():
    readings = iter([_now(100, GpuProcess(9, 98 * GiB)), _now(50, GpuProcess(9, 48 * GiB)), _now(2)])
    wait_for_release(BEFORE, timeout=60, read=lambda: next(readings), poll_s=0)
    assert next(readings, None) is None, "it read until the memory was back"
    with pytest.raises(ServerError, match=r"not released within 0s[\s\S]*held by: pid 9 \("):
        wait_for_release(BEFORE, timeout=0, read=lambda: _now(100, GpuProcess(9, 98 * GiB)), poll_s=0)


def test_no_op_on_a_cpu():
    wait_for_release(None, timeout=0, read=lambda: pytest.fail("read on a CPU"))
    wait_for_release(BEFORE, timeout=0, read=lambda: None)  # NVML gone since: nothing to judge


def test_wait_timeout_setting(monkeypatch):
    monkeypatch.delenv("QUANTGATE_GPU_RELEASE_TIMEOUT", raising=False)
    assert dm.wait_timeout() == 60.0
    monkeypatch.setenv("QUANTGATE_GPU_RELEASE_TIMEOUT", "5")
    assert dm.wait_timeout() == 5.0
    monkeypatch.setenv("QUANTGATE_GPU_RELEASE_TIMEOUT", "soon")
    with pytest.raises(ServerError, match="QUANTGATE_GPU_RELEASE_TIMEOUT='soon'"):
        dm.wait_timeout()


def test_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert dm._visible_indices(4) == [0, 1, 2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert dm._visible_indices(4) == [2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert dm._visible_indices(4) == []

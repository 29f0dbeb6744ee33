"""Device assignment for `pytest -n N` and `gpus: K`, without a GPU: each worker its own slice of the visible
devices whatever CUDA_VISIBLE_DEVICES says, a clear error when there are too few, and `gpus: K` served with
`--tensor-parallel-size K` on K devices (refused on a CPU)."""

from pathlib import Path

import pytest

from quantgate.devices import (
    DeviceError,
    parse_visible,
    pin_xdist_worker,
    server_env,
    tensor_parallel_args,
    visible_devices,
    worker_devices,
)
from quantgate.engines.hardware import Hardware
from quantgate.errors import MatrixError
from quantgate.matrix import load_matrix
from quantgate.runner import variant_support

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("visible", "workers", "per_worker", "expected"),
    [
        (["0", "1"], 2, 1, [["0"], ["1"]]),
        (["0", "1", "2", "3"], 2, 2, [["0", "1"], ["2", "3"]]),
        # a runner handed devices 4..7 splits those, not 0..3
        (["4", "5", "6", "7"], 4, 1, [["4"], ["5"], ["6"], ["7"]]),
        (["GPU-aa", "GPU-bb", "GPU-cc"], 3, 1, [["GPU-aa"], ["GPU-bb"], ["GPU-cc"]]),
        # more devices than workers need: the rest stay free
        (["0", "1", "2", "3", "4"], 2, 2, [["0", "1"], ["2", "3"]]),
    ],
)
def test_each_worker_gets_its_own_slice(visible, workers, per_worker, expected):
    got = [worker_devices(visible, w, workers, per_worker) for w in range(workers)]
    assert got == expected
    flat = [d for g in got for d in g]
    assert len(flat) == len(set(flat)), "two workers share a device"


@pytest.mark.parametrize(
    ("visible", "workers", "per_worker", "match"),
    [
        (["0", "1"], 3, 1, r"3 worker\(s\) x 1 GPU\(s\) each need 3 devices, but only 2 are visible \(0,1\)"),
        (["0", "1", "2"], 2, 2, r"need 4 devices, but only 3 .*run with -n 1 or fewer"),
        ([], 1, 1, r"only 0 are visible \(none\)"),
    ],
)
def test_too_few_devices_is_a_clear_error(visible, workers, per_worker, match):
    with pytest.raises(DeviceError, match=match):
        worker_devices(visible, 0, workers, per_worker)


def test_bad_worker_arguments_and_device_lists():
    with pytest.raises(DeviceError, match="not a valid xdist worker"):
        worker_devices(["0"], 1, 1)
    with pytest.raises(DeviceError, match="at least 1"):
        worker_devices(["0"], 0, 1, 0)
    with pytest.raises(DeviceError, match=r"names \['1'\] more than once"):
        parse_visible("1,0,1")
    assert parse_visible(" 2, 3 ,") == ["2", "3"]


def test_visible_devices_prefer_the_environment_to_nvml():
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "3,1"}, count=8) == ["3", "1"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}, count=8) == []  # CUDA sees none: neither do we
    assert visible_devices({}, count=2) == ["0", "1"]


def test_pin_overrides_an_inherited_cuda_visible_devices():
    # Today's bug: pinning was skipped when CUDA_VISIBLE_DEVICES was set, so every worker used the same list.
    env = {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert pin_xdist_worker(2, env, count=8) == ["6", "7"]
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert "CUDA_DEVICE_ORDER" not in env  # a given list keeps the meaning its author gave it
    env = {"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2"}
    assert pin_xdist_worker(1, env, count=2) == ["0"]
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("0", "PCI_BUS_ID")


def test_pin_leaves_controllers_and_cpu_hosts_alone():
    env: dict[str, str] = {}
    assert pin_xdist_worker(1, env, count=2) is None and env == {}
    env = {"PYTEST_XDIST_WORKER": "gw3", "PYTEST_XDIST_WORKER_COUNT": "4"}
    assert pin_xdist_worker(1, env, count=0) is None and "CUDA_VISIBLE_DEVICES" not in env
    env = {"PYTEST_XDIST_WORKER": "gw2", "PYTEST_XDIST_WORKER_COUNT": "4", "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(DeviceError, match="4 worker"):
        pin_xdist_worker(1, env, count=8)


def test_server_env_takes_the_first_k_held_devices():
    assert server_env(1, env={"CUDA_VISIBLE_DEVICES": "6,7"}) == {"CUDA_VISIBLE_DEVICES": "6"}
    assert server_env(2, env={"CUDA_VISIBLE_DEVICES": "6,7"}) == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert server_env(2, env={}, count=4) == {"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert server_env(2, env={}, count=0) == {}
    with pytest.raises(DeviceError, match=r"m/v needs 2 GPU\(s\) .*--tensor-parallel-size 2.* holds 1 \(6\)"):
        server_env(2, "m/v", env={"CUDA_VISIBLE_DEVICES": "6"})


def test_tensor_parallel_flag_only_above_one_gpu():
    assert tensor_parallel_args(1) == []
    assert tensor_parallel_args(4) == ["--tensor-parallel-size", "4"]


def _matrix_text(gpus_line: str = "", serve_args: str = "") -> str:
    return f"""
models:
  - name: m
    source: {{kind: local, path: /nonexistent}}
{gpus_line}
    variants:
      - {{name: bf16, format: bf16{serve_args}}}
tasks:
  - {{name: hellaswag, metric: acc_norm}}
"""


def test_matrix_gpus_field(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(_matrix_text())
    assert load_matrix(f).models[0].gpus == 1
    f.write_text(_matrix_text("    gpus: 2"))
    assert load_matrix(f).models[0].gpus == 2
    f.write_text(_matrix_text("    gpus: 0"))
    with pytest.raises(MatrixError, match="models.m.gpus"):
        load_matrix(f)
    f.write_text(_matrix_text("    gpu: 2"))
    with pytest.raises(MatrixError, match=r"models.m.gpu: unknown key .gpu. \(did you mean .gpus.\?\)"):
        load_matrix(f)
    f.write_text(_matrix_text(serve_args=", serve_args: ['--tensor-parallel-size', '2']"))
    with pytest.raises(MatrixError, match=r"variants\.bf16\.serve_args: serve_args may not set "
                                          r"\['--tensor-parallel-size'\].*set the model's `gpus: K`"):
        load_matrix(f)


def test_gpus_above_one_is_refused_on_a_cpu_with_the_reason(monkeypatch):
    m = load_matrix(ROOT / "fixtures" / "gpu-tp2.yaml")
    assert m.models[0].gpus == 2
    cpu = Hardware("cpu", "x86", 2, cpu_isa="avx2")
    for v in m.models[0].variants:
        s = variant_support(v, cpu, m.models[0].gpus)
        assert s.engine is None and "gpus: 2 (tensor parallelism over 2 GPUs) needs GPUs; this is a CPU" in s.reason
    sm90 = Hardware("sm90", "H200", 1)
    monkeypatch.setattr("quantgate.runner.visible_devices", lambda: ["0"])
    s = variant_support(m.models[0].baseline, sm90, 2)
    assert s.engine is None and "needs 2 devices; this process holds 1 (0)" in s.reason
    monkeypatch.setattr("quantgate.runner.visible_devices", lambda: ["0", "1"])
    assert variant_support(m.models[0].baseline, sm90, 2).engine == "vllm"


"""Where a CPU server's model runs (engines/vllm_server.cpu_worker_env): in the engine core on <= 2 cores, with
the OpenMP binding vLLM would give a worker process; left alone where the caller or the machine decides."""

from quantgate.engines import vllm_server
from quantgate.engines.hardware import Hardware
from quantgate.engines.vllm_server import IN_PROCESS_WORKER_ENV, cpu_thread_env, cpu_worker_env, numerics_args

CPU = Hardware("cpu", "EPYC", 2, cpu_isa="avx2")
H100 = Hardware("sm90", "H100", 1)


def test_two_cores_run_the_worker_in_the_engine_core_bound_to_both(monkeypatch):
    monkeypatch.setattr(vllm_server, "usable_cores", lambda: [4, 7])
    env = cpu_worker_env(CPU, {})
    assert env == {IN_PROCESS_WORKER_ENV: "0", "OMP_PLACES": "{4,7}", "OMP_PROC_BIND": "true"}
    # the thread count is the one the worker process got: all usable cores
    assert cpu_thread_env(CPU, env)["OMP_NUM_THREADS"] == "2"


def test_the_callers_choice_wins(monkeypatch):
    monkeypatch.setattr(vllm_server, "usable_cores", lambda: [0, 1])
    assert cpu_worker_env(CPU, {IN_PROCESS_WORKER_ENV: "1"}) == {}
    assert cpu_worker_env(CPU, {"VLLM_CPU_OMP_THREADS_BIND": "0"}) == {}  # a binding of the caller's: vLLM's mp
    assert cpu_worker_env(CPU, {"OMP_PLACES": "cores"}) == {IN_PROCESS_WORKER_ENV: "0"}


def test_larger_cpus_and_gpus_keep_vllms_worker_process(monkeypatch):
    monkeypatch.setattr(vllm_server, "usable_cores", lambda: list(range(8)))
    assert cpu_worker_env(CPU, {}) == {}  # vLLM's own NUMA binding and reserved core stay in charge there
    monkeypatch.setattr(vllm_server, "usable_cores", lambda: [0, 1])
    assert cpu_worker_env(H100, {}) == {}


def test_the_process_layout_is_not_in_result_keys(monkeypatch):
    monkeypatch.delenv("QUANTGATE_VLLM_ARGS", raising=False)
    monkeypatch.delenv("QUANTGATE_DTYPE", raising=False)
    args = numerics_args(CPU, [])
    assert not any("executor" in a or "MULTIPROCESSING" in a for a in args)

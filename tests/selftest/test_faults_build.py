"""Fault suite, builds, signals and secrets: quantgate's real build path (obtain.built_checkpoint, the checkpoint
cache and its lock, run_in_own_group) runs a stand-in builder script (data/standin_builders/) in place of
llm-compressor's, and a stand-in server and lm-eval (fault_harness.py) serve and evaluate.

Each case asserts that the error names the cause, that no process of the builder's or server's process group is
left, and that every result stored before the fault is still stored and is reused by the next run. Cases: a
builder killed mid-export; a stale partial export; SIGINT and SIGTERM during a build and during an evaluation;
two processes building the same checkpoint at once; a fake HF_TOKEN that must appear in no file a run writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantgate import verdicts
from quantgate.checkpoints import cache
from quantgate.checkpoints.obtain import validate_checkpoint_dir
from quantgate.errors import BuildError
from quantgate.report import snapshot
from tests.selftest import fault_harness as fh

ROOT = Path(__file__).resolve().parents[2]
BF16 = [f"{fh.MODEL}/bf16/{t}" for t in fh.TASKS]
FAKE_HF_TOKEN = "hf_FAKEtoken1234567890"


@pytest.fixture
def builder(tmp_path, monkeypatch):
    """Stand-in server, lm-eval and builder, the checkpoint cache under tmp_path; returns a setter for the
    builder's behaviour (STANDIN_BUILD_MODE: ok, killed, hang)."""
    fh.patch(monkeypatch.setattr, tmp_path)
    fh.patch_builder(monkeypatch.setattr, tmp_path)
    for k, v in {**fh.standin_env(), **fh.builder_env(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    for k in ("STANDIN_PIDFILE", "STANDIN_BUILD_PIDFILE", "STANDIN_HANG_TASK", "QUANTGATE_SERVER_START_TIMEOUT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("STANDIN_MODE", "healthy")
    monkeypatch.setattr(fh, "PROMPTS", {})

    def mode(name: str) -> None:
        monkeypatch.setenv("STANDIN_BUILD_MODE", name)

    mode("ok")
    return mode


def _pids(pidfile: Path) -> tuple[int, int]:
    leader, child = pidfile.read_text().split()
    return int(leader), int(child)


def _assert_nothing_left(pgid: int, *pids: int) -> None:
    assert fh.left_in_group(pgid) == [], f"processes left in group {pgid}"
    assert not [p for p in pids if fh.running(p)], "a process outlived the teardown"


def _stored(store: Path) -> list[str]:
    return sorted(str(p.parent.parent.relative_to(store)) for p in store.glob(f"{fh.MODEL}/*/*/*/provenance.json"))


def _rerun(store: Path, *variants: str):  # noqa: ANN202
    run = fh.make_run(store)
    try:
        for v in variants:
            run.variant(fh.MODEL, v).results(run.matrix.tasks)
    finally:
        run.close()
    return run.events


# --- a builder killed mid-export ----------------------------------------------------------------------------


def test_builder_killed_mid_export(tmp_path, builder, monkeypatch):
    """bf16 is stored; w8a8's builder spawns a worker, writes half its weights and is SIGKILLed. The error names
    the variant, the builder and the signal; the builder's group (the worker too) is gone; no partial export
    or spec file is left in the cache; the next run reuses bf16 and builds w8a8 afresh."""
    store = tmp_path / "store"
    run = fh.make_run(store)
    run.variant(fh.MODEL, "bf16").results(run.matrix.tasks)
    builder("killed")
    monkeypatch.setenv("STANDIN_BUILD_PIDFILE", str(tmp_path / "build.pids"))
    bad = run.variant(fh.MODEL, "w8a8")
    for _ in range(2):  # remembered: the variant's other tests fail at once, without a second build
        with pytest.raises(BuildError, match=r"m/w8a8: llmcompressor build failed \(exit -9, killed by SIGKILL\)"
                                             r"[\s\S]*exporting to"):
            bad.results(run.matrix.tasks)
    run.close()
    assert fh.builds(tmp_path) == 1
    leader, worker = _pids(tmp_path / "build.pids")
    _assert_nothing_left(leader, leader, worker)
    assert fh.cache_entries(tmp_path) == [], "a partial export was left in the cache"
    assert _stored(store) == BF16

    builder("ok")
    events = _rerun(store, "bf16", "w8a8")
    assert sorted(events.reused) == [f"{fh.MODEL}/bf16:{t}" for t in fh.TASKS]
    assert sorted(events.evaluated) == [f"{fh.MODEL}/w8a8:{t}" for t in fh.TASKS]
    assert fh.builds(tmp_path) == 2
    (entry,) = fh.cache_entries(tmp_path)
    validate_checkpoint_dir(tmp_path / "cache" / "checkpoints" / "built" / entry, "m/w8a8")


def test_stale_partial_export_is_removed_and_rebuilt(tmp_path, monkeypatch):
    """What a build killed with its whole run (SIGKILL to quantgate itself, no cleanup) leaves: a temporary
    export and a spec file beside the entry. Never trusted; the next build of that key removes them."""
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))
    key = {"k": "stale"}
    root = tmp_path / "cache" / "checkpoints" / "built"
    root.mkdir(parents=True)
    name = cache.digest(key)[:16]
    partial = root / f".{name}.x1y2z3"
    fh.fake_weights_dir(partial)
    (partial / "model.safetensors").write_bytes((partial / "model.safetensors").read_bytes()[:100])
    (root / f".{name}.x1y2z3.spec.json").write_text("{}")
    other = root / ".0123456789abcdef.keep"  # another key's build, maybe running: not touched
    other.mkdir()

    entry = cache.cached_entry("built", key, fh.fake_weights_dir,
                               lambda p: validate_checkpoint_dir(p, "m/w8a8"))
    assert sorted(p.name for p in root.iterdir()) == sorted([entry.name, f"{name}.lock", other.name])
    validate_checkpoint_dir(entry, "m/w8a8")


# --- signals during a build and during an evaluation --------------------------------------------------------


def _start_child(tmp_path: Path, variants: list[str], **env: str) -> subprocess.Popen:
    """A run in a child process (fault_harness._main) over tmp_path/store, stand-ins including the builder."""
    full = {**os.environ, **fh.standin_env(), **fh.builder_env(tmp_path), "STANDIN_BUILDER": "1",
            "STANDIN_TASK_DIGESTS": json.dumps(fh.task_digests()),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **env}
    for k in ("STANDIN_MODE", "STANDIN_PIDFILE", "QUANTGATE_SERVER_START_TIMEOUT"):
        full.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "tests.selftest.fault_harness", str(tmp_path / "store"),
                             *variants], cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=fh.default_sigint)


def _signal_once(proc: subprocess.Popen, ready: Path, sig: signal.Signals) -> tuple[str, str]:
    """Wait until `ready` exists (the child is at the point to interrupt), send `sig`, collect the output."""
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the child never got there: {proc.communicate()}"
        proc.send_signal(sig)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_exit_for(sig: signal.Signals, proc: subprocess.Popen, err: str) -> None:
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-800:])
        assert "quantgate: received SIGTERM" in err
    else:
        # an unhandled KeyboardInterrupt ends Python by SIGINT, or with 1 where it surfaced during cleanup
        assert proc.returncode in (-signal.SIGINT, 1) and "KeyboardInterrupt" in err, (proc.returncode, err[-800:])


SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])


@SIGNALS
def test_signal_during_build(tmp_path, builder, sig):
    """A run stores bf16, then w8a8's builder hangs mid-export; the run is signalled (CI's timeout, Ctrl-C).
    It exits naming the signal; neither the builder's group nor bf16's server's is left; no partial export is
    left in the cache; the next run reuses bf16 and builds w8a8."""
    build_pids, server_pids = tmp_path / "build.pids", tmp_path / "bf16.pids"
    proc = _start_child(tmp_path, ["bf16", "w8a8"], STANDIN_BUILD_MODE="hang",
                        STANDIN_BUILD_PIDFILE=str(build_pids), STANDIN_PIDFILE_bf16=str(server_pids))
    out, err = _signal_once(proc, build_pids, sig)
    assert "stored bf16" in out and "stored w8a8" not in out
    _assert_exit_for(sig, proc, err)
    leader, worker = _pids(build_pids)
    _assert_nothing_left(leader, leader, worker)
    _assert_nothing_left(*_pids(server_pids))
    assert fh.cache_entries(tmp_path) == [], "a partial export was left in the cache"
    assert _stored(tmp_path / "store") == BF16

    events = _rerun(tmp_path / "store", "bf16", "w8a8")
    assert sorted(events.reused) == [f"{fh.MODEL}/bf16:{t}" for t in fh.TASKS]
    assert sorted(events.evaluated) == [f"{fh.MODEL}/w8a8:{t}" for t in fh.TASKS]
    assert fh.builds(tmp_path) == 2


@SIGNALS
def test_signal_during_evaluation(tmp_path, builder, sig):
    """bf16's hellaswag is stored, then its ifeval evaluation is in progress when the run is signalled. The
    server's group is gone; hellaswag stays stored and is reused; only ifeval is evaluated again."""
    mark, server_pids = tmp_path / "evaluating", tmp_path / "bf16.pids"
    proc = _start_child(tmp_path, ["bf16"], STANDIN_HANG_TASK="ifeval", STANDIN_HANG_MARK=str(mark),
                        STANDIN_PIDFILE_bf16=str(server_pids))
    out, err = _signal_once(proc, mark, sig)
    assert "stored bf16" not in out
    _assert_exit_for(sig, proc, err)
    _assert_nothing_left(*_pids(server_pids))
    assert _stored(tmp_path / "store") == [f"{fh.MODEL}/bf16/hellaswag"]

    events = _rerun(tmp_path / "store", "bf16")
    assert events.reused == [f"{fh.MODEL}/bf16:hellaswag"]
    assert events.evaluated == [f"{fh.MODEL}/bf16:ifeval"]


# --- two processes building the same checkpoint ---------------------------------------------------------


def test_two_processes_build_the_same_checkpoint_once(tmp_path, builder):
    """Two processes (as two xdist workers) obtain the same w8a8 checkpoint at once. The builder waits on a
    gate until both processes have reached the cache's lock for that entry, so the second one is waiting on
    the lock while the first builds; it then reuses the entry: the stand-in builder ran once."""
    gate = tmp_path / "gate"
    fh.fake_weights_dir(tmp_path / "ckpt" / "bf16")  # the base both read, written before either starts
    env = {**os.environ, **fh.standin_env(), **fh.builder_env(tmp_path), "STANDIN_BUILDER": "1",
           "STANDIN_BUILD_MODE": "ok", "STANDIN_BUILD_GATE": str(gate), "STANDIN_ANNOUNCE_LOCK": "1",
           "STANDIN_TASK_DIGESTS": json.dumps(fh.task_digests()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.selftest.fault_harness", "build", str(tmp_path)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while (len(list(tmp_path.glob("at-lock.*"))) < 2 or fh.builds(tmp_path) < 1) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        assert fh.builds(tmp_path) == 1 and len(list(tmp_path.glob("at-lock.*"))) == 2
        gate.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {line for out, _ in outs for line in out.splitlines() if line.startswith("built ")}
    (entry,) = fh.cache_entries(tmp_path)
    assert paths == {f"built {tmp_path / 'cache' / 'checkpoints' / 'built' / entry}"}
    assert fh.builds(tmp_path) == 1


# --- a fake HF_TOKEN appears in no file a run writes ------------------------------------------------------


def _files_holding(root: Path, secret: str) -> list[Path]:
    needle = secret.encode()
    return [f for f in root.rglob("*") if f.is_file() and needle in f.read_bytes()]


def test_hf_token_appears_in_no_file_the_run_wrote(tmp_path, builder, monkeypatch):
    """With HF_TOKEN set (the server, builder and lm-eval stand-ins inherit it), a run builds w8a8, serves and
    evaluates both variants, and writes the score table's snapshot candidate. No file under tmp_path (results,
    server logs and records, the checkpoint cache, the snapshot) holds the token."""
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    store = tmp_path / "store"
    run = fh.make_run(store)
    try:
        for v in ("bf16", "w8a8"):
            run.variant(fh.MODEL, v).results(run.matrix.tasks)
        table = verdicts.score_table(run, fh.MODEL)
    finally:
        run.close()
    candidate = snapshot.record_candidate(tmp_path / "snapshots" / "cpu.json", table)
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    # the grep covers what it must: results, server logs, the built cache entry and the snapshot
    assert len(_stored(store)) == 4 and fh.builds(tmp_path) == 1
    assert any(f.parent == store / "_server_logs" for f in written)
    assert any(f.name == cache.MANIFEST for f in written) and candidate in written
    assert _files_holding(tmp_path, FAKE_HF_TOKEN) == []
    # the check itself can fail: a file holding the token is found
    (store / "leak.txt").write_text(f"token={os.environ['HF_TOKEN']}")
    assert _files_holding(tmp_path, FAKE_HF_TOKEN) == [store / "leak.txt"]

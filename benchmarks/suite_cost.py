"""What the regression suite itself costs (a script, not a timed test).

  (a) cold run: wall time of a full regression run of the matrix into a fresh, empty results directory,
      split into checkpoint build, server start, evaluation, serving benchmarks (with -m perf) and the rest
      (the suite's own overhead: pytest, imports, gates, tables). Goal: the rest under 15% of wall.
  (b) warm rerun: the same run again with every result stored. Goal: a few seconds.
  (c) items per second through the server with lm-eval's `local-completions` (what the suite does), against
      vLLM's offline `LLM.generate` on the same prompts with the same sampling settings, on the same
      machine (the engine's upper bound). A generative task, BF16 baseline of the first model.

Each suite run is a child process (this script with --child-suite) running pytest in-process with a plugin
that takes the session's Run at sessionfinish, so the split comes from Run.events.seconds and the wall time
includes the interpreter start and imports a user pays. The offline engine also runs in a child, after the
server is stopped, so that one engine is alive at a time.

  python benchmarks/suite_cost.py                          # (a) + (b) + (c), fresh temp results dir
  python benchmarks/suite_cost.py --skip-cold --results results   # (b) against an existing results dir
  python benchmarks/suite_cost.py --skip-cold --skip-warm --items 32 --num-fewshot 0 --max-gen-toks 64
                                                           # (c) only, small
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD_GOAL = 0.15
WARM_GOAL_S = 10.0


# ---- (a), (b): one suite run ----------------------------------------------------------------------------

def _child_suite(args: argparse.Namespace) -> int:
    """Runs in the child: pytest in-process, then the session's Run events as JSON."""
    import pytest

    from quantgate.plugin import STASH

    class Grab:
        events: dict[str, Any] | None = None

        @pytest.hookimpl(tryfirst=True)  # before the quantgate plugin closes the run
        def pytest_sessionfinish(self, session: pytest.Session) -> None:
            qs = session.config.stash.get(STASH, None)
            if qs is not None and qs.run is not None:
                ev = qs.run.events
                Grab.events = {"seconds": dict(ev.seconds), "servers_started": list(ev.servers_started),
                               "evaluated": len(ev.evaluated), "reused": len(ev.reused),
                               "built": len(ev.built), "summary": ev.summary()}

    t0 = time.monotonic()
    code = pytest.main(
        [str(ROOT / args.tests), "--ignore", str(ROOT / args.tests / "selftest"), "--qg-matrix", args.matrix,
         "--qg-thresholds", args.thresholds, "--qg-results", str(args.results), "-p", "no:cacheprovider",
         "-q", *shlex.split(args.pytest_args)],
        plugins=[Grab()],
    )
    out = {"exit_code": int(code), "pytest_seconds": time.monotonic() - t0,
           "events": Grab.events or {"seconds": {}, "summary": "no quantgate run was created"}}
    Path(args.child_json).write_text(json.dumps(out, indent=2))
    return 0


def run_suite(args: argparse.Namespace, results: Path, label: str) -> dict[str, Any]:
    out_json = Path(tempfile.mkstemp(prefix=f"suite_cost_{label}_", suffix=".json")[1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-suite", "--child-json", str(out_json),
           "--matrix", args.matrix, "--thresholds", args.thresholds, "--tests", args.tests,
           "--results", str(results), "--pytest-args", args.pytest_args]
    print(f"[suite_cost] {label} run: {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.monotonic() - t0
    data = json.loads(out_json.read_text()) if out_json.stat().st_size else {"events": {"seconds": {}}}
    out_json.unlink(missing_ok=True)
    data.update(label=label, wall=wall, child_exit=proc.returncode)
    return data


def split(run: dict[str, Any]) -> dict[str, float]:
    s = run["events"].get("seconds", {})
    parts = {"build": s.get("build", 0.0), "server start": s.get("server_start", 0.0),
             "evaluation": s.get("evaluate", 0.0), "serving benchmarks": s.get("benchmark", 0.0)}
    parts["rest"] = max(run["wall"] - sum(parts.values()), 0.0)
    return parts


# ---- (c): items/s through the server vs offline -----------------------------------------------------------

def _one_per_item(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples of one filter, by doc id. lm-eval logs one sample per item *and filter* (gsm8k:
    strict-match, flexible-extract), but sent one request per item."""
    first_filter = samples[0].get("filter") if samples else None
    return sorted((r for r in samples if r.get("filter") == first_filter), key=lambda r: int(r["doc_id"]))


def _generation_requests(samples: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(prompt, lm-eval gen_kwargs) of each item, as lm-eval sent them."""
    out = []
    for s in _one_per_item(samples):
        args = s["arguments"]
        if isinstance(args, dict):  # some lm-eval versions log {"gen_args_0": {"arg_0": ..., "arg_1": ...}}
            first = next(iter(args.values()))
            prompt, kwargs = first["arg_0"], first["arg_1"]
        else:
            prompt, kwargs = args[0][0], args[0][1]
        out.append((prompt, dict(kwargs)))
    return out


def through_server(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from quantgate.evaluation.lmeval_runner import run_task
    from quantgate.matrix import load_matrix, load_thresholds
    from quantgate.runner import Run

    matrix = load_matrix(args.matrix)
    run = Run(matrix, load_thresholds(args.thresholds), work / "results")
    model = matrix.models[0] if not args.model else run.model(args.model)
    task = next((t for t in matrix.tasks if t.name == args.task), None)
    if task is None:
        raise SystemExit(f"task {args.task!r} is not in {args.matrix}")
    task = task.model_copy(update={"limit": args.items, **(
        {"num_fewshot": args.num_fewshot} if args.num_fewshot is not None else {})})
    overrides = {"max_gen_toks": args.max_gen_toks, "concurrency": args.concurrency, "batch_size": args.batch_size}
    generation = matrix.generation.model_copy(update={k: v for k, v in overrides.items() if v})
    vr = run.variant(model.name, model.baseline.name)
    try:
        server = vr.ensure_server()
        t0 = time.monotonic()
        _, samples, _ = run_task(completions_url=server.completions_url, served_name=vr.label,
                                 tokenizer_dir=vr.served_checkpoint().path, task=task,
                                 generation=generation, data_dir=run.data_dir, api_key=server.api_key,
                                 max_length=model.max_model_len)
        seconds = time.monotonic() - t0
    finally:
        run.close()
    requests = _generation_requests(samples)
    tok = AutoTokenizer.from_pretrained(str(vr.served_checkpoint().path))
    answers = [str(s["resps"][0][0]) for s in _one_per_item(samples)]
    out_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    spec = {"model_dir": str(vr.served_checkpoint().path), "max_model_len": model.max_model_len,
            "serve_args": vr.variant.serve_args, "seed": matrix.generation.seed,
            "temperature": matrix.generation.temperature, "requests": requests,
            "sequences": generation.concurrency * generation.batch_size}
    return {"items": len(requests), "seconds": seconds, "output_tokens": out_tokens, "spec": spec,
            "concurrency": generation.concurrency, "batch_size": generation.batch_size, "num_fewshot": task.num_fewshot,
            "max_gen_toks": generation.max_gen_toks}


def _flags_to_kwargs(flags: list[str]) -> dict[str, Any]:
    """`--gpu-memory-utilization 0.1 --enforce-eager` -> {"gpu_memory_utilization": 0.1, "enforce_eager": True}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        flag = flags[i]
        if not flag.startswith("--"):
            raise SystemExit(f"cannot map engine argument {flag!r} to LLM(...)")
        key, _, inline = flag[2:].partition("=")
        key = key.replace("-", "_")
        if inline:
            value: Any = inline
        elif i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value = flags[i + 1]
            i += 1
        else:
            value = True
        if isinstance(value, str):
            try:
                value = json.loads(value)  # numbers, booleans, JSON objects; plain words stay strings
            except json.JSONDecodeError:
                pass
        out[key] = value
        i += 1
    return out


def _child_offline(args: argparse.Namespace) -> int:
    """Runs in the child: vLLM's offline engine on the exact prompts the server was sent."""
    spec = json.loads(Path(args.child_spec).read_text())
    from vllm import LLM, SamplingParams

    from quantgate.engines.hardware import detect
    from quantgate.engines.vllm_server import default_engine_args, memory_args

    # The server's own engine flags (eager mode on the CPU, the memory it was sized with, the variant's
    # serve_args), so the offline engine is configured as the server was.
    hw = detect()
    engine = [*default_engine_args(hw), *spec["serve_args"]]
    memory, _ = memory_args(hw, Path(spec["model_dir"]), max_model_len=spec["max_model_len"],
                            sequences=spec.get("sequences", 16), engine_args=engine)
    engine_kwargs = _flags_to_kwargs([*default_engine_args(hw), *memory, *spec["serve_args"]])
    print(f"[suite_cost] offline engine arguments: {engine_kwargs}", flush=True)
    llm = LLM(model=spec["model_dir"], max_model_len=spec["max_model_len"],
              seed=spec["seed"], **engine_kwargs)
    params = []
    for _, kw in spec["requests"]:
        # the sampling lm-eval's local-completions asks the server for: greedy, its stops, its token cap
        until = kw.get("until") or []
        params.append(SamplingParams(
            temperature=spec["temperature"], max_tokens=int(kw.get("max_gen_toks", 256)),
            stop=[until] if isinstance(until, str) else list(until), seed=spec["seed"],
        ))
    prompts = [p for p, _ in spec["requests"]]
    t0 = time.monotonic()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.monotonic() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    Path(args.child_json).write_text(json.dumps({"items": len(prompts), "seconds": seconds,
                                                 "output_tokens": tokens}))
    return 0


def offline(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_path, out_path = work / "offline_spec.json", work / "offline_result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ}
    from quantgate.engines.hardware import detect
    from quantgate.engines.vllm_server import cpu_thread_env

    env.update(cpu_thread_env(detect(), env))  # the same OpenMP binding the server gets
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-offline", "--child-spec", str(spec_path),
           "--child-json", str(out_path)]
    print(f"[suite_cost] offline engine: {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0 or not out_path.exists():
        raise SystemExit(f"offline LLM.generate failed (exit {proc.returncode})")
    return json.loads(out_path.read_text())


# ---- tables ------------------------------------------------------------------------------------------

def suite_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| run | wall s | build s | server start s | evaluation s | serving benchmarks s | rest s | rest % | goal "
             "| exit |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in runs:
        p = split(r)
        rest_pct = p["rest"] / r["wall"] if r["wall"] else 0.0
        if r["label"] == "warm":
            goal = f"wall <= {WARM_GOAL_S:.0f}s: {'met' if r['wall'] <= WARM_GOAL_S else 'missed'}"
        else:
            goal = f"rest < {OVERHEAD_GOAL:.0%}: {'met' if rest_pct < OVERHEAD_GOAL else 'missed'}"
        lines.append(f"| {r['label']} | {r['wall']:.1f} | {p['build']:.1f} | {p['server start']:.1f} | "
                     f"{p['evaluation']:.1f} | {p['serving benchmarks']:.1f} | {p['rest']:.1f} | {rest_pct:.1%} | "
                     f"{goal} | "
                     f"{r.get('exit_code', r['child_exit'])} |")
    for r in runs:
        lines.append(f"\n{r['label']}: {r['events'].get('summary', '')}")
    return "\n".join(lines)


def throughput_table(server: dict[str, Any], off: dict[str, Any], task: str) -> str:
    def row(name: str, d: dict[str, Any]) -> str:
        return (f"| {name} | {d['items']} | {d['seconds']:.1f} | {d['items'] / d['seconds']:.2f} | "
                f"{d['output_tokens']} | {d['output_tokens'] / d['seconds']:.1f} |")

    ratio = (server["items"] / server["seconds"]) / (off["items"] / off["seconds"])
    setting = f"{task}, {server.get('num_fewshot')}-shot, max_gen_toks {server.get('max_gen_toks') or 'task'}"
    return "\n".join([
        f"| path ({setting}, BF16) | items | seconds | items/s | output tokens | output tok/s |",
        "|---|---:|---:|---:|---:|---:|",
        row(f"server + lm-eval local-completions (concurrency {server['concurrency']}, "
            f"{server.get('batch_size', 1)} per request)", server),
        row("offline LLM.generate (upper bound)", off),
        f"\nserver path reaches {ratio:.0%} of the offline engine's items/s",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", default="fixtures/demo.yaml")
    ap.add_argument("--thresholds", default="thresholds/retention.yaml")
    ap.add_argument("--tests", default="tests")
    ap.add_argument("--results", default=None,
                    help="results dir; default a fresh temp dir (cold run), which the warm rerun then reuses")
    ap.add_argument("--skip-cold", action="store_true",
                    help="no cold run: rerun warm against --results (default: $QUANTGATE_RESULTS or results/)")
    ap.add_argument("--skip-warm", action="store_true", help="no warm rerun")
    ap.add_argument("--skip-throughput", action="store_true", help="no (c): items/s server vs offline")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments for the suite runs, one string")
    ap.add_argument("--task", default="gsm8k", help="generative task of the matrix for (c)")
    ap.add_argument("--items", type=int, default=32, help="items of the task for (c)")
    ap.add_argument("--model", default=None, help="model of the matrix for (c); default the first")
    ap.add_argument("--num-fewshot", type=int, default=None, help="(c): override the task's few-shot count")
    ap.add_argument("--max-gen-toks", type=int, default=None,
                    help="(c): cap generated tokens per item (both paths), default the matrix's setting")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="(c): lm-eval's concurrent requests to the server, default the matrix's setting")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="(c): prompts per request to the server, default the matrix's setting")
    ap.add_argument("--child-suite", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-offline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-json", help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.matrix = str(Path(args.matrix).resolve())
    args.thresholds = str(Path(args.thresholds).resolve())
    if args.child_suite:
        return _child_suite(args)
    if args.child_offline:
        return _child_offline(args)

    if args.results:
        results = Path(args.results).resolve()
    elif args.skip_cold:
        from quantgate.paths import results_dir

        results = results_dir()  # a warm rerun needs stored results: the project's own by default
    else:
        results = Path(tempfile.mkdtemp(prefix="qg_cold_"))
    tables = []
    runs = []
    if not args.skip_cold:
        if results.exists() and any(results.iterdir()):
            ap.error(f"--results {results} is not empty; a cold run needs a fresh directory")
        runs.append(run_suite(args, results, "cold"))
    if not args.skip_warm:
        runs.append(run_suite(args, results, "warm"))
    if runs:
        tables.append(suite_table(runs))
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory(prefix="qg_items_") as tmp:
            server = through_server(args, Path(tmp))
            spec = server.pop("spec")
            print(f"[suite_cost] server path: {server}", flush=True)  # kept even if the offline run fails
            off = offline(spec, Path(tmp))
        tables.append(throughput_table(server, off, args.task))
    print("\n## quantgate suite cost\n")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

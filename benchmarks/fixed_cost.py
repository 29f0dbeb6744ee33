"""lm-eval's fixed cost per evaluation (issue 14: at most 1 s): the time quantgate's `run_task` spends before
lm-eval sends its first request and after its last response, with one real vLLM server, measured side by side
in one process, so the machine's load is shared by both columns.

Per process, once: importing lm-eval's API model, and lm-eval's TaskManager built over every task it ships
(what quantgate did until session 6) against one over the folders of the named tasks only
(task_registry.task_manager). Per evaluation, alternately (ABAB..., after one untimed warm-up per task that
prepares the datasets): `run_task` as it was (lm-eval collects torch's environment report after the last
request and loads the tokenizer for every evaluation) and as it is now (lmeval_runner.env_info_not_collected,
lmeval_runner.tokenizers_reused). The request phase is timed around lm-eval's
own request calls (benchmarks/server_levers.recorded_requests); before = call start to first request sent,
after = last response parsed to the call's return. Every evaluation's requests are the same in both columns;
the per-item outcomes are compared and reported as flips.

  python benchmarks/fixed_cost.py --data-dir /work/shared/data --out /tmp/fixed_cost    # hellaswag 50, gsm8k 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# benchmarks/server_levers.py: run as a script, this file's folder is first on sys.path
import server_levers as levers

TASKS = {"hellaswag": ("acc_norm", 0), "gsm8k": ("exact_match,strict-match", 5)}


def timed_build(full: bool, names: list[str]) -> tuple[float, int]:
    """(seconds, index entries) of one TaskManager build: lm-eval's full index or the scoped one."""
    from quantgate.evaluation import task_registry

    task_registry.reset_task_manager()
    t0 = time.monotonic()
    manager = task_registry.task_manager(None if full else names)
    return time.monotonic() - t0, len(manager.task_index)


def evaluate(server: Any, task_name: str, limit: int, args: argparse.Namespace, *, env_info: bool) -> dict[str, Any]:
    """One run_task through the server; `env_info`: as it was (lm-eval collects torch's environment report and
    loads the tokenizer anew), else as it is now."""
    from quantgate.evaluation import lmeval_runner
    from quantgate.matrix import Generation, Task

    metric, shots = TASKS[task_name]
    task = Task(name=task_name, metric=metric, limit=limit, num_fewshot=shots)
    gen = Generation(temperature=0.0, seed=1234, max_gen_toks=args.max_gen_toks,
                     concurrency=args.concurrency, batch_size=args.batch_size)
    saved = lmeval_runner.env_info_not_collected, lmeval_runner.tokenizers_reused
    if env_info:  # as it was: lm-eval's environment report collected, the tokenizer loaded per evaluation
        lmeval_runner.env_info_not_collected = lmeval_runner.tokenizers_reused = contextlib.nullcontext
    try:
        with levers.recorded_requests() as spans:
            t0 = time.monotonic()
            _, samples, _ = lmeval_runner.run_task(
                completions_url=server.completions_url, served_name=server.served_name,
                tokenizer_dir=Path(args.model_dir), task=task, generation=gen, data_dir=Path(args.data_dir),
                api_key=server.api_key, max_length=args.max_model_len, scope=list(TASKS))
            t1 = time.monotonic()
    finally:
        lmeval_runner.env_info_not_collected, lmeval_runner.tokenizers_reused = saved
    first, last = levers.request_phase(spans)
    outcomes = lmeval_runner.item_outcomes(samples, task.metric_keys[0])
    return {"task": task_name, "env_info": env_info, "call_s": t1 - t0, "before_s": first - t0,
            "after_s": t1 - last, "request_s": last - first, "requests": len(spans), "outcomes": outcomes.as_map()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="BF16 checkpoint (default: the demo model's, from the cache)")
    ap.add_argument("--data-dir", default=os.environ.get("QUANTGATE_DATA_DIR"))
    ap.add_argument("--items", nargs="*", default=["hellaswag=50", "gsm8k=10"], metavar="TASK=N")
    ap.add_argument("--pairs", type=int, default=2, help="timed (as it was, as it is) pairs per task")
    ap.add_argument("--max-gen-toks", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", default="fixed_cost_out")
    args = ap.parse_args(argv)
    items = {k: int(v) for k, v in (kv.split("=") for kv in args.items)}
    if not args.data_dir or not Path(args.data_dir).is_dir():
        ap.error(f"--data-dir {args.data_dir!r} is not a directory")
    args.model_dir = str(Path(args.model_dir or levers._converted_bf16()).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[str] = []

    t0 = time.monotonic()
    import lm_eval.models.openai_completions  # noqa: F401 - once per process

    rows.append(f"| import lm-eval + its API model (once per process) | {time.monotonic() - t0:.2f} s | |")
    full_s, full_n = timed_build(True, list(items))  # also caches the task locations (first time per install)
    scoped_s, scoped_n = timed_build(False, list(items))
    rows.append(f"| TaskManager, full index ({full_n} entries; before) | {full_s:.2f} s | once per process |")
    rows.append(f"| TaskManager, the named tasks' folders ({scoped_n} entries; now) | {scoped_s:.2f} s | "
                "once per process |")

    from quantgate.engines.vllm_server import VllmServer

    records: list[dict[str, Any]] = []
    with VllmServer(Path(args.model_dir), log_path=out / "server.log", served_name="bf16",
                    max_model_len=args.max_model_len, seed=1234,
                    sequences=args.concurrency * args.batch_size) as server:
        for task, n in items.items():
            evaluate(server, task, 2, args, env_info=False)  # warm-up: datasets prepared
            for _ in range(args.pairs):
                for env_info in (True, False):
                    rec = evaluate(server, task, n, args, env_info=env_info)
                    records.append(rec)
                    print(f"{task} {'as it was' if env_info else 'now'}: before {rec['before_s']:.2f} s, "
                          f"after {rec['after_s']:.2f} s, requests {rec['request_s']:.2f} s", flush=True)
    (out / "records.json").write_text(json.dumps(records, indent=1))
    lines = ["| per process | seconds | |", "|---|---:|---|", *rows, "",
             "| task | items | run_task | runs | before first request s (median) | after last request s (median) | "
             "request phase s (median) | flips vs the first run |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for task, n in items.items():
        base = next(r["outcomes"] for r in records if r["task"] == task)
        for env_info, label in ((True, "as it was (env report, tokenizer per evaluation)"), (False, "now")):
            rs = [r for r in records if r["task"] == task and r["env_info"] == env_info]
            flips = max(sum(r["outcomes"].get(k) != v for k, v in base.items()) for r in rs)
            med = {k: statistics.median(r[k] for r in rs) for k in ("before_s", "after_s", "request_s")}
            lines.append(f"| {task} | {n} | {label} | {len(rs)} | {med['before_s']:.2f} | {med['after_s']:.2f} | "
                         f"{med['request_s']:.2f} | {flips} |")
    table = "\n".join(lines)
    (out / "fixed_cost.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

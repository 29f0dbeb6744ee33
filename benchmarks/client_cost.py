"""lm-eval's client-side cost per evaluation at full size, without a GPU: quantgate's `run_task` against a stub
OpenAI-compatible server that answers at once, so every second measured is the client's (issue 14: "fixed
cost <= 1 s per evaluation"; on the H200 the full hellaswag paid 25.8 s before its first request and 14.4 s
after its last, reports/gpu-h200.md).

The stub is a measurement fixture, not a model: it answers /v1/completions in vLLM's response shape
(vllm/entrypoints/openai/completion/protocol.py: `choices[i].logprobs` with `tokens`, `token_logprobs`,
`top_logprobs`, `text_offset` over prompt + generated tokens for `echo`; `text`, `finish_reason`, `token_ids`
on `return_token_ids`; `usage`) with constant logprobs and a constant answer. Scores from it mean nothing;
its responses are the size vLLM's are, so parsing costs what it costs against vLLM. It runs in a child
process, so its CPU is not the client's (on 2 cores it competes, which the request phase shows, not
before/after).

Timed around lm-eval's own request calls (benchmarks/server_levers.recorded_requests): before = `run_task`
called to the first HTTP request sent; request phase = first request sent to last response parsed; after = the
last response parsed to `run_task` returned. "in flight" is the part of the request phase during which at least
one request was outstanding: with `--repeats TASK=k` (quantgate's repeats: k lm-eval evaluations in one
`run_task`) the request phase also holds the gaps between the k evaluations, each one's own before and after.
`requests` counts HTTP requests (16 lm-eval requests each by default), `items` the task's distinct documents,
`load` the 1-minute load average after the call. One untimed 2-item evaluation per task goes first (datasets
prepared, TaskManager and tokenizer loaded). `--profile` writes the cumulative and self-time cProfile of the
whole call per task (profile-TASK.txt, profile-TASK-self.txt).

  python benchmarks/client_cost.py --data-dir /work/shared/data --tokenizer CKPT --out /tmp/cc \
      --items hellaswag=all gsm8k=400 --repeats gsm8k=6 [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# benchmarks/server_levers.py: run as a script, this file's folder is first on sys.path
import server_levers as levers

ROOT = Path(__file__).resolve().parents[1]

TASKS = {"hellaswag": ("acc_norm", 0), "gsm8k": ("exact_match,strict-match", 5)}
ANSWER = "Natalia sold 48 clips in April. The answer is 72."

STUB = r'''
import json, sys
from aiohttp import web

ANSWER = sys.argv[2]

def completion(body):
    prompts = body["prompt"]
    if prompts and isinstance(prompts[0], int) or isinstance(prompts, str):
        prompts = [prompts]
    choices, n_prompt = [], 0
    for i, p in enumerate(prompts):
        ids = p if isinstance(p, list) else list(range(len(p.split())))
        n_prompt += len(ids)
        if body.get("echo"):
            toks = [f"t{t}" for t in ids] + ["t0"]
            lps = [None] + [-1.0] * len(ids)
            top = [None] + [{t: -1.0} for t in toks[1:]]
            off = list(range(len(toks)))
            choices.append({"index": i, "text": "".join(toks), "finish_reason": "length",
                            "logprobs": {"tokens": toks, "token_logprobs": lps, "top_logprobs": top,
                                         "text_offset": off}})
        else:
            c = {"index": i, "text": ANSWER, "finish_reason": "stop", "logprobs": None}
            if body.get("return_token_ids"):
                c["token_ids"] = list(range(12))
            choices.append(c)
    gen = len(choices) * (1 if body.get("echo") else 12)
    return {"id": "cmpl-stub", "object": "text_completion", "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": gen, "total_tokens": n_prompt + gen}}

async def completions(request):
    return web.json_response(completion(await request.json()))

async def models(request):
    return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

app = web.Application(client_max_size=256 * 1024 * 1024)
app.add_routes([web.post("/v1/completions", completions), web.get("/v1/models", models)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def stub_server() -> Any:
    """The stub in a child process; yields its completions URL once it answers."""
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", STUB, str(port), ANSWER])
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        for _ in range(200):
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the stub server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def evaluate(url: str, task_name: str, limit: int | None, repeats: int, args: argparse.Namespace,
             profile: cProfile.Profile | None) -> dict[str, Any]:
    from quantgate.evaluation import lmeval_runner
    from quantgate.matrix import Generation, Task

    metric, shots = TASKS[task_name]
    task = Task(name=task_name, metric=metric, limit=limit, num_fewshot=shots)
    gen = Generation(temperature=0.0, seed=1234, max_gen_toks=256, concurrency=args.concurrency,
                     batch_size=args.batch_size)
    with levers.recorded_requests() as spans:
        t0 = time.monotonic()
        if profile:
            profile.enable()
        try:
            _, samples, _ = lmeval_runner.run_task(
                completions_url=url, served_name="stub", tokenizer_dir=Path(args.tokenizer), task=task,
                generation=gen, data_dir=Path(args.data_dir), max_length=2048, repeats=repeats,
                scope=list(TASKS))
        finally:
            if profile:
                profile.disable()
        t1 = time.monotonic()
    first, last = levers.request_phase(spans)
    busy = _busy_seconds(spans)
    items = len({(s.get("task"), s.get("doc_id")) for s in samples})
    return {"task": task_name, "items": items, "repeats": repeats,
            "requests": len(spans), "call_s": t1 - t0, "before_s": first - t0, "after_s": t1 - last,
            "request_phase_s": last - first, "requests_in_flight_s": busy,
            "load": os.getloadavg()[0]}


def _busy_seconds(spans: list[Any]) -> float:
    """Seconds during which at least one request was in flight (the union of the spans)."""
    total, end = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.sent):
        if s.sent > end:
            total += s.done - s.sent
            end = s.done
        elif s.done > end:
            total += s.done - end
            end = s.done
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("QUANTGATE_DATA_DIR") or str(ROOT.parent / "shared" / "data"),
                    help="offline evaluation data (default: $QUANTGATE_DATA_DIR, else ../shared/data)")
    ap.add_argument("--tokenizer", required=True, help="a checkpoint folder with the tokenizer files")
    ap.add_argument("--out", default="client_cost_out", help="folder for client_cost.md/.jsonl and profiles")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--items", nargs="*", default=["hellaswag=all", "gsm8k=400"],
                    help="TASK=N or TASK=all")
    ap.add_argument("--repeats", nargs="*", default=["gsm8k=6"], help="TASK=k")
    ap.add_argument("--runs", type=int, default=1, help="timed runs per task (default 1)")
    ap.add_argument("--batch-size", type=int, default=16, help="lm-eval requests per HTTP request (default 16)")
    ap.add_argument("--concurrency", type=int, default=64, help="HTTP requests in flight (default 64)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = {k: (None if v == "all" else int(v)) for k, v in (s.split("=") for s in args.items)}
    repeats = {k: int(v) for k, v in (s.split("=") for s in args.repeats)}

    t0 = time.monotonic()
    import lm_eval.models.openai_completions  # noqa: F401 - once per process, reported apart

    import_s = time.monotonic() - t0
    records: list[dict[str, Any]] = []
    with stub_server() as url:
        for task in args.tasks:
            # untimed warm-up: prepares the offline dataset, the TaskManager and the tokenizer
            evaluate(url, task, 2, 1, args, None)
            for i in range(args.runs):
                prof = cProfile.Profile() if args.profile and i == 0 else None
                rec = evaluate(url, task, items.get(task), repeats.get(task, 1), args, prof)
                records.append(rec)
                print(json.dumps(rec), flush=True)
                if prof:
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(60)
                    (out / f"profile-{task}.txt").write_text(buf.getvalue())
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
                    (out / f"profile-{task}-self.txt").write_text(buf.getvalue())
    (out / "client_cost.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = [f"import lm-eval + its API model: {import_s:.2f} s", "",
             "| task | items | repeats | requests | before s | request phase s | in flight s | after s | call s "
             "| load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['task']} | {r['items']} | {r['repeats']} | {r['requests']} | {r['before_s']:.2f} | "
                     f"{r['request_phase_s']:.2f} | {r['requests_in_flight_s']:.2f} | {r['after_s']:.2f} | "
                     f"{r['call_s']:.2f} | {r['load']:.1f} |")
    (out / "client_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

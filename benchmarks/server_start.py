"""Issue 14 item 3: a CPU server's time to healthy, one start lever at a time, and proof that it computes the same.

Starts quantgate's own server (engines/vllm_server.VllmServer, exactly as a run starts it) for one checkpoint,
in alternating order (A B A B ...: the machine is shared and its load drifts), once per configuration per round.
Per start it records quantgate's `startup_seconds` (process start to `/health` 200), the processes vLLM ran
(the log's `(Name pid=N)` prefixes), the kernel path quantgate parses from the log (engines/kernels.py), and
the responses to a few fixed /v1/completions requests: greedy generation with top-5 logprobs, and echo +
prompt logprobs with max_tokens 1 (what lm-eval's loglikelihood requests are). Every configuration's
responses are compared with the first configuration's: identical text and token ids, logprobs within --atol.

  python benchmarks/server_start.py --model-dir CKPT --rounds 3 --out OUT \\
      --config default= --config inproc=env:VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
      --config uni=arg:--distributed-executor-backend=uni

A config is NAME=ITEM,ITEM...; ITEM is env:KEY=VALUE or arg:--flag=value (passed as one vLLM argument).
Writes OUT/starts.jsonl (one line per start) and OUT/summary.md (medians, equivalence, `uptime` per start).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quantgate.engines.kernels import kernel_path  # noqa: E402
from quantgate.engines.vllm_server import VllmServer  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "A man is sitting on a roof. He starts pulling up roofing on the roof.",
)
_PROCESS = re.compile(r"^\((?P<name>[A-Za-z]+)(?:-\d+)? pid=(?P<pid>\d+)\)", re.M)


def parse_config(text: str) -> tuple[str, dict[str, str], list[str]]:
    """NAME=ITEM,ITEM... -> (name, env, args); see the module docstring."""
    name, _, items = text.partition("=")
    env: dict[str, str] = {}
    args: list[str] = []
    for item in filter(None, items.split(",")):
        kind, _, value = item.partition(":")
        if kind == "env":
            k, _, v = value.partition("=")
            env[k] = v
        elif kind == "arg":
            args.append(value)
        else:
            raise SystemExit(f"--config {text!r}: item {item!r} is neither env:K=V nor arg:--flag=v")
    return name, env, args


def requests_for(server: VllmServer) -> list[dict[str, Any]]:
    """The fixed requests' responses, reduced to what must be identical (choices' text, tokens, logprobs)."""
    import requests

    out = []
    headers = {"Authorization": f"Bearer {server.api_key}"}
    for prompt in PROMPTS:
        for body in (
            {"prompt": prompt, "max_tokens": 24, "temperature": 0.0, "logprobs": 5, "seed": 1234},
            {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": 1, "echo": True},
        ):
            r = requests.post(server.completions_url, headers=headers, timeout=300,
                              json={"model": server.served_name, **body})
            r.raise_for_status()
            choice = r.json()["choices"][0]
            lp = choice["logprobs"]
            out.append({"text": choice["text"], "tokens": lp["tokens"], "token_logprobs": lp["token_logprobs"],
                        "top_logprobs": lp["top_logprobs"]})
    return out


def differences(a: list[dict[str, Any]], b: list[dict[str, Any]], atol: float) -> list[str]:
    """Where response list `b` differs from `a`: text or tokens at all, logprobs by more than `atol`."""
    diffs = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x["text"] != y["text"] or x["tokens"] != y["tokens"]:
            diffs.append(f"request {i}: text/tokens differ")
            continue
        for j, (p, q) in enumerate(zip(x["token_logprobs"], y["token_logprobs"], strict=True)):
            if (p is None) != (q is None) or (p is not None and abs(p - q) > atol):
                diffs.append(f"request {i} token {j}: logprob {p} vs {q}")
        for j, (p, q) in enumerate(zip(x["top_logprobs"], y["top_logprobs"], strict=True)):
            if (p is None) != (q is None):
                diffs.append(f"request {i} token {j}: top_logprobs present in one only")
            elif p is not None and (set(p) != set(q) or any(abs(p[k] - q[k]) > atol for k in p)):
                diffs.append(f"request {i} token {j}: top_logprobs differ")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--config", action="append", required=True, help="NAME=ITEM,... (the first is the reference)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = [parse_config(c) for c in args.config]
    reference: list[dict[str, Any]] | None = None
    starts: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for name, env, extra in configs:
            log = out / f"{name}-{rnd}.log"
            load_before = os.getloadavg()[0]
            server = VllmServer(Path(args.model_dir), log_path=log, served_name="m", seed=1234,
                                extra_args=extra, env=env, sequences=16)
            with server:
                responses = requests_for(server)
            text = log.read_text(errors="replace")
            processes = sorted({m["name"] for m in _PROCESS.finditer(text)})
            if reference is None:
                reference = responses
            row = {"config": name, "round": rnd, "startup_s": round(server.startup_seconds or 0.0, 1),
                   "load1_before": load_before, "load1_after": os.getloadavg()[0], "processes": processes,
                   "kernel_path": kernel_path(text), "diffs": differences(reference, responses, args.atol),
                   "env": env, "args": extra}
            starts.append(row)
            with open(out / "starts.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            time.sleep(2)
    lines = ["| config | starts (s) | median (s) | processes | kernel path | differs from first |",
             "|---|---|---|---|---|---|"]
    for name, _, _ in configs:
        rows = [r for r in starts if r["config"] == name]
        times = [r["startup_s"] for r in rows]
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in times)} | {statistics.median(times):.1f} | "
                     f"{', '.join(rows[0]['processes'])} | {rows[0]['kernel_path']} | "
                     f"{sum(bool(r['diffs']) for r in rows)}/{len(rows)} |")
    loads = [r["load1_before"] for r in starts]
    lines.append(f"\n1-min load average before the starts: {min(loads):.2f} to {max(loads):.2f} "
                 f"(median {statistics.median(loads):.2f}), {os.cpu_count()} CPUs")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

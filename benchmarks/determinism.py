"""How far apart two identical runs are: the noise floor every paired gate and regression is judged against.

Evaluates one variant's task twice, each time into its own fresh results directory (so nothing is reused) with
identical engine and client settings, and reports per item: answers that differ (generative tasks), outcomes
that flip, and the score of each run. With `--batch-invariant` the server runs vLLM's batch-invariant kernels
(VLLM_BATCH_INVARIANT=1; `batch_invariant: true` on a model in a matrix).

    PYTHONPATH=src python benchmarks/determinism.py --matrix fixtures/demo.yaml --variant w8a8-int8 \
        --task ifeval --limit 40 [--batch-invariant] [--json out.json]

Every figure printed carries the hardware, versions, kernel and n.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from quantgate.evaluation.provenance import versions
from quantgate.matrix import load_matrix, load_thresholds, with_task_limits
from quantgate.runner import Run


def one_run(matrix, thresholds, model: str, variant: str, task: str, root: Path) -> dict:  # noqa: ANN001
    run = Run(matrix, thresholds, root)
    try:
        t0 = time.monotonic()
        vr = run.variant(model, variant)
        res = vr.results([run.task(task)])[task]
        seconds = time.monotonic() - t0
    finally:
        run.close()
    out = res.outcomes(run.task(task).metric_key)
    return {"outcomes": out, "kernel": res.kernel_path, "engine": res.engine, "seconds": seconds,
            "hardware": run.hw.as_dict()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", default="fixtures/demo.yaml")
    ap.add_argument("--thresholds", default="thresholds/retention.yaml")
    ap.add_argument("--model", default=None, help="default: the matrix's first model")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-invariant", action="store_true", help="serve with VLLM_BATCH_INVARIANT=1")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    matrix = with_task_limits(load_matrix(args.matrix), f"{args.task}={args.limit}")
    model = args.model or matrix.models[0].name
    if args.batch_invariant:
        models = [m.model_copy(update={"batch_invariant": True}) if m.name == model else m for m in matrix.models]
        matrix = matrix.model_copy(update={"models": models})
    thresholds = load_thresholds(args.thresholds)
    runs = []
    with tempfile.TemporaryDirectory(prefix="qg-determinism-") as tmp:
        for i in (1, 2):
            runs.append(one_run(matrix, thresholds, model, args.variant, args.task, Path(tmp) / f"run{i}"))
    a, b = runs[0]["outcomes"], runs[1]["outcomes"]
    common = [d for d in a.ids if d in set(b.ids)]
    av, bv = a.aligned(tuple(common)), b.aligned(tuple(common))
    flips = int(sum(x != y for x, y in zip(av.values, bv.values, strict=True)))
    differ = sum(a.answers.get(d) != b.answers.get(d) for d in common) if a.answers else None
    report = {
        "model": model, "variant": args.variant, "task": args.task, "n": len(common),
        "batch_invariant": args.batch_invariant, "kernel": runs[0]["kernel"], "engine": runs[0]["engine"],
        "hardware": runs[0]["hardware"], "versions": versions(),
        "scores": [a.score(), b.score()], "outcome_flips": flips, "answers_differ": differ,
        "seconds": [r["seconds"] for r in runs],
    }
    hw = report["hardware"]
    print(f"{model}/{args.variant} {args.task}, n = {len(common)}, kernel {report['kernel']}, "
          f"{hw.get('hw_class')} {hw.get('name')}, vllm {report['versions'].get('vllm')}, "
          f"batch-invariant {args.batch_invariant}")
    print(f"  scores {a.score():.4f} vs {b.score():.4f}; per-item outcomes flipped: {flips} of {len(common)}"
          + (f"; answers differ: {differ} of {len(common)}" if differ is not None else ""))
    print(f"  wall per run: {', '.join(f'{s:.0f} s' for s in report['seconds'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

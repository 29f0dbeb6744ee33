"""Distribution metrics of quantized variants against BF16 on real vLLM servers (a script, not a test).

Teacher-forces the matrix's text set (WikiText-2 chunks) through the BF16 server, then each variant's server,
one server at a time, stores both in the result store, and prints mean KL, top-1 agreement and Δlogp with
intervals over documents, percentiles, the format's gate verdicts, and the provenance.

  PYTHONPATH=src python benchmarks/distribution_demo.py --variants w8a8-int8 --documents 8 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from quantgate.evaluation.distribution import compare, distribution_result, settings_of
from quantgate.gates.distribution import distribution_verdicts, overall_outcome
from quantgate.matrix import (
    DistributionSet,
    load_distribution_thresholds,
    load_matrix,
    load_thresholds,
)
from quantgate.runner import Run

ROOT = Path(__file__).resolve().parents[1]


def _row(name: str, s, pcts: tuple[str, ...]) -> str:  # noqa: ANN001
    body = f"{name:<20} {s.mean:>10.5f} [{s.low:.5f}, {s.high:.5f}]"
    for p in pcts:
        e, lo, hi = s.percentiles[p]
        body += f"  {p} {e:.4g} [{lo:.4g}, {hi:.4g}]"
    return body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", default=str(ROOT / "fixtures/demo.yaml"))
    ap.add_argument("--thresholds", default=str(ROOT / "thresholds/retention.yaml"))
    ap.add_argument("--limits", default=str(ROOT / "thresholds/distribution.yaml"))
    ap.add_argument("--results", default="results", help="result store (reused across runs)")
    ap.add_argument("--model", default=None, help="model name (default: the matrix's first)")
    ap.add_argument("--variants", nargs="*", default=None, help="variant names (default: every non-BF16)")
    ap.add_argument("--documents", type=int, default=None, help="override the matrix's distribution.documents")
    ap.add_argument("--tokens", type=int, default=None, help="override distribution.tokens")
    ap.add_argument("--top-k", type=int, default=None, help="override distribution.top_k")
    ap.add_argument("--json", default=None, help="also write the figures and provenance to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    matrix = load_matrix(args.matrix)
    base = matrix.distribution or DistributionSet()
    overrides = {k: v for k, v in (("documents", args.documents), ("tokens", args.tokens),
                                   ("top_k", args.top_k)) if v is not None}
    matrix = matrix.model_copy(update={"distribution": base.model_copy(update=overrides)})
    DistributionSet.model_validate(matrix.distribution.model_dump())  # the overrides obey the schema
    limits = load_distribution_thresholds(args.limits)
    model = matrix.models[0] if args.model is None else next(m for m in matrix.models if m.name == args.model)
    names = args.variants or [v.name for v in model.variants if v.format != "bf16"]

    run = Run(matrix, load_thresholds(args.thresholds), Path(args.results).resolve())
    t0 = time.monotonic()
    report = {}
    try:
        distribution_result(run, model.name, model.baseline.name)  # the reference first, its server alone
        run.stop_servers()
        for name in names:
            t1 = time.monotonic()
            cmp = compare(run, model.name, name, level=limits.level)
            run.stop_servers()
            fmt = run.variant(model.name, name).variant.format
            verdicts = distribution_verdicts(cmp.summaries, limits.limits(fmt), label=f"{model.name}/{name}")
            s = cmp.summaries
            prov = cmp.provenance()
            print(f"\n== {model.name}/{name} ({fmt}) vs {model.baseline.name}: "
                  f"{prov['n_documents']} documents, {prov['n_tokens']} scored tokens, "
                  f"top-{settings_of(run).top_k}; intervals {100 * limits.level:.0f}% over documents")
            print(_row("KL (nats)", s["kl"], ("p50", "p90", "p99", "max")))
            print(_row("top-1 agreement", s["top1_agree"], ()))
            print(_row("Δlogp (nats)", s["delta_logp"], ("min", "p1", "p10", "p50", "p90", "p99")))
            print(_row("Δp", s["delta_p"], ("p1", "p50", "p99")))
            for v in verdicts:
                print(v.message())
            print(f"gate: {overall_outcome(verdicts).label}")
            print(f"kernel: {prov['variant']['kernel_path']} (engine {prov['variant']['engine']}); reference "
                  f"kernel: {prov['reference']['kernel_path']}")
            print(f"hardware: {json.dumps(prov['hardware'])}")
            print(f"versions: {json.dumps(prov['versions'])}")
            print(f"stored: {prov['variant']['result']} and {prov['reference']['result']}")
            print(f"seconds for this variant (build, serve, score, compare): {time.monotonic() - t1:.1f}")
            report[name] = {
                "summaries": {k: v.as_dict() for k, v in s.items()},
                "verdicts": [{"limit": v.limit_name, "value": v.limit, "status": v.outcome.value,
                              "required_n": v.required_n} for v in verdicts],
                "provenance": prov,
            }
    finally:
        run.close()
    wall = time.monotonic() - t0
    print(f"\nwall time {wall:.1f} s; server starts {run.events.servers_started}; "
          f"scored {run.events.evaluated}; reused {run.events.reused}; seconds {run.events.seconds}")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": wall, "variants": report}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

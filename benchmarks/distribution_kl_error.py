"""The error of the top-k-with-tail KL against full-vocabulary KL, measured offline with full logits.

No server: the BF16 checkpoint and an emulated variant run in transformers (float32 compute), so every
position's full next-token distribution is available. For each position the exact KL(P_bf16 || Q_variant)
over the whole vocabulary is compared with what the distribution gate computes from the two top-k lists plus
the reference token (``quantgate.gates.distribution.topk_tail_kl``), for several k. The text set is the gate's
own (WikiText-2 chunks, ``quantgate.evaluation.distribution.text_chunks``).

Variants (emulated in torch):
  w8a8-int8   the cached llm-compressor W8A8 build of the demo matrix: its int8 weights times their
              per-channel scales (SmoothQuant's folded norms included), and per-token dynamic symmetric int8
              fake quantization of every quantized Linear's input (the W8A8 activation scheme)
  w4-g64      4-bit symmetric round-to-nearest weights, groups of 64 (the w4a16-g64 recipe, RTN)
  w4-channel  4-bit symmetric RTN per output channel, no groups (a deliberately damaged build)

  PYTHONPATH=src python benchmarks/distribution_kl_error.py --documents 8 --tokens 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from quantgate.checkpoints.obtain import baseline_checkpoint, built_checkpoint
from quantgate.gates.distribution import topk_tail_kl
from quantgate.matrix import DistributionSet, load_matrix
from quantgate.paths import data_dir


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def fake_quant_rtn(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric round-to-nearest: scale = max|w| / (2^(bits-1) - 1) per output row, or per group of columns."""
    qmax = 2 ** (bits - 1) - 1
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group) if group else w.reshape(rows, 1, cols)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.round(g / scale).clamp(-qmax - 1, qmax) * scale).reshape(rows, cols)


def _act_int8_hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    x = args[0]
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(x / scale).clamp(-128, 127) * scale, *args[1:])


def w8a8_from_build(bf16: Path, build: Path) -> torch.nn.Module:
    from safetensors import safe_open

    model = _load(bf16)
    state = model.state_dict()
    with safe_open(str(build / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for k in keys:
            if k.endswith("weight_scale"):
                continue
            t = f.get_tensor(k)
            if t.dtype == torch.int8:
                t = t.float() * f.get_tensor(k + "_scale").float()
            state[k].copy_(t.float())
    for name, lin in _linears(model):
        if f"{name}.weight_scale" in keys:
            lin.register_forward_pre_hook(_act_int8_hook)
    return model


def rtn_variant(bf16: Path, bits: int, group: int | None) -> torch.nn.Module:
    model = _load(bf16)
    with torch.no_grad():
        for _, lin in _linears(model):
            lin.weight.copy_(fake_quant_rtn(lin.weight, bits, group))
    return model


@torch.no_grad()
def log_softmax_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(L-1, V) float64 log-probabilities of the next token at positions 0..L-2."""
    out = model(torch.tensor([ids])).logits[0, :-1].double()
    return torch.log_softmax(out, dim=-1)


def compare_one(lp: torch.Tensor, lq: torch.Tensor, ids: list[int], ks: list[int]) -> dict[str, np.ndarray]:
    full = (lp.exp() * (lp - lq)).sum(-1).numpy()
    ref = torch.tensor(ids[1:])
    p_ref = lp.gather(1, ref[:, None])[:, 0].numpy()
    q_ref = lq.gather(1, ref[:, None])[:, 0].numpy()
    out = {"full": full}
    for k in ks:
        pv, pi = lp.topk(k, dim=-1)
        qv, qi = lq.topk(k, dim=-1)
        out[f"k{k}"] = topk_tail_kl(pi.numpy(), pv.numpy(), qi.numpy(), qv.numpy(), ref.numpy(), p_ref, q_ref)
        out[f"tail{k}"] = 1 - pv.exp().sum(-1).numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", default="fixtures/demo.yaml", help="whose BF16 and W8A8 checkpoints to use")
    ap.add_argument("--variant", default="w8a8-int8", help="the matrix's W8A8 variant (built if not cached)")
    ap.add_argument("--documents", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--ks", default="5,10,20")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ks = [int(k) for k in args.ks.split(",")]
    matrix = load_matrix(args.matrix)
    model = matrix.models[0]
    bf16 = baseline_checkpoint(model).path
    w8a8 = built_checkpoint(model, next(v for v in model.variants if v.name == args.variant),
                            baseline_checkpoint(model)).path

    from quantgate.evaluation.distribution import text_chunks

    chunks = text_chunks(bf16, DistributionSet(documents=args.documents, tokens=args.tokens), data_dir())
    t0 = time.monotonic()
    base = _load(bf16)
    ref_lp = [log_softmax_logits(base, ids) for _, _, ids in chunks]
    del base
    variants = {"w4-g64": lambda: rtn_variant(bf16, 4, 64), "w4-channel": lambda: rtn_variant(bf16, 4, None)}
    variants = {"w8a8-int8": lambda: w8a8_from_build(bf16, w8a8), **variants}
    report: dict[str, dict] = {}
    print(f"BF16 {bf16}; W8A8 build {w8a8}; {args.documents} documents x {args.tokens} tokens; "
          f"torch {torch.__version__}, float32 compute, {torch.get_num_threads()} threads", flush=True)
    for name, make in variants.items():
        model = make()
        parts = [
            compare_one(lp, log_softmax_logits(model, ids), ids, ks)
            for lp, (_, _, ids) in zip(ref_lp, chunks, strict=True)
        ]
        del model
        full = np.concatenate([p["full"] for p in parts])
        row = {"full_mean": float(full.mean()), "full_p99": float(np.percentile(full, 99))}
        print(f"\n{name}: full-vocabulary mean KL {full.mean():.6f} nats (p99 {row['full_p99']:.4f}), "
              f"{full.size} tokens")
        for k in ks:
            approx = np.concatenate([p[f"k{k}"] for p in parts])
            tail = np.concatenate([p[f"tail{k}"] for p in parts])
            assert (approx <= full + 1e-9).all(), "the top-k-with-tail KL must be a lower bound"
            under = full - approx
            rel = approx.mean() / full.mean() - 1
            doc_rel = [p[f"k{k}"].mean() / p["full"].mean() - 1 for p in parts]
            row[f"k{k}"] = {"approx_mean": float(approx.mean()), "relative_error_of_mean": float(rel),
                            "per_document_relative_error_range": [float(min(doc_rel)), float(max(doc_rel))],
                            "token_underestimate_p50": float(np.median(under)),
                            "token_underestimate_p99": float(np.percentile(under, 99)),
                            "bf16_tail_mass_mean": float(tail.mean())}
            print(f"  top-{k:<2} + tail: mean KL {approx.mean():.6f} ({100 * rel:+.1f}% of full; per document "
                  f"{100 * min(doc_rel):+.1f}% .. {100 * max(doc_rel):+.1f}%); per-token underestimate "
                  f"p50 {np.median(under):.2e} p99 {np.percentile(under, 99):.2e}; BF16 mass outside the "
                  f"top-{k}: {tail.mean():.3f}", flush=True)
        report[name] = row
    print(f"\nwall {time.monotonic() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

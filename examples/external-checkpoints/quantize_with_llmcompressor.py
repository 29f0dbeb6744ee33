"""Make compressed-tensors checkpoints the way a third party would: llm-compressor's `oneshot`, called directly.

quantgate does not take part: no quantgate import, no quantgate recipe, no quantgate metadata in the output. The
files are what any llm-compressor user publishes (config.json with `quantization_config`, safetensors, tokenizer),
so quantgate has to learn what they are from their own config (quantgate.checkpoints.identity), as it would for a
checkpoint downloaded from the Hub.

    python quantize_with_llmcompressor.py --base BF16_DIR --out OUT_DIR --scheme NVFP4 [--calibration-text FILE]
        [--smoothquant ALPHA]

`--scheme` is a compressed-tensors preset name (llmcompressor.modifiers.quantization.QuantizationModifier):
NVFP4 (W4A4: needs calibration text for the activations' global scale), NVFP4A16, W8A8, W4A16, FP8_DYNAMIC.
Run it in an environment with llmcompressor (quantgate's own builder environment serves: see prepare.py).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def calibration_dataset(path: Path, samples: int, seq_len: int, tokenizer, seed: int = 0):
    """`samples` paragraphs of running text (WikiText-2's blank-line-separated paragraphs), tokenized."""
    from datasets import Dataset

    paras = [p.strip() for p in path.read_text(encoding="utf-8").split("\n \n") if len(p.strip()) > 200]
    random.Random(seed).shuffle(paras)
    enc = tokenizer(paras[:samples], truncation=True, max_length=seq_len)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="a BF16 Hugging Face checkpoint folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--calibration-text", type=Path, help="raw text (WikiText-2 wiki.test.raw) for activation scales")
    ap.add_argument("--smoothquant", type=float, help="SmoothQuant strength (alpha) before quantizing, e.g. 0.8")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    recipe = [QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])]
    if args.smoothquant:
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        recipe.insert(0, SmoothQuantModifier(smoothing_strength=args.smoothquant))
    kwargs = {}
    if args.calibration_text:
        kwargs = {"dataset": calibration_dataset(args.calibration_text, args.samples, args.seq_len, tokenizer),
                  "num_calibration_samples": args.samples, "max_seq_length": args.seq_len}
    oneshot(model=model, recipe=recipe, **kwargs)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({args.scheme})")


if __name__ == "__main__":
    main()

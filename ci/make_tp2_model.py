"""Write the model of fixtures/gpu-tp2.yaml: SmolLM2-135M's tokenizer and vocabulary on a 4-layer Llama with
8 attention heads (4 KV heads) and random weights (seed 0), so that vLLM can split it over 2 GPUs (SmolLM2-135M
has 9 heads, and vLLM needs the heads divisible by the tensor-parallel size). It shows the TP-2 serving path,
not accuracy. usage: python ci/make_tp2_model.py [--out /tmp/qg-tp2-model] [--matrix fixtures/gpu.yaml]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/tmp/qg-tp2-model")
    ap.add_argument("--matrix", default="fixtures/gpu.yaml", help="a matrix whose first model lends its tokenizer")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantgate.checkpoints.obtain import baseline_checkpoint
    from quantgate.matrix import load_matrix

    src = baseline_checkpoint(load_matrix(args.matrix).models[0]).path  # converts the GGUF once if needed
    base = json.loads((src / "config.json").read_text())
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=base.get("max_position_embeddings", 2048),
        rms_norm_eps=base.get("rms_norm_eps", 1e-5), rope_theta=base.get("rope_theta", 100000.0),
        tie_word_embeddings=True, bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, 8 heads / 4 KV heads")


if __name__ == "__main__":
    main()

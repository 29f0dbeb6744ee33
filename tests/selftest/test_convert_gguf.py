"""GGUF -> HF conversion: the special tokens come from the GGUF's own metadata (a synthetic GGUF written with
gguf.GGUFWriter; the real conversion needs transformers and runs in the slow suite)."""

import json
from pathlib import Path

import numpy as np
import pytest

from quantgate.checkpoints.convert_gguf import gguf_special_tokens, write_special_tokens
from quantgate.errors import BuildError


def _gguf(path: Path, tokens: list[str], **ids: int) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    for role, token_id in ids.items():
        getattr(w, f"add_{role}_token_id")(token_id)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_special_tokens_from_gguf_metadata_replace_wrong_ones(tmp_path):
    # As SmolLM2-Instruct's GGUF: <|im_end|> (2) ends a turn, while transformers' conversion declared
    # <|im_start|> (1) as EOS in tokenizer_config.json.
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello"]
    special = gguf_special_tokens(_gguf(tmp_path / "m.gguf", tokens, bos=1, eos=2, pad=2))
    assert special == {"bos": (1, "<|im_start|>"), "eos": (2, "<|im_end|>"), "pad": (2, "<|im_end|>")}
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 1, "bos_token_id": 1}))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_start|>", "eos_token_id": 1,
                                                           "bos_token": "<|im_start|>"}))
    write_special_tokens(out, special)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["eos_token_id"], cfg["bos_token_id"], cfg["pad_token_id"], cfg["model_type"]) == (2, 1, 2, "llama")
    assert (gen["eos_token_id"], gen["bos_token_id"]) == (2, 1)
    assert (tok["eos_token"], tok["eos_token_id"], tok["bos_token"]) == ("<|im_end|>", 2, "<|im_start|>")


def test_gguf_without_eos_or_with_an_id_outside_the_vocabulary_is_named(tmp_path):
    with pytest.raises(BuildError, match=r"no tokenizer\.ggml\.eos_token_id"):
        gguf_special_tokens(_gguf(tmp_path / "a.gguf", ["a", "b"], bos=0))
    with pytest.raises(BuildError, match=r"tokenizer\.ggml\.eos_token_id = 7 is not in tokenizer\.ggml\.tokens"):
        gguf_special_tokens(_gguf(tmp_path / "b.gguf", ["a", "b"], eos=7))

"""inspect_checkpoint on tiny synthetic checkpoints: scheme detection, scales, what was left unquantized,
size, weight error against the BF16 baseline, packed-byte entropy, and clear errors for broken dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from quantgate.checkpoints.inspect import byte_entropy, inspect_checkpoint
from quantgate.errors import BuildError
from tests.selftest.test_emulation import LINEARS, TINY, make_bf16_checkpoint, make_quantized_checkpoint

N_LINEARS = TINY["num_hidden_layers"] * len(LINEARS)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return make_bf16_checkpoint(tmp_path_factory.mktemp("bf16"))


def _expected_mse(base: Path, encoded: dict) -> float:
    ref = load_file(str(base / "model.safetensors"))
    sse = n = 0
    for prefix, w in encoded.items():
        d = w.double() - ref[f"{prefix}.weight"].double()
        sse += float((d * d).sum())
        n += d.numel()
    return sse / n


def test_modelopt_nvfp4_report(tiny_base, tmp_path):
    encoded = make_quantized_checkpoint(tiny_base, tmp_path / "q", "nvfp4")
    r = inspect_checkpoint(tmp_path / "q", tiny_base)

    assert (r.quant_method, r.algorithm, r.group_size) == ("modelopt", "NVFP4", 16)
    assert r.producer == {"name": "modelopt", "version": "0.47.0"}
    assert len(r.quantized_linears) == N_LINEARS and {x.scheme for x in r.quantized_linears} == {"nvfp4"}
    lin = next(x for x in r.quantized_linears if x.name == "model.layers.0.mlp.down_proj")
    assert lin.weight_dtype == "U8" and lin.stored_shape == [64, 64] and lin.shape == [64, 128]
    assert lin.scales["weight_scale"] == {"dtype": "F8_E4M3", "shape": [64, 8]}
    assert set(lin.scales) == {"weight_scale", "weight_scale_2", "input_scale"}
    assert r.missing_scales == [] and r.warnings == []
    assert r.tensor_dtypes["model.layers.0.mlp.down_proj.weight_scale_2"] == "F32"
    assert r.dtype_counts["U8"] == N_LINEARS

    assert r.unquantized_modules["embedding"] == ["model.embed_tokens"]
    assert r.unquantized_modules["lm_head"] == ["lm_head (tied to the input embedding)"]
    assert len(r.unquantized_modules["norm"]) == 2 * TINY["num_hidden_layers"] + 1
    assert r.unquantized_modules["linear"] == []

    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    base_size = (tiny_base / "model.safetensors").stat().st_size
    assert r.size_bytes == size and r.baseline_size_bytes == base_size
    assert r.compression_ratio == pytest.approx(base_size / size)
    assert r.compression_ratio > 1.5  # 4.5-bit linears, BF16 embedding

    assert r.weight_mse == pytest.approx(_expected_mse(tiny_base, encoded), rel=1e-9)
    assert 0 < r.weight_relative_mse < 0.05
    assert r.worst_layer in {x.name for x in r.quantized_linears}

    packed = load_file(str(tmp_path / "q" / "model.safetensors"))
    stream = np.concatenate([packed[f"{p}.weight"].numpy().reshape(-1) for p in encoded])
    h = byte_entropy(np.bincount(stream, minlength=256))
    assert r.packed_entropy_bits == pytest.approx(h)
    assert r.compression_proxy == pytest.approx(1 - h / 8)
    assert all(x.entropy_bits is not None for x in r.quantized_linears)
    assert "NVFP4" in r.summary() and "compression proxy" in r.summary()
    json.dumps(r.to_dict())  # serialisable for reports


def test_modelopt_fp8_report(tiny_base, tmp_path):
    encoded = make_quantized_checkpoint(tiny_base, tmp_path / "q", "fp8")
    r = inspect_checkpoint(tmp_path / "q", tiny_base)
    assert (r.quant_method, r.algorithm) == ("modelopt", "FP8")
    assert {x.scheme for x in r.quantized_linears} == {"fp8"}
    assert r.dtype_counts["F8_E4M3"] == N_LINEARS
    assert r.packed_entropy_bits is None and r.compression_proxy is None
    assert r.weight_mse == pytest.approx(_expected_mse(tiny_base, encoded), rel=1e-9)


def test_compressed_tensors_nvfp4_report(tiny_base, tmp_path):
    encoded = make_quantized_checkpoint(tiny_base, tmp_path / "q", "nvfp4_ct")
    r = inspect_checkpoint(tmp_path / "q", tiny_base)
    assert (r.quant_method, r.algorithm, r.group_size) == ("compressed-tensors", "NVFP4A16", 16)
    assert r.ignore == ["lm_head"]
    assert {x.scheme for x in r.quantized_linears} == {"nvfp4_ct"}
    lin = r.quantized_linears[0]
    assert set(lin.scales) == {"weight_scale", "weight_global_scale"} and lin.missing_scales == []
    assert r.weight_mse == pytest.approx(_expected_mse(tiny_base, encoded), rel=1e-6)
    assert r.compression_proxy is not None


def test_unquantized_checkpoint(tiny_base):
    r = inspect_checkpoint(tiny_base, tiny_base)
    assert r.quant_method is None and r.algorithm is None and not r.is_quantized
    assert r.compression_ratio == 1.0 and r.weight_mse == 0.0 and r.packed_entropy_bits is None
    assert r.mse_scope.startswith("all linear")
    assert len(r.unquantized_modules["linear"]) == N_LINEARS
    assert r.dtype_counts == {"BF16": len(r.tensor_dtypes)}


def test_missing_activation_scales_are_reported(tiny_base, tmp_path):
    make_quantized_checkpoint(tiny_base, tmp_path / "q", "nvfp4", input_scale=False)
    r = inspect_checkpoint(tmp_path / "q")
    assert len(r.missing_scales) == N_LINEARS
    assert r.missing_scales[0].endswith(": input_scale")


def test_layer_missing_its_global_scale_is_flagged_not_decoded(tiny_base, tmp_path):
    broken = "model.layers.1.mlp.up_proj"
    make_quantized_checkpoint(tiny_base, tmp_path / "q", "nvfp4", drop=(f"{broken}.weight_scale_2",))
    r = inspect_checkpoint(tmp_path / "q", tiny_base)
    bad = next(x for x in r.quantized_linears if x.name == broken)
    assert bad.scheme == "unrecognized" and bad.missing_scales == ["weight_scale_2"] and bad.mse is None
    assert f"{broken}: weight_scale_2" in r.missing_scales
    assert any(broken in w for w in r.warnings)
    assert broken not in r.unquantized_modules["linear"]


def test_byte_entropy_bounds():
    assert byte_entropy(np.ones(256, dtype=np.int64)) == pytest.approx(8.0)
    assert byte_entropy(np.eye(256, dtype=np.int64)[7] * 1000) == 0.0
    assert byte_entropy(np.zeros(256, dtype=np.int64)) == 0.0


# ------------------------------------------------------------------------------------- bad inputs


def test_missing_config_json(tiny_base, tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(tiny_base / "model.safetensors", d)
    with pytest.raises(BuildError, match="config.json") as exc:
        inspect_checkpoint(d)
    assert str(d) in str(exc.value)


def test_missing_weights(tiny_base, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny_base / "config.json", d)
    with pytest.raises(BuildError, match="no \\*.safetensors") as exc:
        inspect_checkpoint(d)
    assert str(d) in str(exc.value)
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(BuildError, match="pickled"):
        inspect_checkpoint(d)


def test_truncated_safetensors(tiny_base, tmp_path):
    d = tmp_path / "truncated"
    shutil.copytree(tiny_base, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(BuildError, match="truncated") as exc:
        inspect_checkpoint(d)
    assert str(d) in str(exc.value) and "model.safetensors" in str(exc.value)


@pytest.mark.parametrize("content", [b"", b"\x05\x00", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
                                     b"\xff" * 64])
def test_corrupt_safetensors(tiny_base, tmp_path, content):
    d = tmp_path / "corrupt"
    d.mkdir()
    shutil.copy(tiny_base / "config.json", d)
    (d / "model.safetensors").write_bytes(content)
    with pytest.raises(BuildError, match="corrupt or truncated") as exc:
        inspect_checkpoint(d)
    assert str(d) in str(exc.value)


def test_sharded_index_naming_a_missing_shard(tiny_base, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(tiny_base, d)
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BuildError, match="missing"):
        inspect_checkpoint(d)


def test_bad_baseline_is_named(tiny_base, tmp_path):
    make_quantized_checkpoint(tiny_base, tmp_path / "q", "fp8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="baseline for .*config.json"):
        inspect_checkpoint(tmp_path / "q", tmp_path / "empty")


def test_missing_directory(tmp_path):
    with pytest.raises(BuildError, match="not a directory"):
        inspect_checkpoint(tmp_path / "nope")


def test_emulated_checkpoint_has_the_same_weight_error_as_its_source(tiny_base, tmp_path):
    from quantgate.engines.emulation import dequantize_to_bf16

    make_quantized_checkpoint(tiny_base, tmp_path / "q", "nvfp4")
    dequantize_to_bf16(tmp_path / "q", tmp_path / "emu")
    quantized = inspect_checkpoint(tmp_path / "q", tiny_base)
    emulated = inspect_checkpoint(tmp_path / "emu", tiny_base)
    assert emulated.quant_method is None and emulated.emulation["engine"] == "emulated"
    # the emulated weights are the dequantized ones rounded to BF16: the same error up to that rounding
    assert emulated.weight_mse == pytest.approx(quantized.weight_mse, rel=0.05)
    assert emulated.compression_ratio == pytest.approx(1.0, abs=0.01)


def test_linear_left_in_float_without_being_excluded_is_warned(tiny_base, tmp_path):
    from safetensors.torch import save_file

    make_quantized_checkpoint(tiny_base, tmp_path / "q", "fp8")
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(f))
    prefix = "model.layers.1.self_attn.o_proj"
    for leaf in ("weight_scale", "input_scale"):
        tensors.pop(f"{prefix}.{leaf}")
    tensors[f"{prefix}.weight"] = load_file(str(tiny_base / "model.safetensors"))[f"{prefix}.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    r = inspect_checkpoint(tmp_path / "q")
    assert r.unquantized_modules["linear"] == [prefix]
    assert any("not exclude" in w and prefix in w for w in r.warnings)


def test_scales_folded_into_norms_are_folded_back_before_measuring(tiny_base, tmp_path):
    plain = inspect_checkpoint(make_dir(tiny_base, tmp_path / "plain"), tiny_base)
    folded_dir = tmp_path / "folded"
    make_quantized_checkpoint(tiny_base, folded_dir, "nvfp4", fold_into_norm=True)
    folded = inspect_checkpoint(folded_dir, tiny_base)
    q = next(x for x in folded.quantized_linears if x.name == "model.layers.0.self_attn.q_proj")
    assert q.folded == ["model.layers.0.input_layernorm scale"]
    up = next(x for x in folded.quantized_linears if x.name == "model.layers.1.mlp.up_proj")
    assert up.folded == ["model.layers.1.post_attention_layernorm scale"]
    assert next(x for x in folded.quantized_linears if x.name.endswith("0.mlp.down_proj")).folded == []
    assert len(folded.modified_tensors) == 2 * TINY["num_hidden_layers"]
    # without folding back, the stored W/s would be compared with W: a relative error near 1
    assert folded.weight_relative_mse < 3 * plain.weight_relative_mse < 0.1


def make_dir(base: Path, path: Path) -> Path:
    make_quantized_checkpoint(base, path, "nvfp4")
    return path


def test_input_scale_moved_into_producer_rows_is_recovered(tiny_base, tmp_path):
    plain = inspect_checkpoint(make_dir(tiny_base, tmp_path / "plain"), tiny_base)
    make_quantized_checkpoint(tiny_base, tmp_path / "rows", "nvfp4", fold_mlp_rows=True)
    r = inspect_checkpoint(tmp_path / "rows", tiny_base)
    up = next(x for x in r.quantized_linears if x.name == "model.layers.0.mlp.up_proj")
    down = next(x for x in r.quantized_linears if x.name == "model.layers.0.mlp.down_proj")
    assert up.folded and "down_proj" in up.folded[0] and down.folded and "up_proj" in down.folded[0]
    assert next(x for x in r.quantized_linears if x.name.endswith("0.self_attn.o_proj")).folded == []
    assert r.weight_relative_mse < 3 * plain.weight_relative_mse < 0.1

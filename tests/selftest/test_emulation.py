"""Weight-only emulation: format decoders, the BF16 checkpoint it writes, and cross-checks against the
reference implementations (torch's float8/bfloat16 casts, compressed-tensors, and modelopt's own dequantize
when the modelopt builder environment is already on this machine)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantgate.engines import emulation as em
from quantgate.errors import BuildError

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
        "tie_word_embeddings": True}
FOLDED = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
FOLD_SCALE = torch.linspace(0.25, 4.0, 64).to(torch.bfloat16)  # one scale per hidden channel
ROW_SCALE = torch.linspace(0.3, 3.0, 128)  # one per intermediate channel
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


# ------------------------------------------------------------------------------ synthetic checkpoints


def nvfp4_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 as modelopt exports it, written independently of the decoder under test.

    Returns (packed uint8, E4M3 block scales, FP32 global scale, the float32 weight those bytes encode).
    """
    w = w.float()
    out, inp = w.shape
    scale_2 = w.abs().max() / (6.0 * 448.0)
    blocks = w.reshape(out, inp // 16, 16)
    bscale = (blocks.abs().amax(-1) / 6.0 / scale_2).clamp(min=2**-9, max=448.0).to(torch.float8_e4m3fn)
    eff = bscale.float() * scale_2
    x = blocks / eff[..., None]
    idx = (x.abs()[..., None] - E2M1_GRID).abs().argmin(-1)
    neg = x < 0
    codes = (idx | (neg.long() << 3)).reshape(out, inp).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    values = torch.where(neg, -E2M1_GRID[idx], E2M1_GRID[idx])
    ref = (values * eff[..., None]).reshape(out, inp)
    return packed, bscale, scale_2.reshape(()), ref


def fp8_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = w.float().abs().max() / 448.0
    q = (w.float() / scale).to(torch.float8_e4m3fn)
    return q, scale.reshape(()), q.float() * scale


def make_bf16_checkpoint(path: Path, seed: int = 0) -> Path:
    """A 2-layer tiny llama (tied embeddings) as BF16 safetensors and a real LlamaForCausalLM config.

    Written by hand rather than through transformers, whose import alone takes a minute on a busy CPU.
    """
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, inter = TINY["hidden_size"], TINY["intermediate_size"]
    kv_dim = h // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (TINY["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv_dim, h),
            f"{p}.self_attn.v_proj.weight": (kv_dim, h), f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (inter, h), f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
        })
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        tensors[name] = (1.0 + 0.1 * noise if len(shape) == 1 else 0.05 * noise).to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "dtype": "bfloat16", "bos_token_id": 1,
              "eos_token_id": 2, **TINY}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


def make_quantized_checkpoint(
    base: Path, path: Path, fmt: str = "nvfp4", *, input_scale: bool = True, pre_quant_scale: bool = False,
    fold_into_norm: bool = False, fold_mlp_rows: bool = False, drop: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """A modelopt-style export of `base` (fmt nvfp4 | fp8 | nvfp4_ct); returns the float32 weights it encodes.

    nvfp4_ct writes the compressed-tensors layout instead (weight_packed, reciprocal global scale).
    fold_into_norm mimics modelopt's AWQ export: q/k/v and gate/up store W/s and the norm before them s*g;
    fold_mlp_rows moves down_proj's input scale into up_proj's rows (up rows * r, down columns / r).
    """
    path.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(base / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    encoded: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        prefix = name.rsplit(".", 1)[0]
        if not (name.endswith(".weight") and prefix.split(".", 3)[-1] in LINEARS):
            out[name] = t
            continue
        w = t.float()
        pqs = None
        if fold_into_norm and prefix.rsplit(".", 1)[-1] in FOLDED:
            w = w / FOLD_SCALE.float()
        if fold_mlp_rows and prefix.endswith("up_proj"):
            w = w * ROW_SCALE[:, None]
        if fold_mlp_rows and prefix.endswith("down_proj"):
            w = w / ROW_SCALE[None, :]
        if pre_quant_scale:
            pqs = torch.linspace(0.5, 2.0, w.shape[1])
            w = w / pqs  # what AWQ stores: the input is multiplied by pqs at run time
        if fmt in ("nvfp4", "nvfp4_ct"):
            packed, bscale, scale_2, ref = nvfp4_reference(w)
            if fmt == "nvfp4":
                out.update({f"{prefix}.weight": packed, f"{prefix}.weight_scale": bscale,
                            f"{prefix}.weight_scale_2": scale_2.float()})
                if input_scale:
                    out[f"{prefix}.input_scale"] = torch.tensor(0.01)
            else:
                out.update({f"{prefix}.weight_packed": packed, f"{prefix}.weight_scale": bscale,
                            f"{prefix}.weight_global_scale": (1.0 / scale_2).reshape(1)})
                ref = nvfp4_ct_ref(packed, bscale, (1.0 / scale_2).reshape(1))
        else:
            q, scale, ref = fp8_reference(w)
            out.update({f"{prefix}.weight": q, f"{prefix}.weight_scale": scale})
            if input_scale:
                out[f"{prefix}.input_scale"] = torch.tensor(0.02)
        if pqs is not None:
            out[f"{prefix}.pre_quant_scale"] = pqs.to(torch.bfloat16)
            ref = ref * pqs.to(torch.bfloat16).float()
        encoded[prefix] = ref
    if fold_into_norm:
        for name in list(out):
            if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
                out[name] = (out[name].float() * FOLD_SCALE.float()).to(torch.bfloat16)
    for name in drop:
        out.pop(name)
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    if fmt == "nvfp4_ct":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"],
                                          "weights": {"num_bits": 4, "type": "float", "group_size": 16,
                                                      "strategy": "tensor_group", "symmetric": True},
                                          "input_activations": None}},
            "ignore": ["lm_head"],
        }
    else:
        algo = {"nvfp4": "NVFP4", "fp8": "FP8"}[fmt]
        hf_quant = {"producer": {"name": "modelopt", "version": "0.47.0"},
                    "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None,
                                     "exclude_modules": ["lm_head", "model.embed_tokens"],
                                     **({"group_size": 16} if algo == "NVFP4" else {})}}
        (path / "hf_quant_config.json").write_text(json.dumps(hf_quant))
        cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": algo,
                                      "ignore": ["lm_head", "model.embed_tokens"]}
    (path / "config.json").write_text(json.dumps(cfg))
    for extra in ("generation_config.json",):
        if (base / extra).exists():
            (path / extra).write_text((base / extra).read_text())
    return encoded


def ct_helpers(subpackage: str):
    """A compressed-tensors helpers module, loaded on its own: the package import pulls in transformers and
    takes over a minute on a busy 2-core machine, while the helpers need only torch."""
    spec = importlib.util.find_spec("compressed_tensors")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("compressed-tensors is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "compressors" / subpackage / "helpers.py"
    mod_spec = importlib.util.spec_from_file_location(f"_qg_ct_{subpackage}_helpers", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def nvfp4_ct_ref(packed: torch.Tensor, bscale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own unpacker, with its NVFP4 dequant rule: e2m1 * scale / global_scale."""
    m, n = packed.shape
    vals = ct_helpers("nvfp4").unpack_fp4_from_uint8(packed, m, n * 2, dtype=torch.float32)
    scale = (bscale.float() / global_scale.float()).repeat_interleave(16, dim=1)
    return vals * scale


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return make_bf16_checkpoint(tmp_path_factory.mktemp("bf16"))


# ----------------------------------------------------------------------------------------- decoders


def test_e4m3_table_matches_torch_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    expected = codes.view(torch.float8_e4m3fn).float().numpy()
    got = em.decode_e4m3(codes.numpy())
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    ok = ~np.isnan(expected)
    assert np.array_equal(got[ok], expected[ok])
    assert np.array_equal(np.signbit(got[ok]), np.signbit(expected[ok]))  # -0 stays -0


def test_e5m2_table_matches_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    expected = codes.view(torch.float8_e5m2).float().numpy()
    ok = ~np.isnan(expected)
    assert np.array_equal(em.E5M2_TABLE[ok], expected[ok])


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(10000) * 10.0 ** rng.integers(-8, 8, 10000)
    edges = [0.0, -0.0, 1e-40, 3.4e38, np.inf, -np.inf]
    x = np.concatenate([normal, edges]).astype(np.float32)
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(em.float32_to_bf16(x), expected)
    assert np.isnan(em.bf16_to_float32(em.float32_to_bf16(np.array([np.nan], dtype=np.float32)))).all()
    back = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(em.bf16_to_float32(expected), back)


def test_e2m1_nibble_order_low_nibble_is_the_even_element():
    # 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) element 1; 0xF8: zero then -6
    got = em.unpack_e2m1(np.array([[0x21, 0xF8, 0x7F]], dtype=np.uint8))
    assert got.tolist() == [[0.5, 1.0, 0.0, -6.0, -6.0, 6.0]]


def test_nvfp4_dequant_matches_independent_reference():
    torch.manual_seed(1)
    w = torch.randn(32, 64) * 0.03
    w[3, 5] = 0.9  # one outlier to stretch the global scale
    packed, bscale, scale_2, ref = nvfp4_reference(w)
    got = em.dequant_nvfp4(packed.numpy(), bscale.view(torch.uint8).numpy(), scale_2.numpy())
    assert np.array_equal(got, ref.numpy())


def test_compressed_tensors_nvfp4_layout_matches_compressed_tensors():
    torch.manual_seed(2)
    packed, bscale, scale_2, _ = nvfp4_reference(torch.randn(16, 64))
    gscale = (1.0 / scale_2).reshape(1)
    got = em.dequant_nvfp4(packed.numpy(), bscale.view(torch.uint8).numpy(), gscale.numpy(),
                           global_scale_is_reciprocal=True)
    assert np.allclose(got, nvfp4_ct_ref(packed, bscale, gscale).numpy(), rtol=1e-6, atol=0)


def test_int4_unpack_inverts_compressed_tensors_pack():
    torch.manual_seed(3)
    q = torch.randint(-8, 8, (8, 24), dtype=torch.int8)
    packed = ct_helpers("pack_quantized").pack_to_int32(q, 4)
    assert np.array_equal(em.unpack_int32(packed.numpy(), 4, 24), q.numpy())


def test_int4_zero_points_unpack_along_dim_0_as_compressed_tensors_packs_them():
    torch.manual_seed(4)
    zp = torch.randint(-8, 8, (20, 3), dtype=torch.int8)  # [out, groups], out not a multiple of 8
    packed = ct_helpers("pack_quantized").pack_to_int32(zp, 4, packed_dim=0)
    assert np.array_equal(em.unpack_int32(packed.numpy(), 4, 20, packed_dim=0), zp.numpy())


def test_modelopt_int4_row_pair_unpacking():
    # packing exactly as modelopt.torch.export.quant_utils.pack_int4_in_uint8 does it for 2-D weights
    torch.manual_seed(4)
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    pairs = q.T.reshape(10, 3, 2)
    packed = ((pairs[..., 0] & 0x0F) | ((pairs[..., 1] & 0x0F) << 4)).T.contiguous().view(torch.uint8)
    assert packed.shape == (3, 10)
    assert np.array_equal(em.unpack_int4_rows(packed.numpy()), q.numpy())


def test_grouped_and_channel_scales_broadcast():
    q = np.ones((4, 8), dtype=np.float32)
    assert em.dequant_scaled(q, np.array(2.0, dtype=np.float32)).max() == 2.0
    per_ch = em.dequant_scaled(q, np.arange(4, dtype=np.float32))
    assert per_ch[:, 0].tolist() == [0, 1, 2, 3]
    grouped = em.dequant_scaled(q, np.array([[1, 2]] * 4, dtype=np.float32))
    assert grouped[0].tolist() == [1] * 4 + [2] * 4
    with pytest.raises(ValueError):
        em.dequant_scaled(q, np.ones(3, dtype=np.float32))


# -------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "nvfp4_ct"])
def test_dequantize_to_bf16_writes_exactly_the_dequantized_weights(tiny_base, tmp_path, fmt):
    export = tmp_path / "export"
    encoded = make_quantized_checkpoint(tiny_base, export, fmt)
    info = em.dequantize_to_bf16(export, tmp_path / "emu")
    out = load_file(str(tmp_path / "emu" / "model.safetensors"))
    base = load_file(str(tiny_base / "model.safetensors"))
    assert set(out) == set(base)  # scales gone, nothing else lost
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    for prefix, ref in encoded.items():
        assert torch.equal(out[f"{prefix}.weight"], ref.to(torch.bfloat16)), prefix
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    cfg = json.loads((tmp_path / "emu" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert not (tmp_path / "emu" / "hf_quant_config.json").exists()
    on_disk = json.loads((tmp_path / "emu" / em.EMULATION_FILE).read_text())
    assert on_disk == json.loads(json.dumps(info, default=str))
    assert info["engine"] == "emulated" and info["method"] == "weight-only dequantization"
    assert info["quantized_linears"] == 2 * len(LINEARS)
    if fmt == "fp8":
        assert info["source_format"] == "FP8"
        assert any("activation" in s for s in info["not_emulated"])
    if fmt == "nvfp4":
        assert any("Marlin" in s for s in info["equivalent_to"])
        assert any("activation" in s for s in info["not_emulated"])
    if fmt == "nvfp4_ct":
        assert info["source_quant_method"] == "compressed-tensors" and info["not_emulated"] == []


def test_emulated_checkpoint_loads_and_runs_in_transformers(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    make_quantized_checkpoint(tiny_base, tmp_path / "export", "nvfp4")
    em.dequantize_to_bf16(tmp_path / "export", tmp_path / "emu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "emu")
    assert model.dtype == torch.bfloat16 and getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_pre_quant_scale_is_folded_into_the_weight(tiny_base, tmp_path):
    encoded = make_quantized_checkpoint(tiny_base, tmp_path / "export", "nvfp4", pre_quant_scale=True)
    info = em.dequantize_to_bf16(tmp_path / "export", tmp_path / "emu")
    out = load_file(str(tmp_path / "emu" / "model.safetensors"))
    prefix = "model.layers.0.mlp.up_proj"
    assert torch.equal(out[f"{prefix}.weight"], encoded[prefix].to(torch.bfloat16))
    assert not any(k.endswith("pre_quant_scale") for k in out)
    assert any("pre_quant_scale" in e for e in info["emulated"])


def test_refuses_existing_output_unless_overwrite(tiny_base, tmp_path):
    make_quantized_checkpoint(tiny_base, tmp_path / "export", "fp8")
    (tmp_path / "emu").mkdir()
    with pytest.raises(BuildError, match="already exists"):
        em.dequantize_to_bf16(tmp_path / "export", tmp_path / "emu")
    em.dequantize_to_bf16(tmp_path / "export", tmp_path / "emu", overwrite=True)
    assert (tmp_path / "emu" / "model.safetensors").exists()


def test_unquantized_checkpoint_has_nothing_to_emulate(tiny_base, tmp_path):
    with pytest.raises(BuildError, match="nothing to emulate"):
        em.dequantize_to_bf16(tiny_base, tmp_path / "emu")
    assert not (tmp_path / "emu").exists()


def test_unknown_quantized_layout_is_refused(tiny_base, tmp_path):
    # NVFP4 without its global scale: the bytes cannot be decoded, so no silent garbage checkpoint
    make_quantized_checkpoint(tiny_base, tmp_path / "export", "nvfp4",
                              drop=("model.layers.1.mlp.up_proj.weight_scale_2",))
    with pytest.raises(BuildError, match="cannot dequantize"):
        em.dequantize_to_bf16(tmp_path / "export", tmp_path / "emu")


def test_sharded_output_has_an_index(tiny_base, tmp_path, monkeypatch):
    make_quantized_checkpoint(tiny_base, tmp_path / "export", "fp8")
    monkeypatch.setattr(em, "SHARD_BYTES", 64 * 1024)
    em.dequantize_to_bf16(tmp_path / "export", tmp_path / "emu")
    index = json.loads((tmp_path / "emu" / "model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "emu").glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    merged = {}
    for s in shards:
        merged.update(load_file(str(s)))
    assert set(merged) == set(load_file(str(tiny_base / "model.safetensors")))


# ------------------------------------------------------------------ cross-check with modelopt itself

# Golden vectors from modelopt 0.47's own QTensor classes (builder env): a 4x32 weight with rows scaled by
# 1e-3, 0.05, 1 and 30, quantized with NVFP4QTensor / FP8QTensor (per tensor and per channel) /
# MXFP8QTensor / MXFP4QTensor, and the sha256 of the float32 bytes their `dequantize` returns. Matching the
# hash means the decoders reproduce modelopt's dequantization bit for bit without modelopt installed here.
# Regenerate with the script in _MODELOPT_REFERENCE (QUANTGATE_LIVE_MODELOPT=1 runs it live).
MODELOPT_GOLDEN = {
    "nvfp4": {
        "weight": (
            "ddb944fae2226195fe54f47ac51976d5001a1223490973ee3a1499923a75cda529724b199b992a18480ca425798edd40"
            "d622ef190122c2c4f988248caba65154"
        ),
        "weight_scale": "0605333862557e7d",
        "weight_scale_2": "aeeeee3c",
        "ref_sha256": "0738457014b2d3fb6c56dffd751b39886935499a3dd7dbb41a02aff927737093",
        "ref_sum": -21.692333693266846,
    },
    "fp8": {
        "weight": (
            "83838181020281860184010100040381848502020285810502828101040503828005a119201024208f269b082233adaf"
            "a4282a15989e229ea0262e38aeab30a2c54b4d62d057c33fd1c5c3c3cc4db549b148ca034ac14c40bb55d3a9cccb2448"
            "79f7676bfef9e2646355666a6af170f2e1fdd4cc7267f2d2edea7ae95b747277"
        ),
        "weight_scale": "0233333e",
        "ref_sha256": "08d07f04c6d3ff3d8fadd55528dacd499f43d7343ffe19991a2652fe2a3b2765",
        "ref_sum": -23.025053739664145,
    },
    "fp8_channel": {
        "weight": (
            "f7f7e5eb7371e8fe69f869685d7877e5f9fb6f7370fae97c72f0e162797a75f38048e86066576b66d56de24e6979f4f5"
            "eb6e715cdfe569e5e76c747ef5f277e9e167697eec72df5bede1dfe0e969d165cc63e51765dd685bd871efc5e8e74163"
            "79f7676bfef9e2646355666a6af170f2e1fdd4cc7267f2d2edea7ae95b747277"
        ),
        "weight_scale": "226d9e362990c7390000803c0233333e",
        "ref_sha256": "fd87b87eabb1b2acaa5822beafa04747b8db2571f3e85f236179af94fab8aabd",
        "ref_sum": -23.383719351812033,
    },
    "mxfp8": {
        "weight": (
            "f1f1e0e66e6be2f963f26362587271e0f3f6696d6af5e3776ceadb5c737570ee8045e55d63546863d26adf4b6577f1f2"
            "e96b6e59dce266e2e36a727bf2f074e6e167697eec72df5bede1dfe0e969d165cc63e51765dd685bd871efc5e8e74163"
            "74f26268faf5de605f51626666ed6ceeddf9d1c86e62eecde9e676e457716e72"
        ),
        "weight_scale": "6e74797d",
        "ref_sha256": "c5210518042ccdacc5dacb0584c4991489864a96cb9eeee18fbf2f855cba86ef",
        "ref_sum": -25.266189575195312,
    },
    "mxfp4": {
        "weight": (
            "cca933e9d1115094dd32d269a31955b4081a0112380962dc3a1399922974cca5195139089a88191818098101288a9910"
            "d521de190121b2b3e988148baaa64053"
        ),
        "weight_scale": "747a8083",
        "ref_sha256": "30bd2269a2f870f2d6d20285d110c265da4c61b58d43d3f67fe01178c362a9de",
        "ref_sum": 8.34423828125,
    },
}

_SHAPES = {"nvfp4": (4, 16), "fp8": (4, 32), "fp8_channel": (4, 32), "mxfp8": (4, 32), "mxfp4": (4, 16)}


def _golden_dequant(fmt: str, rec: dict) -> np.ndarray:
    def raw(key: str, dtype=np.uint8) -> np.ndarray:
        return np.frombuffer(bytes.fromhex(rec[key]), dtype=dtype)

    w = raw("weight").reshape(_SHAPES[fmt])
    if fmt == "nvfp4":
        return em.dequant_nvfp4(w, raw("weight_scale").reshape(4, 2), raw("weight_scale_2", np.float32))
    if fmt.startswith("fp8"):
        return em.dequant_scaled(em.decode_e4m3(w), raw("weight_scale", np.float32))
    if fmt == "mxfp8":
        return em.dequant_mxfp8(w, raw("weight_scale").reshape(4, 1))
    return em.dequant_mxfp4(w, raw("weight_scale").reshape(4, 1))


@pytest.mark.parametrize("fmt", sorted(MODELOPT_GOLDEN))
def test_decoders_reproduce_modelopt_dequantize_bit_for_bit(fmt):
    rec = MODELOPT_GOLDEN[fmt]
    got = _golden_dequant(fmt, rec).astype(np.float32)
    assert got.sum(dtype=np.float64) == pytest.approx(rec["ref_sum"], rel=1e-12)
    assert hashlib.sha256(got.tobytes()).hexdigest() == rec["ref_sha256"]


_MODELOPT_REFERENCE = textwrap.dedent("""
    import hashlib, json, torch
    from modelopt.torch.quantization.qtensor import FP8QTensor, MXFP4QTensor, MXFP8QTensor, NVFP4QTensor
    torch.manual_seed(0)
    w = torch.randn(4, 32) * torch.tensor([[1e-3], [0.05], [1.0], [30.0]])
    w[2, 3] = 7.0
    w[1, 0] = -0.0
    def hx(t):
        return (t if t.dtype == torch.uint8 else t.contiguous().view(torch.uint8)).numpy().tobytes().hex()
    def rec(ref, **parts):
        ref = ref.float().contiguous()
        return {**{k: hx(v) for k, v in parts.items()},
                "ref_sha256": hashlib.sha256(ref.numpy().tobytes()).hexdigest(),
                "ref_sum": float(ref.double().sum())}
    out = {}
    q, s, s2 = NVFP4QTensor.quantize(w, 16)
    out["nvfp4"] = rec(q.dequantize(dtype=torch.float32, scale=s, double_scale=s2, block_sizes={-1: 16}),
                       weight=q._quantized_data, weight_scale=s, weight_scale_2=s2.float().reshape(1))
    q, s = FP8QTensor.quantize(w)
    out["fp8"] = rec(q.dequantize(dtype=torch.float32, scale=s), weight=q._quantized_data,
                     weight_scale=s.float().reshape(1))
    q, s = FP8QTensor.quantize(w, axis=0)
    out["fp8_channel"] = rec(q.dequantize(dtype=torch.float32, scale=s), weight=q._quantized_data,
                             weight_scale=s.float().reshape(-1))
    q, s = MXFP8QTensor.quantize(w)
    out["mxfp8"] = rec(q.dequantize(dtype=torch.float32, scale=s), weight=q._quantized_data, weight_scale=s)
    q, s = MXFP4QTensor.quantize(w, 32)
    out["mxfp4"] = rec(q.dequantize(dtype=torch.float32, scale=s, block_sizes={-1: 32}),
                       weight=q._quantized_data, weight_scale=s.reshape(4, 1))
    print(json.dumps(out))
""")


def _modelopt_python() -> str | None:
    """An interpreter that already has modelopt; creating the builder env is too slow for a unit test."""
    if importlib.util.find_spec("modelopt") is not None:
        return sys.executable
    from quantgate.envs import BUILDER_ENVS, env_key
    from quantgate.paths import cache_dir

    root = cache_dir() / "envs" / f"modelopt-{env_key(BUILDER_ENVS['modelopt'])}"
    return str(root / "bin" / "python") if (root / ".quantgate-complete").exists() else None


@pytest.mark.skipif(os.environ.get("QUANTGATE_LIVE_MODELOPT") != "1",
                    reason="importing modelopt takes minutes on a small CPU; set QUANTGATE_LIVE_MODELOPT=1")
def test_golden_vectors_are_what_the_installed_modelopt_produces():
    python = _modelopt_python()
    if python is None:
        pytest.skip("the modelopt builder environment is not on this machine")
    proc = subprocess.run([python, "-c", _MODELOPT_REFERENCE], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    live = json.loads(proc.stdout.strip().splitlines()[-1])
    for fmt, rec in live.items():
        assert rec == MODELOPT_GOLDEN[fmt], fmt


# ------------------------------------------------- the modelopt builder's spec handling (no modelopt)


def _builder():
    path = Path(__file__).resolve().parents[2] / "src/quantgate/checkpoints/builders/modelopt_build.py"
    spec = importlib.util.spec_from_file_location("_qg_modelopt_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib-only at import time, so this works without modelopt
    return module


def test_builder_unknown_format_exits_2_with_one_line(tmp_path, tiny_base, capsys):
    mb = _builder()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base": str(tiny_base), "out": str(tmp_path / "out"), "format": "int3",
                                "calibration": {"text_file": str(tiny_base / "config.json")}}))
    with pytest.raises(SystemExit) as exc:
        mb.main(["--spec", str(spec)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'int3'" in err[0] and "nvfp4" in err[0] and "int8_sq" in err[0]


def test_builder_maps_renamed_presets():
    from types import SimpleNamespace

    mb = _builder()
    new = SimpleNamespace(INT8_SMOOTHQUANT_CFG={"algorithm": "smoothquant"}, FP8_DEFAULT_CFG={})
    old = SimpleNamespace(INT8_SQ_CFG={"algorithm": "smoothquant"})
    assert mb.resolve_preset(new, "int8_sq")[0] == "INT8_SMOOTHQUANT_CFG"
    assert mb.resolve_preset(old, "int8_sq")[0] == "INT8_SQ_CFG"
    with pytest.raises(mb.SpecError, match="available presets: FP8_DEFAULT_CFG"):
        mb.resolve_preset(new, "w4a8_awq")


def test_builder_awq_block_size_reaches_every_int4_stage():
    mb = _builder()
    cfg = {"quant_cfg": [
        {"quantizer_name": "*weight_quantizer",
         "cfg": [{"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}, {"num_bits": (4, 3), "axis": None}]},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "block_sizes": {-1: 128}}},
    ]}
    mb.set_awq_block_size(cfg, 64)
    assert cfg["quant_cfg"][0]["cfg"][0]["block_sizes"][-1] == 64
    assert cfg["quant_cfg"][1]["cfg"]["block_sizes"][-1] == 128

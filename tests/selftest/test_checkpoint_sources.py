"""Prebuilt checkpoints (local paths, Hub downloads): what a checkpoint is comes from its own config, whether it
runs here follows from that, Hub revisions are full commits, an offline Hugging Face cache laid out here goes
through the real huggingface_hub download code, the checkpoint hash ignores huggingface_hub's bookkeeping, and
the token never reaches a file, a log or an error."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from quantgate.checkpoints import hub
from quantgate.checkpoints.cache import hash_checkpoint
from quantgate.checkpoints.identity import checkpoint_support, identify_checkpoint, identity_from_config
from quantgate.checkpoints.inspect import inspect_checkpoint
from quantgate.checkpoints.obtain import _fetched
from quantgate.engines import emulation as em
from quantgate.engines.emulation import read_quant_config
from quantgate.engines.hardware import Hardware
from quantgate.errors import BuildError, MatrixError
from quantgate.matrix import HubSource, LocalSource, Variant, load_matrix
from quantgate.runner import variant_support
from tests.selftest.test_emulation import ct_helpers, make_bf16_checkpoint, make_quantized_checkpoint

CPU = Hardware("cpu", "Xeon", 2, cpu_isa="avx512bf16")
AVX2 = Hardware("cpu", "Xeon", 2, cpu_isa="avx2")
H100 = Hardware("sm90", "H100", 1)
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_qgSECRETtoken0123456789abcdefXYZ"

W8A8_CT = {  # what llm-compressor 0.14 writes for the demo's W8A8 (compressed-tensors int-quantized)
    "quant_method": "compressed-tensors", "format": "int-quantized", "version": "0.17.0",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
    }},
    "ignore": ["lm_head"],
}
W4A16_CT = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": True}}},
    "ignore": ["lm_head"],
}
NVFP4_CT = {
    "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True},
        "input_activations": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                              "dynamic": "local"}}},
    "ignore": ["lm_head"],
}


def write_config(d: Path, qc: dict | None, hf_quant: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64}
    if qc is not None:
        cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    if hf_quant is not None:
        (d / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    return d


# ------------------------------------------------------------------------- identity from the own config


def test_identity_of_compressed_tensors_and_modelopt_configs(tmp_path):
    w8a8 = identify_checkpoint(write_config(tmp_path / "w8a8", W8A8_CT))
    assert (w8a8.method, w8a8.format, w8a8.scheme, w8a8.storage, w8a8.num_bits, w8a8.strategy) == (
        "compressed-tensors", "int8", "W8A8", "int-quantized", 8, "channel")
    assert w8a8.builder == "llmcompressor" and w8a8.recipe == {"scheme": "W8A8"} and w8a8.ignore == ("lm_head",)
    w4 = identify_checkpoint(write_config(tmp_path / "w4", W4A16_CT))
    assert (w4.format, w4.scheme, w4.group_size, w4.recipe) == ("int4", "W4A16-g64", 64, {"scheme": "W4A16"})
    fp4 = identify_checkpoint(write_config(tmp_path / "fp4", NVFP4_CT))
    assert (fp4.method, fp4.format, fp4.scheme, fp4.storage, fp4.group_size) == (
        "compressed-tensors", "nvfp4", "NVFP4", "nvfp4-pack-quantized", 16)
    hf_quant = {"producer": {"name": "modelopt"},
                "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}
    mo = identify_checkpoint(write_config(tmp_path / "mo", None, hf_quant))
    assert (mo.method, mo.format, mo.builder, mo.group_size, mo.ignore) == ("modelopt", "nvfp4", "modelopt", 16,
                                                                          ("lm_head",))
    plain = identify_checkpoint(write_config(tmp_path / "plain", None))
    assert (plain.method, plain.format, plain.builder) == (None, "bf16", "none")


@pytest.mark.parametrize(("qc", "message"), [
    ({"quant_method": "gptq", "bits": 4},
     "quantization_config.quant_method: 'gptq' is not supported; allowed: ['compressed-tensors', 'modelopt']"),
    ({**W8A8_CT, "format": "marlin-25"}, "quantization_config.format: 'marlin-25' is not supported; allowed: "),
    ({"quant_method": "modelopt", "quant_algo": "NVFP5"}, "quant_algo (or hf_quant_config.json quantization."
                                                          "quant_algo): 'NVFP5' is not supported; allowed: "),
    ({**NVFP4_CT, "format": "int-quantized"}, "quantization_config.format 'int-quantized' does not match its "
                                               "weights (type float, num_bits 4, i.e. nvfp4)"),
])
def test_unsupported_quantization_configs_are_named(tmp_path, qc, message):
    d = write_config(tmp_path / "x", qc)
    with pytest.raises(BuildError) as err:
        identify_checkpoint(d)
    assert str(err.value).startswith(f"{d / 'config.json'}: ") and message in str(err.value)


def test_missing_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="empty: no config.json"):
        identify_checkpoint(tmp_path / "empty")


# ------------------------------------------------------------------------------ support follows the config


def built(**kw) -> Variant:
    return Variant(name="v", **kw)


@pytest.mark.parametrize("hw", [CPU, AVX2, H100], ids=lambda h: h.keys[0])
@pytest.mark.parametrize(("qc", "variant"), [
    (W8A8_CT, {"format": "int8", "builder": "llmcompressor", "recipe": {"scheme": "W8A8"}}),
    (W4A16_CT, {"format": "int4", "builder": "llmcompressor", "recipe": {"scheme": "W4A16", "group_size": 64}}),
], ids=["w8a8", "w4a16"])
def test_a_local_copy_of_a_built_checkpoint_runs_as_the_built_one(tmp_path, hw, qc, variant):
    d = write_config(tmp_path / "copy", qc)
    local = Variant(name="copy", format=variant["format"], source=LocalSource(path=str(d)))
    as_built = variant_support(built(**variant), hw)
    as_copy = variant_support(local, hw, checkpoint_dir=d)
    assert as_copy.engine == as_built.engine
    # the declared format of the copy does not matter: its config does
    assert variant_support(local.model_copy(update={"format": "fp8"}), hw, checkpoint_dir=d).engine == as_built.engine


def test_w8a8_copy_runs_on_vllm_cpu_and_compressed_tensors_nvfp4_is_emulated(tmp_path):
    w8a8 = variant_support(built(format="int8", source=LocalSource(path="x")), CPU,
                           checkpoint_dir=write_config(tmp_path / "w8a8", W8A8_CT))
    assert w8a8.engine == "vllm" and "compressed-tensors W8A8" in w8a8.reason
    fp4_dir = write_config(tmp_path / "fp4", NVFP4_CT)
    fp4 = variant_support(built(format="nvfp4", source=LocalSource(path="x")), CPU, checkpoint_dir=fp4_dir)
    assert fp4.engine == "emulated"
    assert fp4.reason == ("vllm-cpu has no nvfp4 kernel (NVFP4 and MX GEMMs are CUDA-only): weight-only emulation "
                          "(compressed-tensors NVFP4, from the checkpoint's config)")
    assert variant_support(built(format="nvfp4", source=LocalSource(path="x")), H100,
                           checkpoint_dir=fp4_dir).engine == "vllm"
    # modelopt's NVFP4 takes the same route on the CPU
    mo = identity_from_config(read_quant_config(write_config(tmp_path / "mo", {"quant_method": "modelopt",
                                                                                "quant_algo": "NVFP4"})))
    assert checkpoint_support(mo, CPU)[0] == "emulated"


def test_variant_run_reads_support_from_a_local_checkpoint(tmp_path):
    from quantgate.matrix import load_thresholds
    from quantgate.runner import Run

    fp4 = write_config(tmp_path / "fp4", NVFP4_CT)
    w8 = write_config(tmp_path / "w8", W8A8_CT)
    matrix = tmp_path / "m.yaml"
    matrix.write_text(f"""
models:
  - name: m
    source: {{kind: local, path: {tmp_path}}}
    variants:
      - {{name: bf16, format: bf16}}
      - {{name: fp4, format: nvfp4, source: {{kind: local, path: {fp4}}}}}
      - {{name: w8, format: int8, source: {{kind: local, path: {w8}}}}}
tasks:
  - {{name: hellaswag, metric: acc_norm}}
""")
    root = Path(__file__).resolve().parents[2]
    run = Run(load_matrix(matrix), load_thresholds(root / "thresholds" / "retention.yaml"), tmp_path / "res")
    run.hw = CPU
    assert run.variant("m", "fp4").support.engine == "emulated"
    assert run.variant("m", "w8").support.engine == "vllm"


def test_compressed_tensors_nvfp4_round_trips_through_its_own_packer():
    """Values on the E2M1 grid times E4M3 block scales / global scale, packed by compressed-tensors' own
    pack_fp4_to_uint8, come back exactly from the emulation decoder."""
    g = torch.Generator().manual_seed(3)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    e2m1 = grid[torch.randint(0, len(grid), (8, 32), generator=g)]
    block = torch.tensor([[0.25, 2.0], [1.0, 0.5], [448.0, 1.5], [3.0, 0.125]] * 2).to(torch.float8_e4m3fn)
    global_scale = torch.tensor([448.0 * 6.0 / 1.7])
    packed = ct_helpers("nvfp4").pack_fp4_to_uint8(e2m1)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (8, 16)
    expected = (e2m1 * (block.float() / global_scale).repeat_interleave(16, dim=1)).numpy()
    got = em.dequant_nvfp4_ct(packed.numpy(), block.view(torch.uint8).numpy(), global_scale.numpy())
    assert np.array_equal(got, expected)


# ---------------------------------------------------------------------------------- the Hub, offline


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode, and an empty quantgate cache. huggingface_hub reads its
    environment once, at import, so its constants are set as well as the variables."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "qg"))
    return cache


def lay_out_snapshot(cache: Path, repo: str, sha: str, files: Path, *, branch: str = "main") -> Path:
    """huggingface_hub's cache layout: blobs/<hash> with the bytes, snapshots/<sha>/<name> symlinks to them,
    refs/<branch> holding the sha; plus the bookkeeping files the checkpoint hash must ignore."""
    import hashlib

    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / sha
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / branch).write_text(sha)
    return snap


@pytest.fixture
def tiny_ct_nvfp4(tmp_path) -> tuple[Path, Path]:
    """A BF16 base and a compressed-tensors NVFP4 checkpoint of it, each with a tokenizer."""
    base = make_bf16_checkpoint(tmp_path / "base")
    q = tmp_path / "q"
    make_quantized_checkpoint(base, q, "nvfp4_ct")
    for d in (base, q):
        (d / "tokenizer.json").write_text('{"version": "1.0"}')
        (d / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return base, q


def test_offline_hub_cache_is_obtained_through_huggingface_hub(hf_cache, tiny_ct_nvfp4, tmp_path, caplog, capfd):
    base, q = tiny_ct_nvfp4
    snap = lay_out_snapshot(hf_cache, "org/tiny-nvfp4", SHA, q)
    (snap / "README.md").write_text("model card")
    (snap / ".gitattributes").write_text("*.safetensors filter=lfs")
    caplog.set_level(logging.DEBUG)

    src = HubSource(id="org/tiny-nvfp4", revision=SHA)
    ckpt = _fetched(src, "m/fp4")
    assert ckpt.origin == "downloaded" and ckpt.info["source"] == {"hub": "org/tiny-nvfp4", "revision": SHA}
    assert sorted(p.name for p in ckpt.path.iterdir()) == sorted(
        [p.name for p in q.iterdir()] + ["quantgate_manifest.json"])
    # only the checkpoint's own files are hashed: the same bytes given locally hash the same
    assert ckpt.sha256 == hash_checkpoint(q)

    # support, structure, weight MSE and packed-byte entropy from the downloaded checkpoint's own config
    ident = identify_checkpoint(ckpt.path)
    assert (ident.method, ident.format) == ("compressed-tensors", "nvfp4")
    assert checkpoint_support(ident, CPU)[0] == "emulated"
    report = inspect_checkpoint(ckpt.path, base)
    assert report.quant_method == "compressed-tensors" and report.algorithm == "NVFP4A16"
    assert report.weight_relative_mse is not None and 0 < report.weight_relative_mse < 0.1
    assert report.packed_entropy_bits is not None and 0 < report.packed_entropy_bits <= 8

    # the token reaches no file, log or output
    for f in ckpt.path.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + caplog.text and TOKEN not in json.dumps(ckpt.info, default=str)


def test_two_downloads_hash_the_same_despite_hub_bookkeeping(hf_cache, tiny_ct_nvfp4, tmp_path, monkeypatch):
    _, q = tiny_ct_nvfp4
    snap = lay_out_snapshot(hf_cache, "org/tiny-nvfp4", SHA, q)
    first = _fetched(HubSource(id="org/tiny-nvfp4", revision=SHA), "m/fp4")
    # a second machine: another quantgate cache, and huggingface_hub's metadata with another timestamp
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "qg2"))
    meta = snap / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text(f"{SHA}\netag\n1733011200.123")
    (snap / ".gitattributes").write_text("*.bin filter=lfs")
    second = _fetched(HubSource(id="org/tiny-nvfp4", revision=SHA), "m/fp4")
    assert second.path != first.path and second.sha256 == first.sha256
    # and directly: bookkeeping next to the files does not move the hash
    copy = tmp_path / "copy"
    shutil.copytree(q, copy)
    before = hash_checkpoint(copy)
    (copy / ".cache" / "huggingface").mkdir(parents=True)
    (copy / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("1733011200.5")
    (copy / "README.md").write_text("card")
    (copy / ".gitattributes").write_text("x")
    assert hash_checkpoint(copy) == before
    (copy / "tokenizer.json").write_text('{"version": "1.1"}')
    assert hash_checkpoint(copy) != before  # a tokenizer file is part of the checkpoint


def test_missing_revision_in_offline_cache_is_named_without_the_token(hf_cache, tiny_ct_nvfp4):
    other = "f" * 40
    with pytest.raises(BuildError) as err:
        _fetched(HubSource(id="org/absent", revision=other), "m/fp4")
    text = str(err.value)
    assert text.startswith(f"m/fp4: downloading org/absent@{other} failed: LocalEntryNotFoundError")
    assert TOKEN not in text


def test_redact_hides_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-without-prefix")
    text = f"401: Authorization: Bearer plain-secret-without-prefix; stored token {TOKEN}"
    assert hub.redact(text) == "401: Authorization: Bearer <redacted>; stored token <redacted>"


def test_branch_resolves_from_the_offline_cache(hf_cache, tiny_ct_nvfp4):
    _, q = tiny_ct_nvfp4
    lay_out_snapshot(hf_cache, "org/tiny-nvfp4", SHA, q)
    assert hub.resolve_revision("org/tiny-nvfp4", "main") == SHA
    assert hub.resolve_revision("org/tiny-nvfp4", SHA[:8]) == SHA
    assert hub.resolve_revision("org/tiny-nvfp4", SHA) == SHA
    with pytest.raises(BuildError, match="org/tiny-nvfp4@v2: not in the local Hugging Face cache"):
        hub.resolve_revision("org/tiny-nvfp4", "v2")


@pytest.mark.parametrize("revision", ["main", "0123456", SHA.upper(), SHA + "0"])
def test_hub_revision_must_be_a_full_commit(tmp_path, revision):
    path = tmp_path / "m.yaml"
    path.write_text(f"""
models:
  - name: m
    source: {{kind: hub, id: org/base, revision: '{revision}'}}
    variants:
      - {{name: bf16, format: bf16}}
tasks:
  - {{name: hellaswag, metric: acc_norm}}
""")
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    text = str(err.value)
    assert str(path) in text and "models.m.source" in text
    assert f"revision: {revision!r} is not a full 40-character commit hash" in text


def test_hub_revision_error_gives_the_commit_the_cache_knows(hf_cache, tiny_ct_nvfp4):
    _, q = tiny_ct_nvfp4
    lay_out_snapshot(hf_cache, "org/tiny-nvfp4", SHA, q)
    with pytest.raises(ValueError, match=f"the local Hugging Face cache resolves it to {SHA}"):
        HubSource(id="org/tiny-nvfp4", revision="main")


# ----------------------------------------------------------------------------------- quantgate check


def _check(tmp_path: Path, variant_line: str):
    from quantgate.matrix_checks import check_matrix

    base = write_config(tmp_path / "base", None)
    path = tmp_path / "m.yaml"
    path.write_text(f"""
models:
  - name: m
    source: {{kind: local, path: {base}}}
    variants:
      - {{name: bf16, format: bf16}}
      - {variant_line}
tasks:
  - {{name: hellaswag, metric: acc_norm}}
""")
    return path, check_matrix(load_matrix(path), path, None)


def test_check_names_a_local_checkpoint_without_config(tmp_path):
    (tmp_path / "noconf").mkdir()
    path, report = _check(tmp_path, f"{{name: q, format: int8, source: {{kind: local, path: {tmp_path / 'noconf'}}}}}")
    assert report.errors == [
        f"{path}: models.m.variants.q.source.path: '{tmp_path / 'noconf'}' has no config.json (a Hugging Face "
        "checkpoint folder is needed: config.json, *.safetensors and a tokenizer)"]


def test_check_names_an_unknown_quant_method(tmp_path):
    d = write_config(tmp_path / "gptq", {"quant_method": "gptq", "bits": 4})
    path, report = _check(tmp_path, f"{{name: q, format: int4, source: {{kind: local, path: {d}}}}}")
    assert report.errors == [
        f"{path}: models.m.variants.q.source: {d / 'config.json'}: quantization_config.quant_method: 'gptq' is not "
        "supported; allowed: ['compressed-tensors', 'modelopt']"]


def test_check_names_a_format_the_checkpoint_contradicts(tmp_path):
    d = write_config(tmp_path / "fp4", NVFP4_CT)
    path, report = _check(tmp_path, f"{{name: q, format: int8, source: {{kind: local, path: {d}}}}}")
    assert report.errors == [
        f"{path}: models.m.variants.q.format: 'int8' given, but the checkpoint's own config ({d / 'config.json'}) "
        "says 'nvfp4' (compressed-tensors NVFP4); write format: nvfp4"]
    _, ok = _check(tmp_path / "ok", f"{{name: q, format: nvfp4, source: {{kind: local, path: {d}}}}}")
    assert ok.errors == []

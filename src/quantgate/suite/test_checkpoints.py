"""Structure of every built checkpoint: quantization method and algorithm in its config, scale tensors present,
the layers the recipe keeps in BF16 kept, size on disk and compression against BF16, weight error against BF16
and, for packed 4-bit weights, the byte entropy of the packed stream (seed 001's compressibility proxy).
Built, downloaded and local checkpoints alike: what a checkpoint is comes from its own config, and the weight
error and entropy are measured whenever the model's BF16 baseline is available (it always is: it is the
reference every variant is gated against). No server is needed: these run wherever the checkpoint is obtained."""

import re

from quantgate.checkpoints.identity import identify_checkpoint
from quantgate.checkpoints.inspect import inspect_checkpoint_cached

METHOD = {"llmcompressor": "compressed-tensors", "modelopt": "modelopt"}
ALGORITHM = {"fp8": "fp8", "nvfp4": "nvfp4", "int8": "int8|w8a8", "int4": "w4a16|int4|pack",
             "mxfp4": "mxfp4", "mxfp8": "mxfp8"}
# Sanity bounds on the weight error relative to the weights' mean square: far above what a working export
# gives (8-bit ~1e-4, 4-bit ~1e-2), far below what a scale or packing bug gives (~1).
MAX_RELATIVE_MSE = {"fp8": 1e-2, "int8": 1e-2, "mxfp8": 1e-2, "int4": 0.1, "nvfp4": 0.1, "mxfp4": 0.1}


def test_checkpoint_structure(qg_run, qg_variant, record_property):
    model, variant = qg_variant
    vr = qg_run.variant(model, variant)
    base = qg_run.variant(model, qg_run.model(model).baseline.name).checkpoint()
    ckpt = vr.checkpoint()
    report = inspect_checkpoint_cached(ckpt.path, ckpt.sha256, base.path, base.sha256)
    print(report.summary())
    # Every checkpoint, built, downloaded or local: the quantization config agrees with the stored tensors
    # (obtaining it already refused a mismatch; this records the check in the test report).
    assert not report.config_mismatches, report.summary()
    assert not report.missing_scales, report.summary()
    for key in ("compression_ratio", "weight_relative_mse", "packed_entropy_bits", "compression_proxy"):
        record_property(key, getattr(report, key))
    # What the checkpoint is comes from its own config, whether built, downloaded or local
    ident = identify_checkpoint(vr.checkpoint().path)
    fmt = ident.format
    assert fmt == vr.variant.format, f"the checkpoint's config says {fmt}, the matrix {vr.variant.format}"
    assert report.quant_method == ident.method, report.summary()
    assert report.algorithm and re.search(ALGORITHM[fmt], report.algorithm, re.I), report.summary()
    assert report.is_quantized and report.compression_ratio and report.compression_ratio > 1.0, report.summary()
    # weight error against BF16 and seed 001's packed-byte entropy: for every checkpoint with a BF16 reference
    assert report.weight_relative_mse is not None and report.weight_relative_mse < MAX_RELATIVE_MSE[fmt], (
        report.summary()
    )
    if fmt in ("nvfp4", "mxfp4"):
        assert report.packed_entropy_bits is not None and 0 < report.packed_entropy_bits <= 8
    if vr.variant.source is not None:
        return  # a fetched checkpoint: the layers its publisher kept in BF16 are the publisher's choice
    recipe = vr.variant.recipe_spec
    assert report.quant_method == METHOD[vr.variant.builder], report.summary()
    if recipe.get("group_size"):
        assert report.group_size == recipe["group_size"], report.summary()
    assert report.unquantized_modules.get("embedding"), "embeddings must stay in BF16"
    assert not any("lm_head" in q.name for q in report.quantized_linears), "lm_head must stay in BF16"

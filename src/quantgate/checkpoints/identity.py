"""What a checkpoint is, read from its own config, and whether it can run on this hardware.

Whatever its source (built here, a local path, a Hub download), a checkpoint says how it is quantized in its
own files: `config.json` `quantization_config` (compressed-tensors: `quant_method: compressed-tensors`,
`format`, `config_groups.*.weights` num_bits/type/strategy/group_size, `ignore`; modelopt:
`quant_method: modelopt` / `quant_algo`) or modelopt's `hf_quant_config.json` (`quantization.quant_algo`).
The parsing is engines/emulation.py `read_quant_config`, the same one inspection and emulation use; this
module maps it to quantgate's format names and to the builder whose exports have that layout, so a local copy
of a built checkpoint gets exactly the built one's kernel expectations (engines/hardware.py `missing_kernel`).

Sources of the names: compressed-tensors 0.17 `CompressionFormat` (the `format` values) and
`QuantizationArgs` (num_bits, type int|float, strategy, group_size); modelopt 0.47's `quant_algo` strings
as written by its HF export (model_config.py QUANTIZATION_*, upper-cased).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.engines.emulation import QuantConfig, read_quant_config
from quantgate.engines.hardware import Hardware, missing_kernel
from quantgate.errors import BuildError

QUANT_METHODS = ("compressed-tensors", "modelopt")
# compressed-tensors `format` -> quantgate format; None: decided by the weights' num_bits/type
CT_FORMATS: dict[str, str | None] = {
    "int-quantized": "int8",
    "float-quantized": "fp8",
    "naive-quantized": None,
    "pack-quantized": None,  # W4A16 or W8A16, by num_bits
    "nvfp4-pack-quantized": "nvfp4",
    "mxfp4-pack-quantized": "mxfp4",
    "mxfp8-quantized": "mxfp8",
}
# modelopt 0.47 `modelopt/torch/export/model_config.py` QUANTIZATION_* (the HF export writes them upper-case),
# and W8A8_SQ_PER_CHANNEL / W4A16_AWQ, the names its unified HF export uses for int8_sq / int4_awq.
MODELOPT_ALGOS = {
    "FP8": "fp8", "FP8_PB_REAL": "fp8", "FP8_PB_WO": "fp8", "FP8_PC_PT": "fp8",
    "NVFP4": "nvfp4", "NVFP4_AWQ": "nvfp4", "NVFP4_SVDQUANT": "nvfp4", "W4A16_NVFP4": "nvfp4",
    "W4A8_NVFP4_FP8": "nvfp4", "MXFP8": "mxfp8", "MXFP4": "mxfp4", "W4A8_MXFP4_FP8": "mxfp4",
    "INT4_AWQ": "int4", "W4A16_AWQ": "int4", "W4A8_AWQ": "int4",
    "INT8_SQ": "int8", "INT8_WO": "int8", "W8A8_SQ_PER_CHANNEL": "int8",
}
BUILDER_OF = {"compressed-tensors": "llmcompressor", "modelopt": "modelopt", None: "none"}

# Formats with an emulation path where no kernel exists, by the builder whose layout the checkpoint has:
# engines/emulation.py decodes modelopt's FP8/NVFP4/MX exports and compressed-tensors' packed INT4 and NVFP4
# (weight_packed U8 + weight_scale F8_E4M3 + weight_global_scale).
EMULATABLE = {"modelopt": {"fp8", "nvfp4", "mxfp8", "mxfp4"}, "llmcompressor": {"int4", "nvfp4"}}


@dataclass(frozen=True)
class CheckpointIdentity:
    """How a checkpoint is quantized, from its own config (quantgate's names)."""

    method: str | None  # compressed-tensors | modelopt | None (unquantized)
    format: str  # bf16 | fp8 | int8 | int4 | nvfp4 | mxfp4 | mxfp8
    scheme: str | None  # W8A8, W4A16-g128, NVFP4, FP8-W8A8 (compressed-tensors) or the modelopt quant_algo
    storage: str | None = None  # compressed-tensors `format` (pack-quantized, ...); None for modelopt
    num_bits: int | None = None
    strategy: str | None = None  # tensor | channel | group | tensor_group (compressed-tensors)
    group_size: int | None = None
    ignore: tuple[str, ...] = field(default_factory=tuple)

    @property
    def builder(self) -> str:
        """The builder whose exports have this layout: decides the kernel expectations (hardware.missing_kernel)."""
        return BUILDER_OF[self.method]

    @property
    def recipe(self) -> dict[str, Any]:
        """The recipe fields missing_kernel reads, as a built variant has them: a compressed-tensors `scheme`
        (weight-only or not) and, for FP8, the weight `strategy` (per-tensor or per-channel), or the modelopt
        `quant_algo` (engines/kernel_table.py `mode_of`)."""
        if self.method == "modelopt" and self.scheme:
            return {"quant_algo": self.scheme.upper()}
        if self.method != "compressed-tensors" or not self.scheme:
            return {}
        fp8_scales = {"strategy": self.strategy} if self.format == "fp8" and self.strategy else {}
        return {"scheme": self.scheme.split("-g")[0], **fp8_scales}


def _bad(where: str, key: str, value: Any, allowed: Any) -> BuildError:
    return BuildError(f"{where}: {key}: {value!r} is not supported; allowed: {allowed}")


def identity_from_config(qc: QuantConfig, where: str = "config.json") -> CheckpointIdentity:
    """Map a parsed quantization config to a CheckpointIdentity; BuildError naming `where`, the key, the value
    and what is allowed, for an unknown quant_method, compressed-tensors format or modelopt quant_algo."""
    if qc.method is None:
        return CheckpointIdentity(None, "bf16", None)
    ignore = tuple(qc.ignore)
    if qc.method == "modelopt":
        algo = str(qc.algorithm or "")
        fmt = MODELOPT_ALGOS.get(algo.upper())
        if fmt is None:
            raise _bad(where, "quantization_config.quant_algo (or hf_quant_config.json quantization.quant_algo)",
                       qc.algorithm, sorted(MODELOPT_ALGOS))
        return CheckpointIdentity("modelopt", fmt, algo, None, None, None, qc.group_size, ignore)
    if qc.method != "compressed-tensors":
        raise _bad(where, "quantization_config.quant_method", qc.method, list(QUANT_METHODS))
    storage = (qc.producer or {}).get("format")
    if storage not in CT_FORMATS:
        raise _bad(where, "quantization_config.format", storage, sorted(CT_FORMATS))
    weights = next((g.get("weights") for g in qc.schemes if g.get("weights")), None)
    if not weights:
        raise BuildError(f"{where}: quantization_config.config_groups: no group quantizes weights; quantgate "
                         "needs config_groups.<name>.weights (num_bits, type) to know what the checkpoint is")
    bits, kind = weights.get("num_bits"), weights.get("type", "int")
    by_args = {("float", 4): "nvfp4" if weights.get("group_size") == 16 else "mxfp4", ("float", 8): "fp8",
               ("int", 8): "int8", ("int", 4): "int4"}.get((kind, bits))
    if by_args is None:
        raise _bad(where, "quantization_config.config_groups.*.weights (type, num_bits)", (kind, bits),
                   [("int", 4), ("int", 8), ("float", 4), ("float", 8)])
    fmt = CT_FORMATS[storage] or by_args
    if storage == "mxfp8-quantized":
        fmt = "mxfp8"
    elif fmt != by_args:
        raise BuildError(f"{where}: quantization_config.format {storage!r} does not match its weights "
                         f"(type {kind}, num_bits {bits}, i.e. {by_args})")
    return CheckpointIdentity("compressed-tensors", fmt, qc.algorithm, storage, bits, weights.get("strategy"),
                              weights.get("group_size"), ignore)


def identify_checkpoint(directory: str | Path) -> CheckpointIdentity:
    """What the checkpoint in `directory` is, from its config.json (and hf_quant_config.json); BuildError
    naming the file when config.json is missing or unreadable, or the quantization config is not supported."""
    d = Path(directory)
    qc = read_quant_config(d)
    where = str(d / ("hf_quant_config.json" if qc.method == "modelopt" and not qc.raw.get("quant_method")
                     and (d / "hf_quant_config.json").is_file() else "config.json"))
    return identity_from_config(qc, where)


def checkpoint_support(ident: CheckpointIdentity, hw: Hardware) -> tuple[str | None, str]:
    """(engine, reason): "vllm" where vLLM has a kernel for this checkpoint on `hw`, "emulated" where it has
    none but engines/emulation.py decodes the layout (weight-only emulation), None where neither; the same
    rule a built variant of that layout gets (hardware.missing_kernel keyed by the layout's builder)."""
    missing = missing_kernel(ident.format, ident.builder, ident.recipe, hw)
    what = f"{ident.method or 'unquantized'} {ident.scheme or ident.format}"
    if missing is None:
        return "vllm", f"real vLLM kernels on {hw.keys[0]} ({what}, from the checkpoint's config)"
    if ident.format in EMULATABLE.get(ident.builder, ()):
        return "emulated", f"{missing}: weight-only emulation ({what}, from the checkpoint's config)"
    return None, (f"{what} (from the checkpoint's config) cannot run on {hw.keys[0]} ({missing}) "
                  "and has no emulation")


def source_dir(src: Any) -> Path | None:
    """Where a prebuilt checkpoint's config.json already lies on this machine, without downloading: a local
    source's folder, or a Hub source's snapshot in the Hugging Face cache (at its pinned revision); else None."""
    from quantgate.matrix import HubSource, LocalSource

    if isinstance(src, LocalSource):
        p = Path(src.path).expanduser()
        return p if (p / "config.json").is_file() else None
    if isinstance(src, HubSource):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(src.id, "config.json", revision=src.revision)
        return Path(hit).parent if isinstance(hit, str) else None
    return None

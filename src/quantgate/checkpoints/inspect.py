"""What a checkpoint directory holds: quantization scheme, tensor dtypes, scales, size and weight error.

Headers and tensors are read with the safetensors package (tensors through its torch backend, as numpy has
no BF16/FP8), so it runs in the main environment without modelopt or a GPU.
Weights are dequantized with the decoders the emulation engine uses (engines/emulation.py), so the weight
error reported here is the error of the weights an emulated evaluation actually serves.

The packed-byte entropy of 4-bit (NVFP4/MXFP4) weights follows the "compression proxy" of the NVFP4 scale
inflation experiment (seeds/001): H = Shannon entropy of the packed uint8 stream in bits per byte, and
proxy = 1 - H/8, the fraction a perfect entropy coder could still remove. A standard NVFP4 export sits
near 1%; re-quantizing with inflated block scales pushes codes towards 0 and +-0.5 and raises it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.atomic import WriteError, atomic_write_json
from quantgate.engines.emulation import (
    EMULATION_FILE,
    FLOAT_DTYPES,
    CheckpointTensors,
    QuantConfig,
    QuantizedLinear,
    dequantize_linear,
    find_quantized_linears,
    layer_tensors,
    read_quant_config,
)
from quantgate.errors import BuildError

# Scale tensors each scheme needs for its weight, and the ones its activations need when they are
# statically quantized (modelopt NVFP4/FP8 and compressed-tensors static schemes).
_WEIGHT_SCALES = {
    "nvfp4": ("weight_scale", "weight_scale_2"),
    "nvfp4_ct": ("weight_scale", "weight_global_scale"),
    "fp8": ("weight_scale",),
    "mxfp8": ("weight_scale",),
    "mxfp4": ("weight_scale",),
    "int8": ("weight_scale",),
    "int4_packed": ("weight_scale",),
    "int4_awq": ("weight_scale",),
}
_INPUT_SCALE = {"nvfp4": "input_scale", "nvfp4_ct": "input_global_scale", "fp8": "input_scale",
                "int8": "input_scale", "int4_awq": "input_scale"}
_PACKED_4BIT = {"nvfp4", "nvfp4_ct", "mxfp4"}


@dataclass
class LinearReport:
    name: str
    scheme: str  # nvfp4 | nvfp4_ct | fp8 | mxfp8 | mxfp4 | int8 | int4_packed | unrecognized
    weight_dtype: str
    stored_shape: list[int]
    shape: list[int]  # dequantized [out, in]
    scales: dict[str, dict[str, Any]]  # role -> {"dtype", "shape"}
    missing_scales: list[str] = field(default_factory=list)
    mse: float | None = None
    relative_mse: float | None = None  # mse / mean(baseline^2)
    entropy_bits: float | None = None  # packed-byte entropy, 4-bit formats only
    folded: list[str] = field(default_factory=list)  # scales folded back before measuring the error


@dataclass
class CheckpointReport:
    path: str
    quant_method: str | None  # modelopt | compressed-tensors | None (unquantized) | other HF method
    algorithm: str | None  # e.g. NVFP4, FP8, W8A8_SQ_PER_CHANNEL, "W4A16-g128"
    kv_cache_algorithm: str | None
    group_size: int | None
    ignore: list[str]
    producer: dict[str, Any] | None
    tensor_dtypes: dict[str, str]
    dtype_counts: dict[str, int]
    quantized_linears: list[LinearReport]
    unquantized_modules: dict[str, list[str]]  # kind (embedding, lm_head, norm, linear, other) -> modules
    missing_scales: list[str]  # "<module>: <role>"
    size_bytes: int
    baseline_path: str | None = None
    baseline_size_bytes: int | None = None
    compression_ratio: float | None = None  # baseline bytes / these bytes
    weight_mse: float | None = None  # element-weighted mean over quantized linears, vs baseline
    weight_relative_mse: float | None = None
    worst_layer: str | None = None  # highest relative MSE
    packed_entropy_bits: float | None = None  # bits per byte over all packed 4-bit weights
    compression_proxy: float | None = None  # 1 - entropy/8
    mse_scope: str | None = None  # which weights weight_mse covers
    modified_tensors: list[str] = field(default_factory=list)  # unquantized tensors that differ from baseline
    build: dict[str, Any] | None = None  # quantgate_build.json, when quantgate built it
    emulation: dict[str, Any] | None = None  # quantgate_emulation.json, when it is an emulated checkpoint
    warnings: list[str] = field(default_factory=list)
    config_mismatches: list[str] = field(default_factory=list)  # quantization config vs stored tensors

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantized_linears)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal or a test failure message."""
        lines = [f"{self.path}: {self.quant_method or 'unquantized'} {self.algorithm or ''}".rstrip()]
        line = f"  {len(self.quantized_linears)} quantized linears, {_mib(self.size_bytes)} on disk"
        if self.compression_ratio:
            line += f", compression {self.compression_ratio:.2f}x vs the baseline"
        lines.append(line)
        if self.weight_mse is not None:
            lines.append(f"  weight MSE {self.weight_mse:.3e} over {self.mse_scope} (relative "
                         f"{self.weight_relative_mse:.3e}, worst {self.worst_layer})")
        if self.modified_tensors:
            lines.append(f"  {len(self.modified_tensors)} unquantized tensors differ from the baseline "
                         f"(e.g. {self.modified_tensors[0]}; folded scales)")
        if self.emulation:
            lines.append(f"  emulated ({self.emulation.get('method')}) from {self.emulation.get('source_format')}")
        if self.packed_entropy_bits is not None:
            lines.append(f"  packed-byte entropy {self.packed_entropy_bits:.4f} bits/byte, "
                         f"compression proxy {self.compression_proxy:.2%}")
        kept = {k: len(v) for k, v in self.unquantized_modules.items() if v}
        if kept:
            lines.append(f"  left unquantized: {kept}")
        lines += [f"  config/tensor mismatch: {m}" for m in self.config_mismatches[:5]]
        lines += [f"  missing scale: {m}" for m in self.missing_scales[:5]]
        lines += [f"  warning: {w}" for w in self.warnings[:5]]
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def byte_entropy(counts: np.ndarray) -> float:
    """Shannon entropy in bits per symbol of a histogram."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _module_kind(prefix: str, ndim: int) -> str:
    leaf = prefix.rsplit(".", 1)[-1].lower()
    if "embed" in leaf or leaf in ("wte", "wpe", "tok_embeddings"):
        return "embedding"
    if leaf in ("lm_head", "output", "embed_out"):
        return "lm_head"
    if "norm" in leaf or leaf.startswith("ln"):
        return "norm"
    return "linear" if ndim == 2 else "other"


def _unrecognized(ck: CheckpointTensors, prefix: str, parts: dict[str, str]) -> LinearReport | None:
    """A layer whose weight is stored as integers/FP8 but whose tensors match no known scheme."""
    wname = parts.get("weight_packed") or parts.get("weight")
    if not wname or ck.tensors[wname].dtype in FLOAT_DTYPES:
        return None
    w = ck.tensors[wname]
    missing = []
    if "weight_scale" not in parts:
        missing.append("weight_scale")
    elif w.dtype == "U8" and ck.tensors[parts["weight_scale"]].dtype == "F8_E4M3":
        missing.append("weight_global_scale" if "weight_packed" in parts else "weight_scale_2")
    scales = {r: {"dtype": ck.tensors[n].dtype, "shape": list(ck.tensors[n].shape)}
              for r, n in parts.items() if r not in ("weight", "weight_packed")}
    return LinearReport(prefix, "unrecognized", w.dtype, list(w.shape), list(w.shape), scales, missing)


def inspect_checkpoint(directory: str | Path, baseline_dir: str | Path | None = None, *,
                       compute_error: bool = True) -> CheckpointReport:
    """Describe the checkpoint in `directory`, comparing its weights with `baseline_dir` when given.

    Raises BuildError naming the directory and the cause when it has no config.json, no safetensors
    weights, or a corrupt/truncated weight file (the same for the baseline).
    """
    d = Path(directory)
    ck = CheckpointTensors(d)
    qc = read_quant_config(d)
    cfg = json.loads((d / "config.json").read_text())
    warnings: list[str] = []

    linears = find_quantized_linears(ck)
    reports: dict[str, LinearReport] = {}
    act_static = _activation_scales_expected(qc)
    for prefix, ql in linears.items():
        wname = ql.parts.get("weight_packed") or ql.parts["weight"]
        w = ck.tensors[wname]
        scales = {r: {"dtype": ck.tensors[n].dtype, "shape": list(ck.tensors[n].shape)}
                  for r, n in ql.parts.items() if r not in ("weight", "weight_packed")}
        need = list(_WEIGHT_SCALES.get(ql.scheme, ()))
        if act_static and ql.scheme in _INPUT_SCALE:
            need.append(_INPUT_SCALE[ql.scheme])
        missing = [r for r in need if r not in ql.parts]
        reports[prefix] = LinearReport(
            prefix, ql.scheme, w.dtype, list(w.shape), list(ql.shape), scales, missing
        )

    for prefix, parts in layer_tensors(ck.tensors).items():
        if prefix not in linears:
            bad = _unrecognized(ck, prefix, parts)
            if bad is not None:
                reports[prefix] = bad
                warnings.append(f"{prefix}: {bad.weight_dtype} weight in no layout quantgate can decode")

    unquantized: dict[str, list[str]] = {k: [] for k in ("embedding", "lm_head", "norm", "linear", "other")}
    for name, info in sorted(ck.tensors.items()):
        prefix, _, leaf = name.rpartition(".")
        if leaf != "weight" or prefix in reports or info.dtype not in FLOAT_DTYPES:
            continue
        unquantized[_module_kind(prefix, len(info.shape))].append(prefix)
    if not unquantized["lm_head"] and not any(n.endswith("lm_head.weight") for n in ck.tensors):
        if cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False)):
            unquantized["lm_head"].append("lm_head (tied to the input embedding)")

    # A quantized checkpoint whose linears are stored in float although the config does not exclude them
    # was probably exported wrong (or by a tool that silently skipped layers).
    if qc.method and not linears:
        warnings.append(f"config says {qc.method} {qc.algorithm} but no quantized linear layer was found")
    elif qc.method:
        stray = [m for m in unquantized["linear"] if not _ignored(m, qc.ignore)]
        if stray:
            warnings.append(f"{len(stray)} linear layers are stored unquantized though the config does not "
                            f"exclude them, e.g. {stray[0]}")

    missing_scales = [f"{p}: {r}" for p, rep in sorted(reports.items()) for r in rep.missing_scales]

    # Packed 4-bit streams: aggregate histogram for the whole checkpoint, per-layer entropy for each.
    hist_total = np.zeros(256, dtype=np.int64)
    for prefix, ql in linears.items():
        if ql.scheme in _PACKED_4BIT:
            packed = ck.raw(ql.parts.get("weight_packed") or ql.parts["weight"])
            hist = np.bincount(packed.reshape(-1), minlength=256)
            hist_total += hist
            reports[prefix].entropy_bits = byte_entropy(hist)
    entropy = byte_entropy(hist_total) if hist_total.any() else None

    report = CheckpointReport(
        path=str(d),
        quant_method=qc.method,
        algorithm=qc.algorithm,
        kv_cache_algorithm=qc.kv_cache_algorithm,
        group_size=qc.group_size,
        ignore=qc.ignore,
        producer=qc.producer,
        tensor_dtypes={n: i.dtype for n, i in sorted(ck.tensors.items())},
        dtype_counts=_count(i.dtype for i in ck.tensors.values()),
        quantized_linears=[reports[p] for p in sorted(reports)],
        unquantized_modules=unquantized,
        missing_scales=missing_scales,
        size_bytes=ck.size_bytes,
        packed_entropy_bits=entropy,
        compression_proxy=None if entropy is None else 1.0 - entropy / 8.0,
        warnings=warnings,
        config_mismatches=quantization_mismatches(ck, qc),
    )
    for attr, fname in (("build", "quantgate_build.json"), ("emulation", EMULATION_FILE)):
        if (d / fname).is_file():
            try:
                setattr(report, attr, json.loads((d / fname).read_text()))
            except json.JSONDecodeError as e:
                warnings.append(f"{fname} is not valid JSON ({e})")
    if baseline_dir is not None:
        _compare_with_baseline(report, ck, linears, Path(baseline_dir), compute_error)
    return report


REPORT_CACHE_VERSION = 1  # bump when CheckpointReport's fields change meaning


def inspect_checkpoint_cached(directory: str | Path, sha256: str, baseline_dir: str | Path | None = None,
                              baseline_sha256: str | None = None) -> CheckpointReport:
    """inspect_checkpoint's report, kept in quantgate's cache under the checkpoints' content hashes.

    The report reads every weight (torch for BF16 and FP8) and takes seconds; a rerun with the same checkpoints
    and the same inspection code reads it back instead (issue 14: a warm rerun imports no torch). The key holds
    the content hashes the checkpoint cache records (`Checkpoint.sha256`), the paths (the report names them)
    and the sha256 of this module and of engines/emulation.py, which decode the weights.
    """
    import hashlib

    from quantgate.engines import emulation
    from quantgate.paths import cache_dir

    code = hashlib.sha256()
    for f in (Path(__file__), Path(emulation.__file__)):
        code.update(f.read_bytes())
    key = {"version": REPORT_CACHE_VERSION, "checkpoint": [str(Path(directory)), sha256],
           "baseline": [str(Path(baseline_dir)) if baseline_dir else None, baseline_sha256],
           "code_sha256": code.hexdigest()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "inspections" / f"{name}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            d = dict(stored["report"])
            d["quantized_linears"] = [LinearReport(**x) for x in d["quantized_linears"]]
            return CheckpointReport(**d)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # missing or from another version of the report: inspected again below
    report = inspect_checkpoint(directory, baseline_dir)
    try:
        atomic_write_json(path, {"key": key, "report": report.to_dict()})
    except (OSError, WriteError):
        pass  # a read-only cache only costs the next run the inspection
    return report


def quantization_mismatches(ck: CheckpointTensors, qc: QuantConfig) -> list[str]:
    """Layers whose stored tensors contradict the quantization config, one line per layer naming it.

    Two kinds, for compressed-tensors (`quantization_config.ignore`, `config_groups.*.targets`) and modelopt
    (`hf_quant_config.json` / `quantization_config` `exclude_modules` or `ignore`):
      - a layer the config ignores (or, for compressed-tensors, no config group targets) but stored quantized;
      - a linear layer (lm_head included) stored in float that the config targets and does not ignore.
    vLLM builds each layer's kernel from the config, so either loads wrong weights or fails minutes later.
    A checkpoint without a quantization config must store no quantized layer. Other HF methods (GPTQ, AWQ
    with `modules_to_not_convert`) store layouts quantgate does not classify and are not checked.
    """
    quantized = {p: ql.scheme for p, ql in find_quantized_linears(ck).items()}
    for prefix, parts in layer_tensors(ck.tensors).items():
        wname = parts.get("weight_packed") or parts.get("weight")
        if prefix not in quantized and wname and ck.tensors[wname].dtype not in FLOAT_DTYPES:
            quantized[prefix] = f"{ck.tensors[wname].dtype} weight"
    if qc.method is None:
        return [f"{p}: stored quantized ({s}) but config.json has no quantization_config"
                for p, s in sorted(quantized.items())]
    if qc.method not in ("compressed-tensors", "modelopt"):
        return []
    problems = []
    for prefix, scheme in sorted(quantized.items()):
        pattern = _ignored(prefix, qc.ignore)
        if pattern:
            problems.append(f"{prefix}: in the quantization config's ignore list ({pattern!r}) but stored "
                            f"quantized ({scheme})")
        elif not _targeted(prefix, qc):
            problems.append(f"{prefix}: stored quantized ({scheme}) but no config group targets it")
    for name, info in sorted(ck.tensors.items()):
        prefix, _, leaf = name.rpartition(".")
        if leaf != "weight" or prefix in quantized or info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
            continue
        if _module_kind(prefix, 2) not in ("linear", "lm_head"):
            continue
        if _targeted(prefix, qc) and not _ignored(prefix, qc.ignore):
            problems.append(f"{prefix}: stored unquantized ({info.dtype}) but the quantization config does "
                            f"not ignore it")
    return problems


def check_quantization_config(directory: str | Path, label: str) -> None:
    """Raise BuildError naming every layer whose stored tensors contradict the quantization config.

    The check decodes every linear layer's tensors (about 0.1 s per small checkpoint, on every cached use). A
    checkpoint that passed is recorded in quantgate's cache under the directory, the name, size and mtime of
    each of its files, and the sha256 of this module and of engines/emulation.py; while none of those change,
    the next use reads the record instead of decoding again (issue 14: a warm rerun in seconds). A failure
    is never recorded: it is found again on every use.
    """
    d = Path(directory)
    record = _passed_check_record(d)
    if record is not None and record.is_file():
        return
    problems = quantization_mismatches(CheckpointTensors(d), read_quant_config(d))
    if not problems and record is not None:
        try:
            atomic_write_json(record, {"passed": str(d)})
        except (OSError, WriteError):
            pass  # a read-only cache only costs the next use the check
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise BuildError(f"{label}: {d}: the quantization config and the stored tensors disagree:\n  "
                         + "\n  ".join(problems[:10]) + more)


def _passed_check_record(d: Path) -> Path | None:
    """Where a passed check_quantization_config of `d`, as its files are now, is recorded; None when the
    files cannot be listed (the check then runs)."""
    import hashlib

    from quantgate.engines import emulation
    from quantgate.paths import cache_dir

    try:
        files = sorted((f.name, st.st_size, st.st_mtime_ns) for f in d.iterdir() if f.is_file() for st in (f.stat(),))
    except OSError:
        return None
    h = hashlib.sha256(json.dumps([str(d.resolve()), files]).encode())
    for f in (Path(__file__), Path(emulation.__file__)):
        h.update(f.read_bytes())
    return cache_dir() / "inspections" / f"quantization-check-{h.hexdigest()[:32]}.json"


def _targeted(module: str, qc: QuantConfig) -> bool:
    """Whether the config asks for `module` to be quantized (ignoring its ignore list).

    compressed-tensors: a config group's `targets` names it by class (`Linear`: every linear layer; the
    only class quantgate can tell from tensors), by name, or by `re:` regex. modelopt quantizes every linear
    layer it does not exclude.
    """
    if qc.method == "modelopt":
        return bool(qc.algorithm)  # a KV-cache-only export quantizes no linear layer
    for group in qc.schemes:
        if group.get("weights") is None:
            continue
        for target in group.get("targets") or []:
            if target == "Linear" or _ignored(module, [target]):
                return True
    return False


def _ignored(module: str, patterns: list[str]) -> str | None:
    """The pattern of a config's ignore/exclude list that covers `module` (exact, suffix, glob, or
    compressed-tensors `re:` regex), or None."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.match(pat[3:], module):
                return pat
        elif module == pat or module.endswith("." + pat) or fnmatch.fnmatchcase(module, pat):
            return pat
    return None


def _activation_scales_expected(qc: Any) -> bool:
    """Whether the config says activations are statically quantized (so input scales must be stored)."""
    for group in qc.schemes:
        act = group.get("input_activations")
        if act and not act.get("dynamic", False):
            return True
    static_act = ("FP8", "NVFP4", "W8A8_SQ_PER_CHANNEL", "W4A8_AWQ")
    return qc.method == "modelopt" and (qc.algorithm or "").upper() in static_act


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


# Which norm feeds which linear, for the folding below: attention inputs read the pre-attention norm,
# MLP inputs the pre-MLP norm (HF names across Llama/Qwen/Mistral/GPT-2/Falcon-style blocks).
_ATTN_INPUTS = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn"}
_MLP_INPUTS = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "c_fc", "dense_h_to_4h"}
_ATTN_NORMS = ("input_layernorm", "ln_1", "attention_norm", "pre_attention_layernorm")
_MLP_NORMS = ("post_attention_layernorm", "ln_2", "ffn_norm", "pre_feedforward_layernorm")
_BLOCK = re.compile(r"^(.*\.\d+)\.")


def _feeding_norm(prefix: str, changed: dict[str, np.ndarray]) -> str | None:
    leaf = prefix.rsplit(".", 1)[-1]
    block = _BLOCK.match(prefix)
    if not block:
        return None
    norms = _ATTN_NORMS if leaf in _ATTN_INPUTS else _MLP_NORMS if leaf in _MLP_INPUTS else ()
    return next((f"{block.group(1)}.{n}" for n in norms if f"{block.group(1)}.{n}" in changed), None)


def _compare_with_baseline(
    report: CheckpointReport, ck: CheckpointTensors, linears: dict[str, QuantizedLinear],
    baseline_dir: Path, compute_error: bool,
) -> None:
    try:
        base = CheckpointTensors(baseline_dir)
    except BuildError as e:
        raise BuildError(f"baseline for {report.path}: {e}") from None
    report.baseline_path = str(baseline_dir)
    report.baseline_size_bytes = base.size_bytes
    report.compression_ratio = base.size_bytes / report.size_bytes if report.size_bytes else None

    # modelopt's AWQ/SmoothQuant export folds the input scale of q/k/v and gate/up into the preceding
    # norm (norm * s, weight / s). Such a layer's stored weight is not comparable with the baseline's
    # until the norm's change is multiplied back into its columns.
    changed: dict[str, np.ndarray] = {}
    for prefix in (*report.unquantized_modules["norm"], *report.unquantized_modules["embedding"]):
        name = f"{prefix}.weight"
        if name in base and tuple(base.tensors[name].shape) == tuple(ck.tensors[name].shape):
            mine, ref = ck.float32(name), base.float32(name)
            if not np.array_equal(mine, ref):
                report.modified_tensors.append(name)
                if mine.ndim == 1:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        changed[prefix] = np.where(ref != 0, mine / ref, 1.0).astype(np.float32)
    if not compute_error:
        return

    # A dense checkpoint (the BF16 base, or an emulated one) is compared linear by linear as stored, so an
    # emulated checkpoint shows the error of exactly the weights it serves.
    by_name = {r.name: r for r in report.quantized_linears}
    if linears:
        report.mse_scope = "quantized linears"
        names = {prefix: ql.weight_name for prefix, ql in linears.items()}
    else:
        report.mse_scope = "all linear weights (dense checkpoint)"
        names = {prefix: f"{prefix}.weight" for prefix in report.unquantized_modules["linear"]}

    # Each weight is dequantized once: _row_folds reads the producers, the loop below every layer.
    loaded: dict[str, tuple[np.ndarray, list[str]]] = {}

    def load(prefix: str) -> np.ndarray:
        """The layer's weight with the norm scale folded back; what was folded is kept for its report."""
        if prefix not in loaded:
            value = dequantize_linear(ck, linears[prefix]) if linears else ck.float32(names[prefix])
            folded: list[str] = []
            norm = _feeding_norm(prefix, changed)
            if norm is not None and changed[norm].shape[0] == value.shape[1]:
                value = value * changed[norm][None, :]
                folded.append(f"{norm} scale")
            loaded[prefix] = (value, folded)
        return loaded[prefix][0]

    row_scale, col_scale = _row_folds(ck, base, linears, names, load)
    sse = energy = 0.0
    numel = 0
    worst: tuple[float, str | None] = (-1.0, None)
    for prefix, ref_name in names.items():
        if ref_name not in base:
            report.warnings.append(f"baseline has no {ref_name}; no error for {prefix}")
            continue
        ref_shape = tuple(base.tensors[ref_name].shape)
        ref = base.float32(ref_name).astype(np.float64)
        value = load(prefix).astype(np.float64)
        notes = list(loaded.pop(prefix)[1])  # popped: each layer is compared once, so free its weight
        if value.shape != ref_shape:
            report.warnings.append(f"{prefix}: shape {list(value.shape)} vs baseline {list(ref_shape)}")
            continue
        if prefix in row_scale:
            value = value / row_scale[prefix][0][:, None]
            notes.append(f"output-row scale shared with {row_scale[prefix][1]} (estimated against the baseline)")
        if prefix in col_scale:
            value = value * col_scale[prefix][0][None, :]
            notes.append(f"input scale folded into {col_scale[prefix][1]} (estimated against the baseline)")
        diff = value - ref
        layer_sse = float(np.sum(diff * diff))
        layer_energy = float(np.sum(ref * ref))
        relative = layer_sse / layer_energy if layer_energy else math.inf
        if prefix in by_name:
            by_name[prefix].mse = layer_sse / ref.size
            by_name[prefix].relative_mse = relative
            by_name[prefix].folded = notes
        if not math.isfinite(layer_sse):
            report.warnings.append(f"{prefix}: weight has NaN/inf")
        if relative > worst[0]:
            worst = (relative, prefix)
        sse += layer_sse
        energy += layer_energy
        numel += ref.size
    if numel:
        report.weight_mse = sse / numel
        report.weight_relative_mse = sse / energy if energy else None
        report.worst_layer = worst[1]


# Consumer linear -> the linear whose output rows feed it elementwise. AWQ may fold the consumer's input
# scale into those rows (up_proj rows * s, down_proj columns / s) and store no pre_quant_scale at all.
_ROW_FOLD = {"down_proj": "up_proj", "o_proj": "v_proj", "fc2": "fc1", "w2": "w3",
             "dense_4h_to_h": "dense_h_to_4h"}


def _row_folds(ck: CheckpointTensors, base: CheckpointTensors, linears: dict[str, QuantizedLinear],
               names: dict[str, str], load: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-channel scales moved between producer rows and consumer columns, estimated from the baseline.

    The scale itself is not stored anywhere after such a fold, so it is recovered as the least-squares
    gain of each producer row against the baseline's row. Only gains that clearly differ from 1 count
    as a fold: those that remove most of the producer's error, where quantization noise alone would let
    one parameter per row of hundreds of weights absorb only a small part of it.
    """
    rows: dict[str, Any] = {}
    cols: dict[str, Any] = {}
    for consumer in names:
        parent, _, leaf = consumer.rpartition(".")
        producer = f"{parent}.{_ROW_FOLD.get(leaf, '')}"
        if leaf not in _ROW_FOLD or producer not in names or consumer in linears and (
            "pre_quant_scale" in linears[consumer].parts
        ):
            continue
        if names[producer] not in base or names[consumer] not in base:
            continue
        ref = base.float32(names[producer]).astype(np.float64)
        if ref.shape[0] != base.tensors[names[consumer]].shape[1]:
            continue  # e.g. GQA: v_proj has fewer rows than o_proj has inputs, so nothing was folded
        value = load(producer).astype(np.float64)
        if value.shape != ref.shape:
            continue
        gain = np.sum(value * ref, axis=1) / np.maximum(np.sum(ref * ref, axis=1), 1e-30)
        if np.any(gain <= 0):
            continue
        # Fitting one gain per row always trims a little quantization noise; a real fold removes most of
        # the error, so only a large reduction counts as one.
        before = float(np.sum((value - ref) ** 2))
        after = float(np.sum((value / gain[:, None] - ref) ** 2))
        if not after < 0.25 * before:
            continue
        rows[producer] = (gain, consumer)
        cols[consumer] = (gain, producer)
    return rows, cols

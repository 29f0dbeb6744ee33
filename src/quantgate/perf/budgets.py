"""Performance budgets (thresholds/perf.yaml): schema, loading, and the pure verdict logic.

A budget bounds one metric of one variant with `min` and/or `max`:
  relative  `relative_to_bf16: true`: the bound is a ratio to the model's BF16 baseline measured on the same
            machine in the same session (output_throughput >= 1.0 x bf16)
  absolute  the bound is in the metric's own unit, for the hardware classes named in `hardware`
  memory    server RSS/PSS, GPU memory in use, the engine's non-KV memory (model_memory_bytes), KV-cache
            capacity in tokens (absolute or relative)
  size      checkpoint bytes on disk, and compression_ratio = BF16 bytes / variant bytes
Every budget may be limited to hardware classes, formats, models and (serving metrics) concurrency levels;
one that does not apply here is skipped with the reason. A serving metric is measured over several rounds:
the verdict compares the median, and its message shows the spread (min/median/max) of the rounds.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantgate.errors import MatrixError
from quantgate.matrix import Format, format_validation_errors

SERVING_METRICS: tuple[str, ...] = (
    "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms",
    "e2el_p50_ms", "e2el_p99_ms", "output_throughput", "request_throughput", "total_token_throughput",
)
MEMORY_METRICS: tuple[str, ...] = ("server_rss_bytes", "server_pss_bytes", "gpu_memory_used_bytes",
                                   "model_memory_bytes", "kv_cache_tokens")
SIZE_METRICS: tuple[str, ...] = ("checkpoint_bytes", "compression_ratio")
Metric = Literal[
    "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms",
    "e2el_p50_ms", "e2el_p99_ms", "output_throughput", "request_throughput", "total_token_throughput",
    "server_rss_bytes", "server_pss_bytes", "gpu_memory_used_bytes", "model_memory_bytes", "kv_cache_tokens",
    "checkpoint_bytes", "compression_ratio",
]
UNITS: dict[str, str] = {
    **{m: "ms" for m in SERVING_METRICS if m.endswith("_ms")},
    "output_throughput": "tok/s", "request_throughput": "req/s", "total_token_throughput": "tok/s",
    "server_rss_bytes": "B", "server_pss_bytes": "B", "gpu_memory_used_bytes": "B", "model_memory_bytes": "B",
    "checkpoint_bytes": "B",
    "kv_cache_tokens": "tokens", "compression_ratio": "x",
}
# Names people use for a GPU, mapped to the hardware class quantgate.engines.hardware.detect() reports.
HARDWARE_ALIASES: dict[str, str] = {
    "h100": "sm90", "h200": "sm90", "gh200": "sm90", "hopper": "sm90",
    "b200": "sm100", "gb200": "sm100", "b100": "sm100", "blackwell": "sm100",
    "a100": "sm80", "ampere": "sm80", "l4": "sm89", "l40s": "sm89", "ada": "sm89",
}
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*([\d.]+(?:e[+-]?\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)


def hardware_class(name: str) -> str:
    """`cpu`, `smNN`, or an alias of one (h100 -> sm90); anything else is a ValueError."""
    hw = HARDWARE_ALIASES.get(name.lower(), name.lower())
    if hw != "cpu" and not re.fullmatch(r"sm\d{2,3}", hw):
        raise ValueError(f"unknown hardware class {name!r}; use cpu, smNN (sm90, sm100) or one of "
                         f"{sorted(HARDWARE_ALIASES)}")
    return hw


def metric_kind(metric: str) -> str:
    if metric in SIZE_METRICS:
        return "size"
    if metric in MEMORY_METRICS:
        return "memory"
    return "serving"


def parse_bytes(value: Any) -> float:
    """A number, or a string with a unit: "1.5 GiB", "300MB"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return float(m[1]) * _BYTE_UNITS[m[2].lower()]
    raise ValueError(f"{value!r} is not a size; write a number of bytes or e.g. '1.5 GiB', '300 MB'")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Workload(_Strict):
    """What each serving round sends: fixed lengths, fixed concurrency levels, warmup requests first."""

    concurrency: list[int] = Field([1, 8], min_length=1, description="max requests in flight; one test each")
    input_len: int = Field(256, gt=0, description="prompt tokens per request (random tokens, exact)")
    output_len: int = Field(64, gt=0, description="generated tokens per request (EOS ignored, exact)")
    num_prompts: int = Field(32, gt=0, description="requests per round")
    warmups: int = Field(4, ge=0, description="requests sent before each round, not measured")
    rounds: int = Field(3, ge=1, le=50, description="rounds per concurrency level; verdicts use the median")

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if any(c <= 0 for c in v):
            raise ValueError(f"concurrency levels must be positive, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate concurrency levels in {v}")
        return v

    @model_validator(mode="after")
    def _enough_prompts(self) -> Workload:
        if self.num_prompts < max(self.concurrency):
            raise ValueError(f"num_prompts ({self.num_prompts}) is below the highest concurrency "
                             f"({max(self.concurrency)}): that level would never be reached")
        return self


class Budget(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    metric: Metric
    min: float | None = None
    max: float | None = None
    relative_to_bf16: bool = Field(False, description="min/max are ratios to BF16 measured in this session")
    hardware: list[str] | None = Field(None, description="classes (cpu, sm90, sm100; or h100, b200...); "
                                                         "none = every class")
    formats: list[Format] | None = Field(None, description="variant formats; none = every format")
    models: list[str] | None = Field(None, description="model names; none = every model")
    concurrency: list[int] | None = Field(None, description="serving metrics only; none = every level")
    note: str = Field("", description="why this value (shown in the verdict)")

    @model_validator(mode="before")
    @classmethod
    def _byte_units(cls, data: Any) -> Any:
        # Sizes read better with units; only absolute byte budgets take them (a ratio has no unit).
        if isinstance(data, dict) and str(data.get("metric", "")).endswith("_bytes") \
                and not data.get("relative_to_bf16"):
            data = dict(data)
            for key in ("min", "max"):
                if isinstance(data.get(key), str):
                    data[key] = parse_bytes(data[key])
        return data

    @field_validator("hardware")
    @classmethod
    def _hardware(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [hardware_class(name) for name in v]

    @model_validator(mode="after")
    def _consistent(self) -> Budget:
        if self.min is None and self.max is None:
            raise ValueError(f"budget {self.name!r} sets neither min nor max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"budget {self.name!r}: min {self.min} is above max {self.max}")
        if self.metric == "compression_ratio" and self.relative_to_bf16:
            raise ValueError("compression_ratio is already BF16 bytes / variant bytes; drop relative_to_bf16")
        if self.concurrency is not None and self.metric not in SERVING_METRICS:
            raise ValueError(f"budget {self.name!r}: concurrency applies to serving metrics only, "
                             f"not {self.metric}")
        return self

    @property
    def kind(self) -> str:
        """relative | absolute | memory | size (memory and size budgets may also be relative)."""
        k = metric_kind(self.metric)
        if k != "serving":
            return k
        return "relative" if self.relative_to_bf16 else "absolute"

    def applies(self, *, hw_class: str | None = None, fmt: str | None = None, model: str | None = None,
                concurrency: int | None = None) -> str | None:
        """None when the budget applies; else the reason it does not (what a skip says)."""
        if self.hardware is not None and hw_class is not None and hw_class not in self.hardware:
            return f"budget {self.name} is for {', '.join(self.hardware)}; this machine is {hw_class}"
        if self.formats is not None and fmt is not None and fmt not in self.formats:
            return f"budget {self.name} is for formats {', '.join(self.formats)}, not {fmt}"
        if self.models is not None and model is not None and model not in self.models:
            return f"budget {self.name} is for models {', '.join(self.models)}, not {model}"
        if self.concurrency is not None and concurrency is not None and concurrency not in self.concurrency:
            return f"budget {self.name} is for concurrency {self.concurrency}, not {concurrency}"
        return None

    def bounds_text(self) -> str:
        unit = " x bf16" if self.relative_to_bf16 else ""
        parts = []
        if self.min is not None:
            parts.append(f">= {_fmt(self.min, self.metric, self.relative_to_bf16)}{unit}")
        if self.max is not None:
            parts.append(f"<= {_fmt(self.max, self.metric, self.relative_to_bf16)}{unit}")
        return " and ".join(parts)


class PerfConfig(_Strict):
    workload: Workload = Workload()
    hardware_workloads: dict[str, Workload] = Field(
        default_factory=dict,
        description="hardware class -> the workload there (a GPU needs far more requests than a CPU to time)",
    )
    budgets: list[Budget] = Field(default_factory=list)

    @field_validator("hardware_workloads", mode="before")
    @classmethod
    def _hw_keys(cls, v: Any) -> Any:
        return {hardware_class(str(k)): w for k, w in v.items()} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _unique(self) -> PerfConfig:
        names = [b.name for b in self.budgets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate budget name(s) {dupes}")
        levels = set(self.workload.concurrency).union(
            *(w.concurrency for w in self.hardware_workloads.values()))
        for b in self.budgets:
            if b.concurrency is not None:
                unknown = [c for c in b.concurrency if c not in levels]
                if unknown:
                    raise ValueError(f"budget {b.name!r} names concurrency {unknown}, which no workload runs "
                                     f"(concurrency levels: {sorted(levels)})")
        return self

    def workload_for(self, hw_class: str) -> Workload:
        return self.hardware_workloads.get(hw_class, self.workload)

    def budgets_for(self, kinds: tuple[str, ...]) -> list[Budget]:
        """Budgets whose metric is of one of `kinds` ("serving", "memory", "size")."""
        return [b for b in self.budgets if metric_kind(b.metric) in kinds]


class PerfFile(_Strict):
    perf: PerfConfig


def _budget_named(data: Any) -> Callable[[list[Any]], list[Any]]:
    def locate(loc: list[Any]) -> list[Any]:
        # name the budget, not only its index, so the line can be found in the file
        if len(loc) >= 3 and loc[:2] == ["perf", "budgets"] and isinstance(loc[2], int):
            try:
                loc[2] = f"{loc[2]}({data['perf']['budgets'][loc[2]]['name']})"
            except (KeyError, IndexError, TypeError):
                pass
        return loc

    return locate


def load_perf(path: str | Path) -> PerfConfig:
    """Read and validate thresholds/perf.yaml; a MatrixError names the file and every bad key."""
    path = Path(path)
    if not path.is_file():
        raise MatrixError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MatrixError(f"{path}: not valid YAML: {exc}") from None
    try:
        return PerfFile.model_validate(data).perf
    except ValidationError as err:
        raise MatrixError(format_validation_errors(path, err, "perf budgets", _budget_named(data))) from None


@dataclass(frozen=True)
class Spread:
    n: int
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(len(values), min(values), statistics.median(values), max(values))

    def text(self, metric: str) -> str:
        if self.n == 1:
            return f"{_fmt(self.median, metric)} (1 measurement)"
        return (f"min {_fmt(self.min, metric)} / median {_fmt(self.median, metric)} / "
                f"max {_fmt(self.max, metric)} (n={self.n})")


@dataclass(frozen=True)
class BudgetVerdict:
    budget: Budget
    label: str
    passed: bool
    skipped: bool
    reason: str = ""
    value: float | None = None  # the median, or the ratio of medians for a relative budget
    measured: Spread | None = None
    baseline: Spread | None = None

    def message(self) -> str:
        b = self.budget
        head = f"{b.name} [{self.label}] {b.metric}" if self.label else f"{b.name} {b.metric}"
        if self.skipped:
            return f"SKIP {head}: {self.reason}"
        status = "PASS" if self.passed else "FAIL"
        rel = " x bf16" if b.relative_to_bf16 else ""
        assert self.value is not None and self.measured is not None
        lines = [f"{status} {head}: measured {_fmt(self.value, b.metric, b.relative_to_bf16)}{rel}, "
                 f"budget {b.bounds_text()}",
                 f"    rounds: {self.measured.text(b.metric)}"]
        if self.baseline is not None:
            lines.append(f"    bf16 rounds: {self.baseline.text(b.metric)}")
            lo, hi = self.ratio_range()
            lines.append(f"    ratio range over rounds: {lo:.3f} .. {hi:.3f} x bf16")
        if b.note:
            lines.append(f"    note: {b.note}")
        return "\n".join(lines)

    def ratio_range(self) -> tuple[float, float]:
        """The ratio's extremes given the spread of both sides (worst and best pairing)."""
        assert self.measured is not None and self.baseline is not None
        return (_ratio(self.measured.min, self.baseline.max), _ratio(self.measured.max, self.baseline.min))


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def _fmt(value: float, metric: str, ratio: bool = False) -> str:
    if ratio or metric == "compression_ratio":
        return f"{value:.3f}"
    unit = UNITS.get(metric, "")
    if unit == "B":
        for name, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {name} ({value:,.0f} B)"
        return f"{value:,.0f} B"
    if unit == "tokens":
        return f"{value:,.0f} tokens"
    return f"{value:.2f} {unit}".rstrip()


def evaluate_budget(
    budget: Budget,
    measured_rounds: list[float],
    baseline_rounds: list[float] | None,
    *,
    label: str = "",
    hw_class: str | None = None,
    fmt: str | None = None,
    model: str | None = None,
    concurrency: int | None = None,
) -> BudgetVerdict:
    """Compare the median of `measured_rounds` (or, for a relative budget, the ratio of its median to the
    median of `baseline_rounds`) with the budget's bounds. The keyword context, when given, skips a budget
    that is for other hardware, formats, models or concurrency levels."""
    why = budget.applies(hw_class=hw_class, fmt=fmt, model=model, concurrency=concurrency)
    if why is None and budget.relative_to_bf16 and fmt == "bf16":
        why = f"budget {budget.name} compares with BF16, and this is the BF16 baseline itself"
    if why is not None:
        return BudgetVerdict(budget, label, passed=True, skipped=True, reason=why)
    values = [float(v) for v in measured_rounds if v is not None]
    if not values:
        return BudgetVerdict(budget, label, passed=True, skipped=True,
                             reason=f"{budget.metric} was not measured here")
    measured = Spread.of(values)
    baseline = None
    value = measured.median
    if budget.relative_to_bf16:
        base = [float(v) for v in (baseline_rounds or []) if v is not None]
        if not base:
            return BudgetVerdict(budget, label, passed=True, skipped=True, measured=measured,
                                 reason="no BF16 baseline measured in this session to compare with")
        baseline = Spread.of(base)
        value = _ratio(measured.median, baseline.median)
    ok = (budget.min is None or value >= budget.min) and (budget.max is None or value <= budget.max)
    return BudgetVerdict(budget, label, passed=ok, skipped=False, value=value, measured=measured,
                         baseline=baseline)

"""Read the kernel vLLM selected for each quantized linear method out of its server log.

Examples of what vLLM logs:
  Selected CutlassFP8ScaledMMLinearKernel for ModelOptFp8LinearMethod
  Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8
  Using MarlinNvFp4LinearKernel for NVFP4 GEMM
A BF16 model logs no linear kernel; its path is reported as "unquantized (dense GEMM)".
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_PATTERNS = (
    re.compile(r"Selected (?P<kernel>\w+) for (?P<method>\w+)"),
    re.compile(r"Using (?P<kernel>\w+Kernel\w*) for (?P<method>[\w ]+?)(?: GEMM)?\s*$"),
    re.compile(r"Using (?P<kernel>\w+) (?:backend|kernel) for (?P<method>[\w ]+)"),
)
_ATTENTION = re.compile(r"Using (?P<backend>\w+) (?:attention )?backend")
UNQUANTIZED = "unquantized (dense GEMM)"


def parse_kernels(log_text: str) -> dict[str, str]:
    """Map of linear method -> kernel, in the order first seen. Later duplicates (one per worker) are ignored."""
    found: dict[str, str] = {}
    for line in log_text.splitlines():
        for pat in _PATTERNS:
            m = pat.search(line)
            if m and "attention" not in line.lower():
                found.setdefault(m.group("method").strip(), m.group("kernel"))
                break
    return found


def kernel_path(log_text: str) -> str:
    """One line naming the linear kernels, suitable for a table cell and a cache key."""
    kernels = parse_kernels(log_text)
    if not kernels:
        return UNQUANTIZED
    return "; ".join(f"{k} ({m})" for m, k in kernels.items())


def attention_backend(log_text: str) -> str | None:
    m = _ATTENTION.search(log_text)
    return m.group("backend") if m else None


EMULATED = "emulated"
REGEX_PREFIX = "re:"


class KernelExpectation(BaseModel):
    """What a variant may run on one hardware class (a value of `expected_kernels`).

    Written in a matrix as one of three shapes (`expectation` turns each into this model):
      - a string: a kernel name matched as a case-insensitive substring of the logged kernel path
        (`CutlassFP8ScaledMMLinearKernel`, `Marlin`), `re:<pattern>` for a regular expression searched in it
        (`re:FlashInfer|Cutlass`), or `emulated`;
      - a list of such strings: any one of them will do;
      - a mapping `{any: [...], forbid: [...]}`: `any` as the list, `forbid` names that must NOT appear
        (`{any: [FlashInferFP8, CutlassFP8], forbid: [Marlin]}`, or `{forbid: [Marlin]}` alone).
    `derived` marks an expectation supplied by engines/kernel_table.py (vLLM's selection code read, not observed).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    any: list[str] = Field(default_factory=list, description="acceptable kernels: substring, re:<pattern>, emulated")
    forbid: list[str] = Field(default_factory=list, description="kernels that must not run: substring or re:<pattern>")
    derived: bool = Field(False, description="supplied by quantgate's kernel table, not written in the matrix")
    source: str | None = Field(None, description="for a derived expectation: the vLLM code it was read from")

    @field_validator("any", "forbid")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.strip():
                raise ValueError("an empty kernel name matches everything")
            if name.startswith(REGEX_PREFIX):
                try:
                    re.compile(name[len(REGEX_PREFIX):])
                except re.error as e:
                    raise ValueError(f"{name!r} is not a valid regular expression ({e})") from None
        return value

    @model_validator(mode="after")
    def _meaningful(self) -> KernelExpectation:
        if not self.any and not self.forbid:
            raise ValueError("give `any` (acceptable kernels), `forbid` (kernels that must not run), or both")
        if EMULATED in self.any and (len(self.any) > 1 or self.forbid):
            raise ValueError("`emulated` stands alone: a variant is either emulated or run on vLLM kernels")
        if EMULATED in self.forbid:
            raise ValueError("`emulated` cannot be forbidden; list the kernels that must run in `any` instead")
        return self

    @property
    def emulated(self) -> bool:
        return self.any == [EMULATED]

    def describe(self) -> str:
        """One line for messages: `'A'`, `one of ['A', 'B']`, plus the forbidden names."""
        text = repr(self.any[0]) if len(self.any) == 1 else f"one of {self.any}" if self.any else "any kernel"
        return text + (f" (forbidding {self.forbid})" if self.forbid else "")


def expectation(value: Any, key: str = "expected_kernels") -> KernelExpectation:
    """The KernelExpectation for one `expected_kernels` value (string, list of strings, or {any, forbid} mapping);
    ValueError naming `key` and the accepted shapes for anything else."""
    if isinstance(value, KernelExpectation):
        return value
    shapes = ("a kernel name (substring), 're:<pattern>', 'emulated', a list of those, or "
              "{any: [names], forbid: [names]}")
    if isinstance(value, str):
        data: Any = {"any": [value]}
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        data = {"any": value}
    elif isinstance(value, dict):
        data = value
    else:
        raise ValueError(f"{key}: {value!r} is not a kernel expectation; use {shapes}")
    try:
        return KernelExpectation.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{key}: {value!r}: {problems}; use {shapes}") from None


def _matches(name: str, observed: str) -> bool:
    if name.startswith(REGEX_PREFIX):
        return re.search(name[len(REGEX_PREFIX):], observed, flags=re.IGNORECASE) is not None
    return name.lower() in observed.lower()


def kernel_mismatch(expected: KernelExpectation | str | list[str] | dict | None, observed: str,
                    engine: str) -> str | None:
    """Why what ran is not what the variant declares for this hardware; None when it is, or nothing is declared.

    `expected` is any `expected_kernels` shape (see KernelExpectation); `observed` the kernel path
    (`kernel_path`); `engine` how the variant actually ran ("vllm" or "emulated"). A forbidden kernel that
    appears in the path is a failure naming it, as is a path that matches none of `any`.
    """
    if expected is None or expected == "" or expected == []:
        return None
    exp = expectation(expected)
    label = " [expectation derived from vLLM's kernel-selection code, not observed]" if exp.derived else ""
    if exp.emulated:
        return None if engine == EMULATED else f"expected emulation, but vLLM ran {observed!r}"
    if engine == EMULATED:
        return f"expected kernel {exp.describe()}, but the variant was emulated{label}" if exp.any else None
    forbidden = [name for name in exp.forbid if _matches(name, observed)]
    if forbidden:
        return (f"vLLM ran {observed!r}, which matches forbidden kernel {forbidden[0]!r}: a fallback this "
                f"hardware must not take{label}")
    if exp.any and not any(_matches(name, observed) for name in exp.any):
        return f"expected kernel {exp.describe()}, but vLLM ran {observed!r}: a silent fallback{label}"
    return None

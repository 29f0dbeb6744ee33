"""Read the kernel vLLM selected for each quantized linear method out of its server log.

Examples of what vLLM logs:
  Selected CutlassFP8ScaledMMLinearKernel for ModelOptFp8LinearMethod
  Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8
  Using MarlinNvFp4LinearKernel for NVFP4 GEMM
A BF16 model logs no linear kernel; its path is reported as "unquantized (dense GEMM)".
"""

from __future__ import annotations

import re

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


def kernel_mismatch(expected: str | None, observed: str, engine: str) -> str | None:
    """Why what ran is not what the variant declares for this hardware; None when it is, or nothing is declared.

    `expected` is a kernel name (matched as a substring of the logged path) or "emulated"; `engine` is how
    the variant actually ran ("vllm" or "emulated").
    """
    if not expected:
        return None
    if expected == "emulated":
        return None if engine == "emulated" else f"expected emulation, but vLLM ran {observed!r}"
    if engine == "emulated":
        return f"expected kernel {expected!r}, but the variant was emulated"
    if expected.lower() in observed.lower():
        return None
    return f"expected kernel {expected!r}, but vLLM ran {observed!r}: a silent fallback"

"""Kernel-path parsing from real vLLM log lines (copied from logs seen on CPU and on an H100)."""

from quantgate.engines.kernels import UNQUANTIZED, kernel_mismatch, kernel_path, parse_kernels

H100_FP8 = (
    "(EngineCore pid=1) INFO 11-22 [fp8.py:120] Selected CutlassFP8ScaledMMLinearKernel for ModelOptFp8LinearMethod"
)
H100_NVFP4 = "(EngineCore pid=1) INFO 11-22 [nvfp4.py:88] Using MarlinNvFp4LinearKernel for NVFP4 GEMM"
CPU_INT8 = (
    "(Worker pid=9) INFO [int8.py:50] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"
)


def test_parse_each_kind():
    assert parse_kernels(H100_FP8) == {"ModelOptFp8LinearMethod": "CutlassFP8ScaledMMLinearKernel"}
    assert parse_kernels(H100_NVFP4) == {"NVFP4": "MarlinNvFp4LinearKernel"}
    assert parse_kernels(CPU_INT8) == {"CompressedTensorsW8A8Int8": "CPUInt8ScaledMMLinearKernel"}


def test_duplicates_from_workers_collapse_and_bf16_is_unquantized():
    assert (
        kernel_path("\n".join([CPU_INT8, CPU_INT8]))
        == "CPUInt8ScaledMMLinearKernel (CompressedTensorsW8A8Int8)"
    )
    assert kernel_path("INFO Starting vLLM server\nINFO Using FLASH_ATTN backend") == UNQUANTIZED


def test_expected_kernel_detects_silent_fallback_and_unexpected_emulation():
    observed = kernel_path(H100_NVFP4)
    assert kernel_mismatch("MarlinNvFp4", observed, "vllm") is None
    msg = kernel_mismatch("CutlassNvFp4", observed, "vllm")
    assert msg and "silent fallback" in msg and "MarlinNvFp4LinearKernel" in msg
    assert kernel_mismatch(None, observed, "vllm") is None
    assert kernel_mismatch("emulated", UNQUANTIZED, "emulated") is None
    assert "expected emulation" in kernel_mismatch("emulated", observed, "vllm")
    assert "was emulated" in kernel_mismatch("MarlinNvFp4", UNQUANTIZED, "emulated")

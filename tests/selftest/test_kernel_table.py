"""The kernel table derived from vLLM's selection code, kernel expectations of every shape, and missing kernels."""

import importlib.util
import re
import zipfile
from pathlib import Path

import pytest

from quantgate.checkpoints.identity import CheckpointIdentity, checkpoint_support
from quantgate.engines import kernel_table
from quantgate.engines.hardware import Hardware, missing_kernel
from quantgate.engines.kernel_table import derived_expectation, lookup, mode_of, sm_class
from quantgate.engines.kernels import KernelExpectation, expectation, kernel_mismatch
from quantgate.errors import MatrixError
from quantgate.matrix import Variant, load_matrix
from quantgate.runner import variant_support

B200 = Hardware("sm100", "B200", 1)
H100 = Hardware("sm90", "H100", 1)
W8A8 = {"scheme": "W8A8", "smoothquant": 0.8}
FLASHINFER_FP8 = "FlashInferFP8ScaledMMLinearKernel (ModelOptFp8LinearMethod)"
CUTLASS_FP8 = "CutlassFP8ScaledMMLinearKernel (ModelOptFp8LinearMethod)"
MARLIN_NVFP4 = "MarlinNvFp4LinearKernel (NVFP4)"


# --- the table ----------------------------------------------------------------------------------------------

def test_sm_classes_follow_vllms_capability_families():
    assert [sm_class(h) for h in ("sm80", "sm86", "sm89", "sm90", "sm100", "sm103", "sm120", "sm121")] == [
        80, 80, 89, 90, 100, 100, 120, 120]
    assert sm_class("cpu") is None and sm_class("sm75") is None and sm_class("sm110") is None


def test_modes_from_recipes_and_from_checkpoint_configs():
    assert mode_of("fp8", "llmcompressor", {"scheme": "FP8_DYNAMIC"}) == "W8A8-channel"
    assert mode_of("fp8", "llmcompressor", {"scheme": "FP8"}) == "W8A8-tensor"
    assert mode_of("fp8", "llmcompressor", {"scheme": "FP8-W8A8", "strategy": "channel"}) == "W8A8-channel"
    assert mode_of("nvfp4", "llmcompressor", {"scheme": "NVFP4A16"}) == "W4A16"
    assert mode_of("mxfp4", "llmcompressor", {"scheme": "FP4-W4A4"}) == "W4A4"
    assert mode_of("nvfp4", "modelopt", {"format": "nvfp4"}) == "W4A4"
    assert mode_of("nvfp4", "modelopt", {"quant_algo": "W4A16_NVFP4"}) == "W4A16"
    assert mode_of("fp8", "llmcompressor", {"scheme": "FP8_BLOCK"}) is None
    assert mode_of("bf16", "none", {}) == "dense"


def test_fp8_on_blackwell_prefers_flashinfer_for_per_tensor_scales_and_cutlass_otherwise():
    row = lookup("fp8", "modelopt", {"format": "fp8"}, "sm100", "0.31")
    assert row.kernels[0] == "FlashInferFP8ScaledMMLinearKernel" and "CutlassFP8ScaledMMLinearKernel" in row.kernels
    assert "Marlin" in row.forbid
    # FP8_DYNAMIC: per-channel weights, per-token activations: FlashInfer's can_implement refuses them
    assert lookup("fp8", "llmcompressor", {"scheme": "FP8_DYNAMIC"}, "sm100").kernels == (
        "CutlassFP8ScaledMMLinearKernel",)
    assert lookup("fp8", "modelopt", {"format": "fp8"}, "sm90").kernels == ("CutlassFP8ScaledMMLinearKernel",)


def test_nvfp4_runs_w4a4_on_blackwell_and_marlin_w4a16_on_hopper():
    b = lookup("nvfp4", "modelopt", {"format": "nvfp4"}, "sm100")
    assert all("NvFp4" in k and "Marlin" not in k for k in b.kernels) and "Marlin" in b.forbid
    assert lookup("nvfp4", "modelopt", {"format": "nvfp4"}, "sm90").kernels == ("MarlinNvFp4LinearKernel",)
    # a weight-only NVFP4 checkpoint: Marlin in 0.26; FlashInfer CuTe-DSL W4A16 first in 0.31
    assert lookup("nvfp4", "llmcompressor", {"scheme": "NVFP4A16"}, "sm100", "0.26").kernels == (
        "MarlinNvFp4LinearKernel",)
    assert lookup("nvfp4", "llmcompressor", {"scheme": "NVFP4A16"}, "sm100", "0.31").kernels[0] == (
        "FlashInferCuteDslNvFp4W4A16LinearKernel")


def test_version_selection_uses_the_newest_table_version_not_newer():
    assert kernel_table._table_version("0.26.0") == "0.26"
    assert kernel_table._table_version("0.28") == "0.26"
    assert kernel_table._table_version("0.33.1") == "0.31"
    assert kernel_table._table_version("0.20") == "0.26"
    # modelopt FP8 on Ampere: 0.26 refuses it (min capability 89), 0.31 runs weight-only Marlin FP8
    assert "get_min_capability() is 89" in lookup("fp8", "modelopt", {"format": "fp8"}, "sm80", "0.26").missing
    assert lookup("fp8", "modelopt", {"format": "fp8"}, "sm80", "0.31").kernels == ("MarlinFP8ScaledMMLinearKernel",)


def test_every_row_is_either_kernels_or_a_reason_with_a_source():
    for key, by_sm in kernel_table.TABLE.items():
        for sm, rows in by_sm.items():
            assert sm in kernel_table.SM_CLASSES, (key, sm)
            assert rows, (key, sm)
            for row in rows:
                assert bool(row.kernels) != bool(row.missing), (key, sm, row)
                assert row.source and set(row.versions) <= set(kernel_table.VLLM_VERSIONS), (key, sm, row)
            # each table version is answered by exactly one row
            for v in kernel_table.VLLM_VERSIONS:
                assert sum(v in r.versions for r in rows) == 1, (key, sm, v)


# --- missing kernels ----------------------------------------------------------------------------------------

def test_int8_w8a8_has_no_kernel_on_blackwell_and_is_refused_with_vllms_reason():
    assert missing_kernel("int8", "llmcompressor", W8A8, H100) is None
    reason = missing_kernel("int8", "llmcompressor", W8A8, B200)
    assert "Int8 not supported on SM100" in reason and reason.startswith("sm100")
    assert "Int8 not supported on SM120" in missing_kernel("int8", "llmcompressor", W8A8, Hardware("sm120", "x", 1))
    s = variant_support(Variant.model_validate({"name": "v", "format": "int8", "builder": "llmcompressor",
                                                "recipe": W8A8}), B200)
    assert s.engine is None and "Int8 not supported on SM100" in s.reason and "no emulation" in s.reason


def test_modelopt_exports_vllm_does_not_load_are_emulated_or_refused_on_every_gpu():
    mx = Variant.model_validate({"name": "v", "format": "mxfp4", "builder": "modelopt", "recipe": {"format": "mxfp4"}})
    for hw in (H100, B200):
        assert "ModelOpt currently only supports" in missing_kernel("mxfp4", "modelopt", {"format": "mxfp4"}, hw)
        s = variant_support(mx, hw)
        assert s.engine == "emulated" and "quant_algo is MXFP4" in s.reason
    assert "NVFP4_AWQ" in missing_kernel("nvfp4", "modelopt", {"format": "nvfp4_awq"}, B200)
    assert missing_kernel("mxfp8", "modelopt", {"format": "mxfp8"}, B200) is None


def test_prebuilt_checkpoints_get_the_same_rule_from_their_own_config():
    int8 = CheckpointIdentity("compressed-tensors", "int8", "W8A8", "int-quantized", 8, "channel")
    assert checkpoint_support(int8, H100)[0] == "vllm"
    engine, reason = checkpoint_support(int8, B200)
    assert engine is None and "Int8 not supported on SM100" in reason
    w4a16 = CheckpointIdentity("modelopt", "nvfp4", "W4A16_NVFP4")
    assert w4a16.recipe == {"quant_algo": "W4A16_NVFP4"}
    assert lookup(w4a16.format, w4a16.builder, w4a16.recipe, "sm100", "0.26").kernels == ("MarlinNvFp4LinearKernel",)


def test_cpu_rules_are_unchanged():
    avx512 = Hardware("cpu", "Xeon", 2, cpu_isa="avx512")
    assert missing_kernel("int8", "llmcompressor", W8A8, avx512) is None
    assert "compressed-tensors checkpoints only" in missing_kernel("fp8", "modelopt", {"format": "fp8"}, avx512)
    assert "no nvfp4 kernel" in missing_kernel("nvfp4", "llmcompressor", {"scheme": "NVFP4"}, avx512)


# --- expectation shapes -------------------------------------------------------------------------------------

def test_the_three_shapes_and_forbid():
    assert kernel_mismatch("CutlassFP8", CUTLASS_FP8, "vllm") is None
    assert "silent fallback" in kernel_mismatch("FlashInferFP8", CUTLASS_FP8, "vllm")
    assert kernel_mismatch("re:FlashInfer|Cutlass", FLASHINFER_FP8, "vllm") is None
    assert kernel_mismatch("re:^Cutlass", FLASHINFER_FP8, "vllm") is not None
    assert kernel_mismatch(["FlashInferFP8", "CutlassFP8"], CUTLASS_FP8, "vllm") is None
    msg = kernel_mismatch(["FlashInferFP8", "CutlassFP8"], MARLIN_NVFP4, "vllm")
    assert "one of ['FlashInferFP8', 'CutlassFP8']" in msg
    spec = {"any": ["FlashInferCutlassNvFp4", "CutlassNvFp4"], "forbid": ["Marlin"]}
    msg = kernel_mismatch(spec, MARLIN_NVFP4, "vllm")
    assert "forbidden kernel 'Marlin'" in msg and "MarlinNvFp4LinearKernel" in msg
    assert kernel_mismatch({"forbid": ["Marlin"]}, "FlashInferCutlassNvFp4LinearKernel (NVFP4)", "vllm") is None
    assert "forbidden" in kernel_mismatch({"forbid": ["re:marlin"]}, MARLIN_NVFP4, "vllm")
    # forbid says nothing about an emulated run; `any` does
    assert kernel_mismatch({"forbid": ["Marlin"]}, "unquantized (dense GEMM)", "emulated") is None
    assert "was emulated" in kernel_mismatch(["CutlassFP8"], "unquantized (dense GEMM)", "emulated")


def test_a_derived_expectation_says_so_when_it_fails():
    exp = derived_expectation("nvfp4", "modelopt", {"format": "nvfp4"}, "sm100")
    assert exp.derived and exp.source
    msg = kernel_mismatch(exp, MARLIN_NVFP4, "vllm")
    assert "forbidden kernel 'Marlin'" in msg and "derived from vLLM's kernel-selection code" in msg
    assert kernel_mismatch(exp, "FlashInferCuteDslNvFp4LinearKernel (NVFP4)", "vllm") is None
    # vLLM cannot serve it, or the table has no row: nothing derived
    assert derived_expectation("int8", "llmcompressor", W8A8, "sm100") is None
    assert derived_expectation("int8", "llmcompressor", W8A8, "cpu") is None


@pytest.mark.parametrize("value, cause", [
    (5, "is not a kernel expectation"),
    ({"any": []}, "give `any`"),
    ({"anyof": ["X"]}, "Extra inputs"),
    ("re:([", "not a valid regular expression"),
    (["emulated", "Marlin"], "`emulated` stands alone"),
    ({"forbid": ["emulated"]}, "cannot be forbidden"),
    ([""], "empty kernel name"),
])
def test_bad_shapes_name_the_key(value, cause):
    with pytest.raises(ValueError, match=re.escape(cause)) as e:
        expectation(value, "expected_kernels.sm100")
    assert "expected_kernels.sm100" in str(e.value)


def test_matrix_accepts_every_shape_and_names_the_key_of_a_bad_one(tmp_path):
    base = ("models:\n  - name: m\n    source: {kind: local, path: %s}\n    variants:\n"
            "      - {name: bf16, format: bf16}\n"
            "      - {name: v, format: fp8, builder: modelopt, recipe: {format: fp8}, expected_kernels: %s}\n"
            "tasks:\n  - {name: hellaswag, metric: acc_norm}\n")
    good = ('{cpu: emulated, sm90: CutlassFP8, sm89: "re:Cutlass|Marlin", sm100: {any: [FlashInferFP8, CutlassFP8], '
            'forbid: [Marlin]}, sm120: [FlashInferFP8, CutlassFP8]}')
    path = tmp_path / "m.yaml"
    path.write_text(base % (tmp_path, good))
    v = load_matrix(path).models[0].variants[1]
    assert B200.lookup(v.expected_kernels) == KernelExpectation(any=["FlashInferFP8", "CutlassFP8"], forbid=["Marlin"])
    assert v.expected_kernels["cpu"].emulated
    path.write_text(base % (tmp_path, "{sm100: {any: [X], forbidden: [Marlin]}}"))
    with pytest.raises(MatrixError, match=r"expected_kernels\.sm100"):
        load_matrix(path)


# --- the table against the vLLM code it cites ---------------------------------------------------------------

def _class_names(sources) -> set[str]:
    return {m.group(1) for text in sources for m in re.finditer(r"^class (\w+)\b", text, flags=re.MULTILINE)}


def test_every_cited_kernel_class_exists_in_the_installed_vllm():
    """An upgrade that renames or drops a kernel fails here, not in a user's run."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed here")
    root = Path(next(iter(spec.submodule_search_locations))) / "model_executor"
    names = _class_names(p.read_text(errors="replace") for p in root.rglob("*.py"))
    version = kernel_table.installed_vllm_version()
    cited = kernel_table.cited_kernel_names(kernel_table._table_version(version))
    assert cited and not cited - names, f"vLLM {version} has no class {sorted(cited - names)}"


def test_every_kernel_cited_for_vllm_026_exists_in_the_gpu_bundle_wheel():
    wheels = sorted((Path.home() / ".cache" / "qg-devbundle").glob("vllm-0.26.0-*.whl"))
    if not wheels:
        pytest.skip("the GPU bundle's vLLM 0.26 wheel is not on this machine")
    with zipfile.ZipFile(wheels[0]) as z:
        names = _class_names(z.read(n).decode(errors="replace") for n in z.namelist()
                             if n.startswith("vllm/model_executor/") and n.endswith(".py"))
    cited = kernel_table.cited_kernel_names("0.26")
    assert cited and not cited - names, f"vLLM 0.26 has no class {sorted(cited - names)}"


def test_docs_print_the_current_table():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "kernels.md").read_text()
    assert kernel_table.table_markdown() in doc, "docs/kernels.md is stale: paste kernel_table.table_markdown()"


@pytest.mark.parametrize("fixture", sorted((Path(__file__).resolve().parents[2] / "fixtures").glob("*.yaml")))
def test_fixture_expectations_accept_what_the_table_says_vllm_selects(fixture):
    """A declared GPU expectation that refuses vLLM's own first choice (or, for 0.26, its fallback order) would
    fail on a machine that runs it correctly."""
    for model in load_matrix(fixture).models:
        for v in model.variants:
            for hw, exp in v.expected_kernels.items():
                if not hw.startswith("sm") or exp.emulated or v.emulate:
                    continue
                for version in kernel_table.VLLM_VERSIONS:
                    row = lookup(v.format, v.builder, v.recipe_spec, hw, version)
                    if row is None or row.missing:
                        continue
                    for k in row.kernels:
                        if not any(f.lower() in k.lower() for f in row.forbid):
                            assert kernel_mismatch(exp, f"{k} (method)", "vllm") is None, (
                                fixture.name, v.name, hw, version, k)


def test_a_compressed_tensors_fp8_checkpoint_is_keyed_by_its_weight_strategy():
    tensor = CheckpointIdentity("compressed-tensors", "fp8", "FP8-W8A8", "float-quantized", 8, "tensor")
    channel = CheckpointIdentity("compressed-tensors", "fp8", "FP8-W8A8", "float-quantized", 8, "channel")
    assert lookup("fp8", tensor.builder, tensor.recipe, "sm100").kernels[0] == "FlashInferFP8ScaledMMLinearKernel"
    assert lookup("fp8", channel.builder, channel.recipe, "sm100").kernels == ("CutlassFP8ScaledMMLinearKernel",)

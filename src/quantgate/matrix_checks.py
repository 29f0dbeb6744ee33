"""What `quantgate check` verifies beyond the schema, without building, serving or downloading anything.

The schema (quantgate.matrix) already refuses unknown keys, unknown lm-eval task names, unknown modelopt
formats and unknown compressed-tensors schemes. Here, against lm-eval's task configs, the data folder and the
checkpoints already on this machine:

errors   a metric lm-eval does not produce for the task; a code-executing task without allow_code_execution;
         max_gen_toks >= max_model_len; a local source path that does not exist; a group size that does not
         divide the baseline's hidden_size / intermediate_size (config.json, when the baseline is local);
         a log-probability task sent to a chat endpoint.
warnings what could not be checked here (the baseline's config.json is not local; a Python task declares no
         metrics; a task whose Python helpers cannot be imported in this environment, e.g. a missing extra);
         a variant whose generation_config.json sampling defaults differ from the baseline's; a task_floors
         entry naming no task of the matrix.
notes    which tasks read offline data here and which need the Hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.matrix import GgufWheelSource, HubSource, LocalSource, Matrix, Model, Thresholds, Variant

# Fields of generation_config.json that change sampling (transformers GenerationConfig names).
SAMPLING_CONFIG_FIELDS = (
    "do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "max_new_tokens",
)

_BASELINE = Variant(name="bf16", format="bf16")


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_matrix(
    matrix: Matrix, path: Path, data_dir: Path | None, thresholds: Thresholds | None = None
) -> CheckReport:
    """Every check above; `path` names the file in messages. Needs lm-eval's task index (built once)."""
    report = CheckReport()
    _check_tasks(matrix, path, data_dir, report)
    for model in matrix.models:
        _check_model(matrix, model, path, report)
    if thresholds is not None:
        keys = {t.key for t in matrix.tasks} | {t.name for t in matrix.tasks}
        for task in thresholds.retention.task_floors:
            if task not in keys:
                # A thresholds file is shared by matrices, so a floor for another matrix's task is no error.
                report.warnings.append(
                    f"thresholds: retention.task_floors.{task}: no task of {path.name} has that id or name "
                    f"(unused here); its tasks: {sorted(t.key for t in matrix.tasks)}"
                )
    return report


def _check_tasks(matrix: Matrix, path: Path, data_dir: Path | None, report: CheckReport) -> None:
    from quantgate.evaluation.lmeval_runner import has_offline_data, task_load_error
    from quantgate.evaluation.task_registry import declared_metrics, leaves, output_types

    offline, hub = [], []
    for i, task in enumerate(matrix.tasks):
        where = f"{path}: tasks.{i} ({task.key})"
        declared = declared_metrics(task.name)
        if not declared:
            report.warnings.append(f"{where}: lm-eval's config of {task.name} declares no metrics (a Python task); "
                                   "the metric is checked when it runs")
        for key in sorted(task.lm_eval_metric_keys()):
            if declared and key not in declared:
                report.errors.append(
                    f"{where}: metric {key!r} is not produced by lm-eval's {task.name}; allowed: {sorted(declared)}"
                )
        unsafe = [leaf.name for leaf in leaves(task.name) if leaf.config.get("unsafe_code")]
        if unsafe and not task.allow_code_execution:
            report.errors.append(
                f"{where}: {task.name} executes model-written code ({unsafe[0]} has unsafe_code: true); "
                "set allow_code_execution: true on the task to run it (in a sandbox)"
            )
        (offline if has_offline_data(task.name, data_dir) else hub).append(task.key)
        problem = task_load_error(task.name)
        if problem:  # the environment, not the matrix: where the suite runs may have what this machine lacks
            report.warnings.append(f"{where}: lm-eval cannot load {task.name} in this environment ({problem})")
        scored_by_logprobs = output_types(task.name) - {"generate_until"}
        for model in matrix.models:
            if matrix.chat(model, task).is_chat and scored_by_logprobs:
                report.errors.append(
                    f"{where}: {task.name} is scored from log-probabilities ({', '.join(sorted(scored_by_logprobs))}), "
                    f"which lm-eval's local-chat-completions cannot request; model {model.name} sends it to the "
                    "chat endpoint: give the task `chat: {endpoint: completions}` (with apply_chat_template: true "
                    "to keep the chat format)"
                )
        for model in matrix.models:
            toks = matrix.sampling(model, task).get("max_gen_toks")
            if toks is not None and toks >= model.max_model_len:
                report.errors.append(
                    f"{where}: max_gen_toks {toks} >= max_model_len {model.max_model_len} of model {model.name}; "
                    "the prompt would have no room"
                )
    report.notes.append(f"offline data ({data_dir}): {', '.join(offline) or 'none'}")
    if hub:
        report.notes.append(f"need the Hugging Face Hub (no offline data here): {', '.join(hub)}")


def _check_model(matrix: Matrix, model: Model, path: Path, report: CheckReport) -> None:
    sources = [(f"models.{model.name}.source", model.source)]
    sources += [(f"models.{model.name}.variants.{v.name}.source", v.source) for v in model.variants if v.source]
    for where, src in sources:
        if isinstance(src, LocalSource) and not Path(src.path).expanduser().is_dir():
            report.errors.append(f"{path}: {where}.path: {src.path!r} does not exist (a checkpoint folder is needed)")
    base_dir = local_checkpoint_dir(model.source)
    base_cfg = _read_json(base_dir / "config.json") if base_dir else None
    for v in model.variants:
        gs = getattr(v.recipe, "group_size", None) or getattr(v.recipe, "awq_block_size", None)
        where = f"{path}: models.{model.name}.variants.{v.name}.recipe"
        if gs and base_cfg is None:
            report.warnings.append(f"{where}.group_size {gs}: not checked against the model's layer widths "
                                   "(the baseline's config.json is not on this machine)")
        elif gs and base_cfg is not None:
            from quantgate.recipes import divides_layers

            bad = divides_layers(int(gs), base_cfg)
            if bad:
                report.errors.append(f"{where}.group_size: {gs} does not divide {bad} of {model.name} "
                                     f"(config.json); choose a group size that divides every layer width")
    if base_dir is None:
        return
    base_gen = _sampling_defaults(base_dir)
    for v in model.variants:
        vdir = local_checkpoint_dir(v.source) if v.source is not None else None
        if vdir is None:
            continue
        gen = _sampling_defaults(vdir)
        diff = {k: (base_gen.get(k), gen.get(k)) for k in set(base_gen) | set(gen) if base_gen.get(k) != gen.get(k)}
        if diff:
            report.warnings.append(
                f"{path}: models.{model.name}.variants.{v.name}: generation_config.json differs from the baseline's "
                f"(baseline, variant): {dict(sorted(diff.items()))}; servers run with --generation-config vllm, so "
                "these defaults are not applied; set sampling in the matrix if the model needs them"
            )


def local_checkpoint_dir(src: Any) -> Path | None:
    """The folder of a checkpoint already on this machine: a local path, a Hub snapshot in the HF cache, or a
    converted GGUF baseline in quantgate's cache (never built or downloaded here)."""
    if isinstance(src, GgufWheelSource):
        from quantgate.checkpoints.cache import only_cached
        from quantgate.checkpoints.obtain import baseline_checkpoint
        from quantgate.errors import QuantgateError

        try:
            with only_cached():
                return baseline_checkpoint(Model(name="check", source=src, variants=[_BASELINE])).path
        except QuantgateError:
            return None
    if isinstance(src, LocalSource):
        p = Path(src.path).expanduser()
        return p if p.is_dir() else None
    if isinstance(src, HubSource):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        hit = try_to_load_from_cache(src.id, "config.json", revision=src.revision)
        return Path(hit).parent if isinstance(hit, str) else None
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sampling_defaults(ckpt: Path) -> dict[str, Any]:
    cfg = _read_json(ckpt / "generation_config.json") or {}
    return {k: cfg[k] for k in SAMPLING_CONFIG_FIELDS if k in cfg}

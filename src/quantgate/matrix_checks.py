"""What `quantgate check` verifies beyond the schema, without building, serving or downloading anything.

The schema (quantgate.matrix) already refuses unknown keys, unknown lm-eval task names, unknown modelopt
formats and unknown compressed-tensors schemes. Here, against lm-eval's task configs, the data folder and the
checkpoints already on this machine:

errors   a metric lm-eval does not produce for the task; a code-executing task without allow_code_execution;
         max_gen_toks >= max_model_len; a local source path that does not exist (naming the script that makes it,
         for a checkpoint of the project's own examples) or has no config.json; a
         prebuilt variant's own quantization config (local, or in the HF cache) with an unknown quant_method,
         format or quant_algo, or contradicting the variant's `format`; a group size that does not
         divide the baseline's hidden_size / intermediate_size (config.json, when the baseline is local);
         a log-probability task sent to a chat endpoint; distribution.tokens > a model's max_model_len;
         thresholds/distribution.yaml malformed, or without limits for a variant's format (when the matrix has a
         gated distribution section); a BF16 baseline with a later `cadence` than one of its quantized
         variants (at the variant's cadence its retention would have no baseline); a serve_args or
         QUANTGATE_VLLM_ARGS option that the installed vLLM's `vllm serve` parser does not have.
warnings what could not be checked here (a Hub source not in the local Hugging Face cache, with the cached ids
         close to its id; the baseline's config.json is not local; a Python task declares no
         metrics; a task whose Python helpers cannot be imported in this environment, e.g. a missing extra);
         a variant whose generation_config.json sampling defaults differ from the baseline's; a task_floors
         entry naming no task of the matrix; a critical gate of the policy that this matrix cannot produce
         (every variant would be MISSING it, and the run fails); serve_args not checked (vLLM not importable); a
         data-folder file the matrix reads (calibration, distribution documents) that is not in the data folder.
notes    which tasks read offline data here and which need the Hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.cadence import baseline_cadence_errors
from quantgate.config_errors import close_names
from quantgate.errors import MatrixError
from quantgate.matrix import (
    DistributionThresholds,
    GgufWheelSource,
    HubSource,
    LocalSource,
    Matrix,
    Model,
    Thresholds,
    Variant,
    load_distribution_thresholds,
)
from quantgate.policy import Policy

# Fields of generation_config.json that change sampling (transformers GenerationConfig names).
SAMPLING_CONFIG_FIELDS = (
    "do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "max_new_tokens",
)

_BASELINE = Variant(name="bf16", format="bf16")

# Checkpoint folders that a script of the project's own makes, by where the script puts them -> the script and
# its command line: fixtures/cpu-tasks.yaml names one of examples/external-checkpoints/prepare.py's folders by a
# path relative to the checkout, fixtures/gpu-tp2.yaml the model of ci/make_tp2_model.py by its default --out
# (an absolute path). A checkout only; an installed quantgate has no examples/ or ci/, and a user's own matrix
# gets the plain error.
_EXAMPLE_CHECKPOINTS = {
    "external-checkpoints": ("examples/external-checkpoints/prepare.py",
                             "python examples/external-checkpoints/prepare.py"),
    "/tmp/qg-tp2-model": ("ci/make_tp2_model.py", "python ci/make_tp2_model.py --out /tmp/qg-tp2-model"),
}


def _made_by_example(missing: Path) -> str:
    """'; <how to make it>' when `missing` (resolved) lies in a folder that one of the checkout's own scripts
    makes and that script is there; '' otherwise. A relative folder in _EXAMPLE_CHECKPOINTS is under the
    checkout."""
    checkout = Path(__file__).resolve().parents[2]  # src/quantgate/matrix_checks.py in a checkout
    for folder, (script, command) in _EXAMPLE_CHECKPOINTS.items():
        if (checkout / script).is_file() and missing.is_relative_to((checkout / folder).resolve()):
            return f"; the project's {script} makes it: run `{command}` in {checkout}"
    return ""


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
    report.errors += [f"{path}: {e}" for e in baseline_cadence_errors(matrix)]
    _check_tasks(matrix, path, data_dir, report)
    _check_serve_args(matrix, path, report)
    _check_data_files(matrix, path, data_dir, report)
    for model in matrix.models:
        _check_model(matrix, model, path, report)
        dist = matrix.distribution
        if dist is not None and dist.tokens > model.max_model_len:
            report.errors.append(
                f"{path}: distribution.tokens: {dist.tokens} exceeds max_model_len {model.max_model_len} of model "
                f"{model.name}; a chunk must fit the server's context"
            )
    if thresholds is not None:
        keys = {t.key for t in matrix.tasks} | {t.name for t in matrix.tasks}
        for task in thresholds.retention.task_floors:
            if task in keys:
                continue
            # A thresholds file is shared by matrices, so a floor for another matrix's task is no error; one
            # whose name is close to this matrix's tasks is likely a typo, and warned about.
            hint = close_names(task, sorted(keys))
            why = f"unused here; {hint.strip()[1:-1]}" if hint else "unused here"
            line = (f"thresholds: retention.task_floors.{task}: no task of {path.name} has that id or name "
                    f"({why}); its tasks: {sorted(t.key for t in matrix.tasks)}")
            (report.warnings if hint else report.notes).append(line)
    return report


def _check_tasks(matrix: Matrix, path: Path, data_dir: Path | None, report: CheckReport) -> None:
    from quantgate.evaluation.lmeval_runner import has_offline_data, task_load_error
    from quantgate.evaluation.task_registry import declared_metrics, known_names, leaves, output_types, task_manager

    # one TaskManager for every task of the matrix (names lm-eval does not know are reported by the matrix)
    task_manager([t.name for t in matrix.tasks if t.name in known_names()])
    offline, hub = [], []
    for task in matrix.tasks:
        where = f"{path}: tasks.{task.key}"  # by key, as the schema errors name list items (config_errors)
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
        kinds = output_types(task.name)
        scored_by_logprobs = kinds - {"generate_until"}
        for model in matrix.models:
            sampling, repeats = matrix.sampling(model, task), matrix.repeats(model, task)
            if repeats > 1 and "generate_until" not in kinds:
                report.errors.append(
                    f"{where}: repeats {repeats} for model {model.name}, but {task.name} is "
                    "scored from log-probabilities: nothing is sampled, so every repeat would give the same "
                    "scores; drop repeats for this task (set repeats: 1 in its generation block)"
                )
            if repeats > 1 and not sampling.get("temperature"):
                report.errors.append(
                    f"{where}: repeats {repeats} with temperature {sampling.get('temperature')} for model "
                    f"{model.name}: greedy decoding gives one answer {repeats} times; set temperature > 0 where "
                    "repeats is set, or drop repeats"
                )
            if matrix.chat(model, task).is_chat and scored_by_logprobs:
                report.errors.append(
                    f"{where}: {task.name} is scored from log-probabilities ({', '.join(sorted(scored_by_logprobs))}), "
                    f"which lm-eval's local-chat-completions cannot request; model {model.name} sends it to the "
                    "chat endpoint: give the task `chat: {endpoint: completions}` (with apply_chat_template: true "
                    "to keep the chat format)"
                )
            toks = sampling.get("max_gen_toks")
            if toks is not None and toks >= model.max_model_len:
                report.errors.append(
                    f"{where}: max_gen_toks {toks} >= max_model_len {model.max_model_len} of model {model.name}; "
                    "the prompt would have no room"
                )
    report.notes.append(f"offline data ({data_dir}): {', '.join(offline) or 'none'}")
    if hub:
        report.notes.append(f"need the Hugging Face Hub (no offline data here): {', '.join(hub)}")


def _check_data_files(matrix: Matrix, path: Path, data_dir: Path | None, report: CheckReport) -> None:
    """The data-folder files the matrix reads (calibration sets, distribution documents: evaluation.hub_data)
    that are not in `data_dir`: a warning each, since a build or distribution test would stop on it."""
    from quantgate.evaluation.hub_data import file_presence, matrix_needs

    for rel, readers in matrix_needs(matrix).files.items():
        if not file_presence(rel, data_dir).present:
            where = data_dir or "(no data folder: set QUANTGATE_DATA_DIR, or put the offline bundle in shared/data)"
            report.warnings.append(f"{path}: {rel} is not in the data folder {where}; needed by {', '.join(readers)}"
                                   " (`quantgate data` lists every file and dataset the matrix reads)")


def _check_serve_args(matrix: Matrix, path: Path, report: CheckReport) -> None:
    """serve_args (model and variant level) and QUANTGATE_VLLM_ARGS against the options of the installed
    vLLM's own `vllm serve` parser: a misspelt flag otherwise surfaces only when its server starts, after the
    builds. vLLM is imported only when there are serve args to check."""
    from quantgate.engines.serve_flags import flag_name, unknown_flags, vllm_serve_options
    from quantgate.engines.vllm_server import user_engine_args, user_engine_args_error

    places = [(f"{path}: models.{m.name}.serve_args", m.serve_args) for m in matrix.models]
    places += [(f"{path}: models.{m.name}.variants.{v.name}.serve_args", v.serve_args)
               for m in matrix.models for v in m.variants]
    env_error = user_engine_args_error()
    if env_error is not None:
        report.errors.append(env_error)
    else:
        places += [("QUANTGATE_VLLM_ARGS", user_engine_args())]
    places = [(where, args) for where, args in places if args]
    if not places:
        return
    known = vllm_serve_options()
    if known is None:
        report.warnings.append("serve_args: not checked against vLLM's options (vLLM's `vllm serve` parser cannot "
                               "be imported in this environment)")
        return
    longs = sorted(o for o in known if o.startswith("--"))
    for where, args in places:
        for token in unknown_flags(args, known):
            name = flag_name(token) or token
            report.errors.append(f"{where}: {token!r} is not an option of the installed vLLM's `vllm serve`"
                                 f"{close_names(name, longs)}")


def _check_model(matrix: Matrix, model: Model, path: Path, report: CheckReport) -> None:
    sources = [(f"models.{model.name}.source", model.source)]
    sources += [(f"models.{model.name}.variants.{v.name}.source", v.source) for v in model.variants if v.source]
    for where, src in sources:
        if isinstance(src, LocalSource) and not Path(src.path).expanduser().is_dir():
            given = Path(src.path).expanduser()
            resolved = given.resolve()
            relative = ("" if given.is_absolute()
                        else f"; a relative path is read from the working directory: {resolved}")
            report.errors.append(
                f"{path}: {where}.path: {src.path!r} does not exist (a checkpoint folder is needed{relative})"
                f"{_made_by_example(resolved)}")
        elif isinstance(src, LocalSource) and not (Path(src.path).expanduser() / "config.json").is_file():
            report.errors.append(f"{path}: {where}.path: {src.path!r} has no config.json (a Hugging Face checkpoint "
                                 "folder is needed: config.json, *.safetensors and a tokenizer)")
    for v in model.variants:
        _check_checkpoint_config(model, v, path, report)
    base_dir = local_checkpoint_dir(model.source)
    if base_dir is None and isinstance(model.source, HubSource):
        report.warnings.append(f"{path}: models.{model.name}.source: {_not_cached(model.source)}")
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


def _check_checkpoint_config(model: Model, v: Variant, path: Path, report: CheckReport) -> None:
    """A prebuilt variant's own quantization config (checkpoints/identity.py), where the checkpoint is on this
    machine: an unknown quant_method or format is an error, and so is a `format:` that the config contradicts."""
    from quantgate.checkpoints.identity import identify_checkpoint
    from quantgate.errors import BuildError

    if v.source is None:
        return
    vdir = local_checkpoint_dir(v.source)
    where = f"{path}: models.{model.name}.variants.{v.name}"
    if vdir is None or not (vdir / "config.json").is_file():
        if isinstance(v.source, HubSource):
            report.warnings.append(f"{where}.source: {_not_cached(v.source)}; its quantization config is "
                                   "checked once it is downloaded")
        return
    try:
        ident = identify_checkpoint(vdir)
    except BuildError as exc:
        report.errors.append(f"{where}.source: {exc}")
        return
    if ident.format != v.format:
        report.errors.append(
            f"{where}.format: {v.format!r} given, but the checkpoint's own config ({vdir / 'config.json'}) says "
            f"{ident.format!r} ({ident.method or 'unquantized'} {ident.scheme or ''}".rstrip() + "); write format: "
            f"{ident.format}"
        )


def _not_cached(src: HubSource) -> str:
    """Why a Hub source was not checked here: it is not in the local Hugging Face cache (check reads no
    network), with the cached repo ids closest to its id, which may be what a misspelt id meant."""
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    from quantgate.checkpoints.hub import cached_model_ids

    cached = cached_model_ids()
    where = "HF_HUB_OFFLINE=1: the run cannot download it" if HF_HUB_OFFLINE else "the run downloads it"
    state = ("the repo is cached, but not this revision" if src.id in cached else
             f"not in the local Hugging Face cache ({HF_HUB_CACHE}){close_names(src.id, cached)}")
    placeholder = ("; the revision is all zeros, a placeholder: replace it with the repository's real commit "
                   "before a run" if set(src.revision) == {"0"} else "")
    return f"{src.id}@{src.revision}: {state}; the id is not checked against the Hub here ({where}){placeholder}"


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


def distribution_limits_path(thresholds_path: Path) -> Path:
    """thresholds/distribution.yaml: beside the retention thresholds in use (as quantgate.suite.test_distribution)."""
    return Path(thresholds_path).parent / "distribution.yaml"


def check_distribution_limits(
    matrix: Matrix, path: Path, limits_path: Path
) -> tuple[DistributionThresholds | None, list[str]]:
    """The distribution limits a matrix with a gated `distribution:` section needs, and what is wrong with them.

    Returns (limits or None, errors). An error for a malformed file, and for a quantized variant's format that
    the file gives no limits (the run would stop at that variant's first distribution test otherwise). No file,
    or no gated section: (None, []); a critical distribution gate then shows up in `policy_coverage_warnings`.
    """
    dist = matrix.distribution
    if dist is None or not dist.gate or not limits_path.exists():
        return None, []
    try:
        limits = load_distribution_thresholds(limits_path)
    except MatrixError as exc:
        return None, [str(exc)]
    errors = []
    for model in matrix.models:
        for v in model.variants:
            if v.format != "bf16" and v.format not in limits.formats:
                errors.append(
                    f"{limits_path}: formats: no limits for format {v.format!r} (variant {model.name}/{v.name} of "
                    f"{path.name}, which has a gated distribution section); add formats.{v.format}"
                )
    return limits, errors


def policy_coverage_warnings(
    matrix: Matrix, policy: Policy, limits: DistributionThresholds | None, limits_path: Path | None = None
) -> list[str]:
    """Critical gates of `policy` this matrix cannot produce: each would be MISSING for every quantized variant
    (quantgate.policy.missing_gates), which fails the run (exit 1) whatever the other gates say."""
    from quantgate.gates.distribution import GATE_NAMES

    out: list[str] = []
    if all(v.format == "bf16" for m in matrix.models for v in m.variants):
        return out  # baselines only: the policy's gates judge quantized variants, and there is none to miss them
    fails = "every quantized variant will be MISSING it and the run fails (exit 1)"
    dist_gate_names = set(GATE_NAMES.values())
    tasks = {t.key: t for t in matrix.tasks} | {t.name: t for t in matrix.tasks}
    for key in policy.required():
        if key in dist_gate_names:
            dist = matrix.distribution
            if dist is None or not dist.gate:
                what = "no `distribution:` section" if dist is None else "`distribution: {gate: false}`"
                out.append(f"policy: critical {key}: this matrix has {what}, so {fails}; add a gated "
                           "distribution section, or run with a --qg-policy that does not make it critical")
                continue
            if limits is None:
                if limits_path is None or not limits_path.exists():  # a malformed file is check's error instead
                    out.append(f"policy: critical {key}: no distribution limits at {limits_path}, so {fails}")
                continue
            limit_name = next(k for k, v in GATE_NAMES.items() if v == key)
            formats = sorted({v.format for m in matrix.models for v in m.variants if v.format != "bf16"})
            unset = [f for f in formats if f in limits.formats and getattr(limits.formats[f], limit_name) is None]
            if unset:
                out.append(f"policy: critical {key}: {limits_path} sets no {limit_name} for format(s) {unset}, so "
                           "their variants will be MISSING it and the run fails (exit 1)")
            continue
        task_key = key
        for prefix in ("retention[", "regression["):
            if key.startswith(prefix) and key.endswith("]"):
                task_key = key[len(prefix):-1]
        if task_key == "AVG":
            continue
        task = tasks.get(task_key.split(":", 1)[0])
        if task is not None and ":" in task_key and f"{task.key}:{task_key.split(':', 1)[1]}" not in task.gate_keys:
            out.append(f"policy: critical {key}: task {task.key} has no metric gate {task_key!r}, so {fails}; "
                       f"its metric gates: {task.gate_keys}")
        elif task is None:
            out.append(f"policy: critical {key}: this matrix has no task {task_key!r}, so {fails}; its tasks: "
                       f"{sorted(t.key for t in matrix.tasks)}")
        elif key.startswith("regression[") and not task.regression:
            out.append(f"policy: critical {key}: task {task.key} has no regression gate in this matrix "
                       f"(regression: false), so {fails}")
        elif not key.startswith("regression[") and not task.gate:
            out.append(f"policy: critical {key}: task {task.key} is not gated in this matrix (gate: false), so "
                       f"{fails}")
    return out


def matrix_gate_names(matrix: Matrix) -> set[str]:
    """The names of the gates a run of `matrix` judges (as quantgate.suite names them): ``retention[<gate key>]``
    per metric of each gated task and ``retention[AVG]``, ``regression[<task key>]`` per task with
    ``regression: true``, and the distribution gates (``kl``, ...) when the matrix has a gated section."""
    from quantgate.gates.distribution import GATE_NAMES

    names: set[str] = set()
    for task in matrix.tasks:
        if task.gate:
            names.update(f"retention[{key}]" for key in task.gate_keys)
            names.add("retention[AVG]")
        if task.regression:
            names.add(f"regression[{task.key}]")
    if matrix.distribution is not None and matrix.distribution.gate:
        names.update(GATE_NAMES.values())
    return names

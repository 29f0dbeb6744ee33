"""Run one lm-eval task against an OpenAI-compatible endpoint (lm-eval's `local-completions`, or
`local-chat-completions` for chat models).

lm-eval's own entry point (`simple_evaluate`) does the work with lm-eval's own task definitions; quantgate only
chooses the arguments (sampling, request path, context length, where the data is), keeps every per-item
sample, and turns them into per-item outcomes that the paired gates consume. lm-eval's `use_cache` keys on
request text alone and would hand one checkpoint's answers to another, so it is never enabled.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantgate import stopping
from quantgate.errors import EvaluationError
from quantgate.matrix import Chat, Generation, Task
from quantgate.redaction import redact, secret_redacted_from_logs

log = logging.getLogger(__name__)


# lm-eval `local-completions` (TemplateAPI) arguments that change what is asked or how it is scored: the
# tokenizer that counts and splits loglikelihood contexts, whether a BOS token is prepended, whether requests
# go as token ids or text, whether over-long prompts are truncated, and the default generation length.
# Pinned explicitly (at lm-eval 0.4.13's defaults, except the tokenizer backend, which lm-eval would
# auto-detect) and recorded in every result's key, so a change to any of them is a different experiment.
# A chat endpoint renders the template in the server and takes none of them.
MEASURED_CLIENT_ARGS: dict[str, Any] = {
    "tokenizer_backend": "huggingface",  # the served checkpoint's own tokenizer (its sha256 is in the key)
    "add_bos_token": False,
    "tokenized_requests": True,
    "truncate": False,
    "max_gen_toks": 256,
}


def client_settings(
    generation: Generation, *, chat: Chat | None = None, max_length: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """The lm-eval client settings that can change a result, for its key; transport settings are left out.

    `max_length` is the model's max_model_len (lm-eval's context window), `seed` the resolved sampling seed.
    """
    chat = chat or Chat()
    out: dict[str, Any] = {
        "model": "local-chat-completions" if chat.is_chat else "local-completions",
        "max_length": max_length,
        "seed": generation.seed if seed is None else seed,
    }
    if not chat.is_chat:
        out |= MEASURED_CLIENT_ARGS
    return out


def model_args(
    completions_url: str,
    served_name: str,
    tokenizer_dir: Path,
    generation: Generation,
    *,
    chat: Chat | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """lm-eval model_args for the served model: `client_settings` plus where and how fast to send.

    `max_length` is the server's max_model_len: lm-eval otherwise left-truncates prompts to its own default
    window (2048 tokens, lm_eval/models/api_models.py). With a chat endpoint the server renders the chat
    template, so no client-side tokenizer is used. No credential goes here: lm-eval logs these and records
    them in its output (`config.model_args`); the server's API key travels through `server_api_key`.
    `trust_remote_code` runs the tokenizer's own code: only where the matrix opts the model in.
    """
    chat = chat or Chat()
    measured = client_settings(generation, chat=chat, max_length=max_length, seed=seed)
    args: dict[str, Any] = {
        "model": served_name,
        "base_url": chat_url(completions_url) if chat.is_chat else completions_url,
        **{k: v for k, v in measured.items() if k != "model" and v is not None},
        # transport: how requests reach the server, not what is asked
        "num_concurrent": generation.concurrency,
        "batch_size": 1 if chat.is_chat else generation.batch_size,  # chat requests carry one conversation
        "max_retries": 3,
        "timeout": 600,
    }
    if not chat.is_chat:
        args["tokenizer"] = str(tokenizer_dir)
        args["trust_remote_code"] = trust_remote_code
    if chat.reasoning:  # quantgate.evaluation.recording_api: stop strings go to the answer, not the server
        args |= {"reasoning": True, "think_start": chat.think_tags[0], "think_end": chat.think_tags[1]}
    return args


def lm_eval_model(chat: Chat) -> str:
    """The registered lm-eval model that runs the requests: lm-eval's `local-completions` or
    `local-chat-completions` subclassed to record finish_reason, output tokens and reasoning per generation
    (quantgate.evaluation.recording_api). They send what lm-eval's own classes send (but `stop` for a thinking
    model), so result keys name lm-eval's classes (client_settings)."""
    from quantgate.evaluation import recording_api

    return recording_api.CHAT_COMPLETIONS if chat.is_chat else recording_api.COMPLETIONS


@functools.cache
def scoring_code_sha256(reasoning: bool = False, repeats: bool = False) -> str:
    """sha256 of quantgate's code that turns lm-eval samples into per-item outcomes and scores:
    ItemOutcomes, item_outcomes and _answer here, and the tasks' Python (tasks/offline_data.py: the offline
    mirrors and the IFEval checkers' set-up). A change to any of it is a different measurement. With
    `reasoning` (Chat.reasoning) the code that splits reasoning from the answer and applies the stop strings
    (responses.py, recording_api.py) is included too; without it that code changes no answer."""
    h = hashlib.sha256()
    if repeats:  # how k samples per item pool (outcomes_over_repeats); without repeats it changes nothing
        h.update(inspect.getsource(outcomes_over_repeats).encode())
    if reasoning:
        for name in ("responses.py", "recording_api.py"):
            h.update((Path(__file__).parent / name).read_bytes())
    for obj in (ItemOutcomes, item_outcomes, _answer):
        h.update(inspect.getsource(obj).encode())
    for f in sorted((Path(__file__).parent / "tasks").glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def chat_url(completions_url: str) -> str:
    """The chat-completions URL beside a completions URL (…/v1/completions -> …/v1/chat/completions)."""
    base, sep, _ = completions_url.rpartition("/completions")
    if not sep:
        raise EvaluationError(f"{completions_url!r} is not a /completions URL")
    return f"{base}/chat/completions"


def gen_kwargs(sampling: dict[str, Any], chat: Chat | None = None) -> dict[str, Any]:
    """lm-eval gen_kwargs for every generative task from resolved sampling (Matrix.sampling).

    lm-eval applies them to generate_until tasks only and sends every key it does not consume itself to the
    server as a request field (openai_completions.py `_create_payload`: `**gen_kwargs`), so top_p, top_k,
    min_p, presence_penalty and repetition_penalty reach vLLM's SamplingParams, and chat_template_kwargs
    reach vLLM's chat template. `seed` travels as lm-eval's per-request seed (model_args), not here.
    """
    out = {k: v for k, v in sampling.items() if v is not None and k != "seed"}
    if "temperature" in out:
        out["do_sample"] = out["temperature"] > 0
    if chat is not None and chat.is_chat and chat.chat_template_kwargs:
        out["chat_template_kwargs"] = dict(chat.chat_template_kwargs)
    return out


def lm_eval_task_spec(name: str, data_dir: Path | None) -> str | dict[str, Any] | list[dict[str, Any]]:
    """What to hand lm-eval for task `name`: the name itself (lm-eval reads its dataset from the Hub), or, where
    the data folder holds the dataset, lm-eval's own config with the dataset location pointed at the local
    mirror (quantgate.evaluation.tasks.offline_data).

    A group whose leaves all read the mirror becomes the list of its leaves' own configs, each overridden: lm-eval
    0.4.13 cannot take a group as a config dict (TaskManager._load_spec passes the whole dict down as every
    subtask's overrides, so `aggregate_metric_list` and the group's `task` list land in each TaskConfig:
    "TaskConfig.__init__() got an unexpected keyword argument 'aggregate_metric_list'"). run_task then computes the
    group's score from the items (group_aggregate), as lm-eval does for a group that weights by size.
    """
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    from quantgate.evaluation.task_registry import leaves, task_manager
    from quantgate.evaluation.tasks.offline_data import ifeval_checkers, needs_ifeval_checkers, offline_overrides

    entry = task_manager([name]).task_index[name]
    leaf_list = list(leaves(name))
    if any(needs_ifeval_checkers(leaf.config) for leaf in leaf_list):
        ifeval_checkers()  # importing lm-eval's IFEval utils downloads NLTK data unless punkt_tab is in place
    overrides = [offline_overrides(leaf.config, data_dir) for leaf in leaf_list]
    if not overrides or any(o is None for o in overrides) or entry.yaml_path is None or entry.kind == Kind.TAG:
        return name
    if any(o != overrides[0] for o in overrides):  # one override must fit every subtask of a group
        return name
    if entry.kind == Kind.GROUP:
        if any(leaf.yaml_path is None for leaf in leaf_list):  # an inline leaf has no file to read: the Hub
            return name
        return [{**load_yaml(Path(leaf.yaml_path), resolve_func=True), **o} for leaf, o in zip(leaf_list, overrides,
                                                                                              strict=True)]
    return {**load_yaml(entry.yaml_path, resolve_func=True), **overrides[0]}


def group_aggregate(name: str, samples: list[dict[str, Any]], metric_keys: set[str]) -> dict[str, Any]:
    """A group's score per metric from its leaves' items, for a group handed to lm-eval as its leaves
    (lm_eval_task_spec). lm-eval aggregates a group by `aggregate_metric_list`; with `weight_by_size: true` at every
    level (mmlu, mmlu_redux_generative) that is sum(size_i * score_i) / sum(size_i) over the leaves
    (lm_eval/api/metrics.py aggregate_subtask_metrics), i.e. the mean over all items, which is what this returns.
    Raises EvaluationError for a group that averages its subtasks unweighted (not reproduced here).
    """
    from quantgate.evaluation.task_registry import task_manager

    index = task_manager([name]).task_index

    def weighted(group: str) -> bool:
        entry = index.get(group)
        cfg = (entry.cfg or {}) if entry is not None else {}
        aggs = cfg.get("aggregate_metric_list") or []
        aggs = aggs if isinstance(aggs, list) else [aggs]
        ok = all(a.get("weight_by_size", False) for a in aggs)
        subs = [x.get("group") if isinstance(x, dict) else x for x in (cfg.get("task") or [])]
        return ok and all(weighted(sub) for sub in subs if sub in index and index[sub].kind.name == "GROUP")

    if not weighted(name):
        raise EvaluationError(
            f"group {name} aggregates its subtasks without weighting by size; quantgate reproduces only size-weighted "
            "group scores for offline groups (or list its subtasks as tasks)")
    out: dict[str, Any] = {"alias": name}
    for key in sorted(metric_keys):
        out[key] = item_outcomes(samples, key).score()
    return out


def task_load_error(name: str) -> str | None:
    """Why lm-eval's config of `name` cannot be loaded here (its Python helpers fail to import, e.g. a missing
    extra such as lm-eval[math] for minerva_math), or None. Loads each leaf's YAML with its functions resolved,
    as lm-eval does when it builds the task; nothing is downloaded (IFEval's NLTK model is set up first)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from quantgate.evaluation.task_registry import leaves
    from quantgate.evaluation.tasks.offline_data import ifeval_checkers, needs_ifeval_checkers

    seen: set[str] = set()
    for leaf in leaves(name):
        if leaf.yaml_path is None or leaf.yaml_path in seen:
            continue
        seen.add(leaf.yaml_path)
        try:
            if needs_ifeval_checkers(leaf.config):
                ifeval_checkers()
            load_yaml(leaf.yaml_path, resolve_func=True)
        except Exception as exc:  # noqa: BLE001 - reported to the user with the task named
            return f"{leaf.name}: {_load_failure(exc)}"
    return None


# evaluate 0.4's loading.evaluation_module_factory, when a module is neither a local script, nor fetched from
# the Hub, nor in its module cache; it says the same whether the Hub was unreachable or lacks the module.
_EVALUATE_MODULE_NOT_FOUND = re.compile(r"Module '([^']+)' doesn't exist on the Hugging Face Hub either")


def _load_failure(exc: Exception) -> str:
    """What a task's Python helpers lack, from the exception importing them raised.

    Two failures of lm-eval's code tasks are said as what is missing and what to do, since their own messages
    mislead: humaneval's and mbpp's utils.py call ``evaluate.load("code_eval")`` on import, which offline
    raises "Couldn't find a module script at <cwd>/code_eval/code_eval.py. Module 'code_eval' doesn't exist on
    the Hugging Face Hub either" (it does: the Hub was not reached and evaluate's module cache lacks it); and
    they run code_eval once on import, which refuses unless HF_ALLOW_CODE_EVAL=1 (a ValueError with a banner;
    lm-eval's confirm_run_unsafe_code does not set it). Anything else is `<type>: <message>`.
    """
    text = str(exc)
    found = _EVALUATE_MODULE_NOT_FOUND.search(text) if isinstance(exc, FileNotFoundError) else None
    if found is not None:
        from evaluate import config as evaluate_config

        name = found.group(1)
        cache = Path(evaluate_config.HF_MODULES_CACHE) / "evaluate_modules"
        allow = "" if os.environ.get("HF_ALLOW_CODE_EVAL") == "1" or name != "code_eval" else (
            "; code_eval also runs model-written code only with HF_ALLOW_CODE_EVAL=1 set where the suite runs")
        return (f"its scorer, the Hugging Face `evaluate` module {name!r} (evaluate.load({name!r}) when lm-eval "
                f"builds the task), is not in evaluate's module cache ({cache}, HF_MODULES_CACHE) and was not "
                f"fetched from the Hub (unreachable from here, or HF_EVALUATE_OFFLINE set); where the Hub is "
                f"reachable, `python -c \"import evaluate; evaluate.load({name!r})\"` caches it, or copy that "
                f"folder from a machine that has it{allow}")
    if isinstance(exc, ValueError) and "HF_ALLOW_CODE_EVAL" in text:
        return ("its scorer, the Hugging Face `evaluate` module 'code_eval', runs model-written code only with "
                "HF_ALLOW_CODE_EVAL=1 in the environment (lm-eval's confirm_run_unsafe_code, the task's "
                "allow_code_execution, does not set it); set it where the suite runs, in a sandbox")
    return f"{type(exc).__name__}: {text}"


def has_offline_data(name: str, data_dir: Path | None) -> bool:
    """True when every leaf of `name` reads a dataset the data folder mirrors (so it runs without the Hub)."""
    from quantgate.evaluation.task_registry import leaves
    from quantgate.evaluation.tasks.offline_data import MIRRORS

    leaf_list = list(leaves(name))
    return bool(leaf_list) and all(
        (m := MIRRORS.get(str(leaf.config.get("dataset_path")))) is not None and m.available(data_dir)
        for leaf in leaf_list
    )


@contextmanager
def server_api_key(api_key: str | None) -> Iterator[None]:
    """Make lm-eval's `local-completions` send `Authorization: Bearer <api_key>` while the block runs.

    lm-eval 0.4.13 takes the key from env OPENAI_API_KEY (LocalCompletionsAPI.api_key, read into the cached
    `header` on the first request); the alternative, a `header` model argument, would be logged and stored
    with lm-eval's config. The previous value is restored afterwards, so the key outlives no evaluation.
    lm-eval logs a failed request's headers (quantgate.redaction): while the block runs, the key is redacted
    from every log record.
    """
    if api_key is None:
        yield
        return
    previous = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = api_key
    try:
        with secret_redacted_from_logs(api_key):
            yield
    finally:
        if previous is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = previous


# Tokenizers loaded by the API models of this process, by what determines them (tokenizer_files_key).
_tokenizers: dict[tuple[Any, ...], Any] = {}
_TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                    "chat_template.jinja", "chat_template.json")


def tokenizer_files_key(path: str, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a Hugging Face tokenizer loaded from local folder `path` with from_pretrained `kwargs` depends on:
    the sha256 of every tokenizer file `AutoTokenizer` reads there (config.json for the class; the tokenizer's
    own files) and the kwargs. None for anything but a local folder without remote code (not reused)."""
    folder = Path(path)
    if not folder.is_dir() or kwargs.get("trust_remote_code"):
        return None
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return (h.hexdigest(), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


@contextmanager
def tokenizers_reused() -> Iterator[None]:
    """While the block runs, `transformers.AutoTokenizer.from_pretrained` of a local folder returns the
    tokenizer already loaded in this process from identical files with identical arguments.

    lm-eval's API model loads the served checkpoint's tokenizer in its __init__, once per evaluation: 0.3-1.5 s
    on 2 CPU cores (reports/performance-fixed-cost.md), the same files for every task of a variant and for
    every variant built from one model. lm-eval only reads the tokenizer after loading it (encode, decode,
    apply_chat_template; `configure_pad_token` sets a missing pad token, which is idempotent), so one object
    serves them all. Remote-code tokenizers are always loaded anew.
    """
    import transformers

    auto = transformers.AutoTokenizer
    original = auto.__dict__["from_pretrained"]
    load = original.__get__(None, auto)

    def from_pretrained(name: Any, *args: Any, **kwargs: Any) -> Any:
        key = None if args else tokenizer_files_key(str(name), kwargs)
        if key is None:
            return load(name, *args, **kwargs)
        if key not in _tokenizers:
            _tokenizers[key] = load(name, **kwargs)
        return _tokenizers[key]

    auto.from_pretrained = from_pretrained
    try:
        yield
    finally:
        auto.from_pretrained = original


@contextmanager
def env_info_not_collected() -> Iterator[None]:
    """While the block runs, lm-eval's `simple_evaluate` does not collect torch's environment report.

    After the last request, simple_evaluate calls `add_env_info` (lm_eval/loggers/utils.py), which runs
    `torch.utils.collect_env.get_pretty_env_info()`: it starts subprocesses (pip, nvidia-smi, ...) and took
    0.5 s per evaluation on 2 CPU cores (reports/performance-fixed-cost.md). Its output lands in lm-eval's
    `pretty_env_info`, which quantgate keeps nowhere (run_task's config; provenance records the versions and
    hardware itself), so the same keys are written without running it. Nothing that is asked or scored changes.
    """
    import lm_eval.evaluator as evaluator

    original = evaluator.add_env_info

    def add_env_info(storage: dict[str, Any]) -> None:
        from importlib.metadata import version

        storage.update({"pretty_env_info": "not collected (quantgate records versions and hardware itself)",
                        "lm_eval_version": version("lm_eval"), "transformers_version": version("transformers"),
                        "upper_git_hash": None})

    evaluator.add_env_info = add_env_info
    try:
        yield
    finally:
        evaluator.add_env_info = original


def run_task(
    *,
    completions_url: str,
    served_name: str,
    tokenizer_dir: Path,
    task: Task,
    generation: Generation,
    data_dir: Path | None,
    sampling: dict[str, Any] | None = None,
    chat: Chat | None = None,
    max_length: int | None = None,
    api_key: str | None = None,
    trust_remote_code: bool = False,
    repeats: int = 1,
    scope: Iterable[str] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Evaluate one task; returns (aggregate metrics, per-item samples, the lm-eval config that ran).

    `api_key` is the server's (sent as a bearer token, never logged); `trust_remote_code` loads the
    tokenizer's own code, only where the matrix opts the model in. `scope` names the other lm-eval tasks this
    process will evaluate (the matrix's), so the process's one TaskManager indexes them all at the first
    evaluation instead of widening later (task_registry.task_manager).

    `sampling` is Matrix.sampling(model, task) (default: the matrix-wide block), `chat` Matrix.chat(model,
    task), `max_length` the model's max_model_len. For a group, aggregate holds the group's metrics and
    samples every subtask's items, each tagged with its subtask (`task`), so items are (subtask, doc id).

    `repeats` (Matrix.repeats) k > 1 runs the task k times with request seeds seed + i; every sample is
    tagged `repeat: i`, and aggregate holds each metric's mean over the k runs (outcomes_over_repeats gives the
    per-item values). lm-eval's own `repeats` is not used: with a per-request seed its k samples would be one.
    """
    from lm_eval import simple_evaluate

    from quantgate.evaluation.task_registry import task_manager

    sampling = generation.resolved() if sampling is None else sampling
    chat = chat or Chat()
    name = task.lm_eval_name
    manager = task_manager([name, *scope])
    seed = sampling.get("seed")
    seed = generation.seed if seed is None else seed
    from quantgate.evaluation.lmeval_overhead import (
        templates_compiled_once,
        text_samples_not_image_hashed,
        token_ids_reused,
    )
    from quantgate.evaluation.recording_api import attach_responses, recording

    aggregates: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []

    def failed(exc: Exception) -> EvaluationError:
        detail = redact(f"{type(exc).__name__}: {exc}", api_key)
        return EvaluationError(f"lm-eval failed on task {task.key} ({name}): {detail}")

    try:
        spec = lm_eval_task_spec(name, data_dir)
    except Exception as exc:  # noqa: BLE001 - re-raised with the task named
        if stopping.requested() is not None:  # a stop (pytest.exit on SIGTERM) is not this task's failure
            raise
        raise failed(exc) from exc
    with ExitStack() as patched:
        # lm-eval's process state, patched once for every repeat: the repeats send the same prompts, so their
        # templates are compiled and their token ids made once (lmeval_overhead)
        for patch in (server_api_key(api_key), env_info_not_collected(), tokenizers_reused(),
                      templates_compiled_once(), text_samples_not_image_hashed(), token_ids_reused()):
            patched.enter_context(patch)
        for repeat in range(repeats):
            # the prompts (few-shot examples included) stay the same across repeats; only the request seed moves
            request_seed = None if seed is None else seed + repeat
            try:
                with recording() as recorder:
                    out = simple_evaluate(
                        model=lm_eval_model(chat),
                        model_args=model_args(
                            completions_url, served_name, tokenizer_dir, generation, chat=chat,
                            max_length=max_length, seed=request_seed, trust_remote_code=trust_remote_code,
                        ),
                        tasks=spec if isinstance(spec, list) else [spec],
                        num_fewshot=task.num_fewshot,
                        limit=task.limit,
                        log_samples=True,
                        bootstrap_iters=0,  # quantgate computes its own paired intervals
                        apply_chat_template=task.apply_chat_template or chat.is_chat,
                        gen_kwargs=gen_kwargs(sampling, chat) or None,
                        task_manager=manager,
                        confirm_run_unsafe_code=task.allow_code_execution,
                        random_seed=seed,
                        numpy_random_seed=seed,
                        torch_random_seed=seed,
                        fewshot_random_seed=seed,
                    )
            except Exception as exc:  # noqa: BLE001 - re-raised with the task named
                if stopping.requested() is not None:  # a stop (pytest.exit on SIGTERM) is not a task failure
                    raise
                raise failed(exc) from exc
            as_leaves = isinstance(spec, list)  # a group handed over as its leaves: lm-eval reports no group row
            if not out or (name not in out.get("results", {}) and not as_leaves):
                raise EvaluationError(f"lm-eval returned no results for task {task.key} ({name})")
            # One spec per call, so every logged sample is this task's; a group's are tagged with their subtask.
            logged = out.get("samples", {})
            subtasks = sorted(logged)
            run = [{**s, "task": sub} if sub != name else s for sub in subtasks for s in logged[sub] or []]
            if not run:
                raise EvaluationError(f"lm-eval logged no per-item samples for task {task.key}")
            aggregates.append(group_aggregate(name, run, task.lm_eval_metric_keys()) if as_leaves
                              else out["results"][name])
            unmatched = attach_responses(run, recorder)
            if unmatched:
                log.warning("quantgate: %d generation(s) of task %s have no recorded response (finish_reason, "
                            "tokens)", unmatched, task.key)
            samples += [{**s, "repeat": repeat} for s in run] if repeats > 1 else run
    aggregate = aggregates[0] if repeats == 1 else mean_of_aggregates(aggregates)
    missing = sorted(task.lm_eval_metric_keys() - set(aggregate))
    if missing:
        raise EvaluationError(
            f"task {task.key}: metric(s) {missing} not in lm-eval's output; "
            f"available: {sorted(k for k in aggregate if not k.endswith('_stderr') and k != 'alias')}"
        )
    config = {
        "configs": {sub: out.get("configs", {}).get(sub) for sub in subtasks if sub in out.get("configs", {})},
        "n-samples": out.get("n-samples", {}).get(name),
        "versions": {sub: out.get("versions", {}).get(sub) for sub in subtasks},
        "offline": not isinstance(spec, str),
        **({"group_as_leaves": len(spec)} if isinstance(spec, list) else {}),
        "model": lm_eval_model(chat),
        "gen_kwargs": gen_kwargs(sampling, chat),
        "max_length": max_length,
        **({"repeats": repeats, "request_seeds": [None if seed is None else seed + i for i in range(repeats)]}
           if repeats > 1 else {}),
    }
    return aggregate, samples, config


def mean_of_aggregates(aggregates: list[dict[str, Any]]) -> dict[str, Any]:
    """lm-eval's aggregate metrics of k repeated runs as their mean (numbers only; the rest from the first run)."""
    out = dict(aggregates[0])
    for key, value in aggregates[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [a.get(key) for a in aggregates]
            if all(isinstance(v, (int, float)) for v in values):
                out[key] = float(np.mean(values))
    return out


@dataclass(frozen=True)
class ItemOutcomes:
    """Per-item values of one metric, aligned by doc id. `weights` is set for ratio-of-sums metrics
    (instruction-level accuracy: items carry several instructions; perplexity: items carry several words)."""

    ids: tuple[str, ...]
    values: np.ndarray
    weights: np.ndarray | None
    answers: dict[str, str]
    kind: str  # "mean" | "weighted_mean" | "perplexity" (log-likelihood sums over word/byte counts)
    metric: str = ""  # the lm-eval metric name

    def score(self) -> float:
        """The task score as lm-eval aggregates it (lm_eval/api/metrics.py): mean, ratio of sums, or for
        loglikelihood-rolling metrics from the per-document (loglikelihood, count) pairs:
        word/byte_perplexity = exp(-sum ll / sum count); bits_per_byte = -sum ll / sum bytes / ln 2."""
        if self.kind == "perplexity":
            nll_per_unit = -self.values.sum() / self.weights.sum()  # type: ignore[union-attr]
            if self.metric == "bits_per_byte":
                return float(nll_per_unit / math.log(2))
            return math.exp(nll_per_unit)
        if self.weights is not None:
            return float(self.values.sum() / self.weights.sum())
        return float(self.values.mean())

    def as_map(self) -> dict[str, float]:
        if self.weights is None:
            return dict(zip(self.ids, self.values.tolist(), strict=True))
        return dict(zip(self.ids, (self.values / self.weights).tolist(), strict=True))

    def aligned(self, ids: tuple[str, ...]) -> ItemOutcomes:
        index = {d: i for i, d in enumerate(self.ids)}
        missing = [d for d in ids if d not in index]
        if missing:
            raise EvaluationError(f"{len(missing)} item(s) missing from a result, e.g. doc {missing[0]}")
        order = np.array([index[d] for d in ids], dtype=int)
        return ItemOutcomes(
            ids,
            self.values[order],
            None if self.weights is None else self.weights[order],
            self.answers,
            self.kind,
            self.metric,
        )


def _answer(sample: dict[str, Any]) -> str:
    resp = sample.get("filtered_resps") or sample.get("resps")
    while isinstance(resp, list) and resp:
        resp = resp[0]
    return str(resp)[:2000] if resp is not None else ""


def _item_id(sample: dict[str, Any]) -> str:
    """A sample's item id: its doc id, or 'subtask/doc id' for a group's items."""
    return f"{sample['task']}/{sample['doc_id']}" if "task" in sample else str(sample["doc_id"])


def _order(sample: dict[str, Any]) -> tuple[str, int]:
    return (str(sample.get("task", "")), int(sample["doc_id"]))


def item_outcomes(samples: list[dict[str, Any]], metric_key: str) -> ItemOutcomes:
    """Per-item values of `metric_key` ('metric,filter', or a derived 'mean:a,f+b,f' from Task.metric_keys)."""
    if metric_key.startswith("mean:"):
        return derived_mean([item_outcomes(samples, k) for k in metric_key.removeprefix("mean:").split("+")])
    metric, _, flt = metric_key.partition(",")
    rows = [s for s in samples if s.get("filter", "none") == (flt or "none")] or samples
    ids: list[str] = []
    values: list[float] = []
    weights: list[float] = []
    answers: dict[str, str] = {}
    kind = "mean"
    for s in sorted(rows, key=_order):
        if metric not in s:
            raise EvaluationError(f"per-item samples carry no {metric!r}; keys: {sorted(s)}")
        v = s[metric]
        doc = _item_id(s)
        ids.append(doc)
        answers[doc] = _answer(s)
        if isinstance(v, (list, tuple)) and metric.endswith("perplexity") or metric == "bits_per_byte":
            kind = "perplexity"
            values.append(float(v[0]))
            weights.append(float(v[1]))
        elif isinstance(v, (list, tuple)):
            kind = "weighted_mean"
            values.append(float(sum(bool(x) for x in v)))
            weights.append(float(len(v)))
        else:
            values.append(float(v))
    return ItemOutcomes(
        tuple(ids),
        np.asarray(values, dtype=float),
        np.asarray(weights, dtype=float) if kind != "mean" else None,
        answers,
        kind,
        metric,
    )


def outcomes_over_repeats(samples: list[dict[str, Any]], metric_key: str) -> ItemOutcomes:
    """Per-item values of `metric_key` over every repeat of a task (run_task's `repeats`).

    Without repeat tags this is item_outcomes. With k repeats each item's value pools its k samples: the mean
    of a mean metric; for ratio-of-sums and perplexity metrics the sums of values and of weights (so the task
    score is the pooled ratio, which equals the mean of the k scores, every repeat having the same weights).
    Paired gates then compare per-item means over k samples, which is how they use all k.
    Raises EvaluationError when the repeats do not hold the same items.
    """
    tags = sorted({s["repeat"] for s in samples if "repeat" in s})
    if not tags:
        return item_outcomes(samples, metric_key)
    runs = [item_outcomes([s for s in samples if s.get("repeat") == r], metric_key) for r in tags]
    first = runs[0]
    if any(set(r.ids) != set(first.ids) for r in runs):
        raise EvaluationError(f"the {len(runs)} repeats of a result do not hold the same items")
    aligned = [r.aligned(first.ids) for r in runs]
    values = np.sum([r.values for r in aligned], axis=0)
    if first.weights is None:
        return ItemOutcomes(first.ids, values / len(runs), None, first.answers, first.kind, first.metric)
    weights = np.sum([r.weights for r in aligned], axis=0)
    return ItemOutcomes(first.ids, values, weights, first.answers, first.kind, first.metric)


def derived_mean(parts: list[ItemOutcomes]) -> ItemOutcomes:
    """The mean of several metrics of one task as one per-item metric (seed 000's IFEval: (prompt + inst) / 2).

    A ratio-of-sums part (weights w_i, values v_i) contributes v_i / mean(w) per item, whose mean over items is
    exactly sum(v) / sum(w); so the derived score equals the mean of the parts' scores, and its paired interval
    is computed from per-item values like any mean metric (items of one run share mean(w) with the baseline's
    on the same items, since weights are instruction counts of the prompt).
    """
    if any(p.kind == "perplexity" for p in parts):
        raise EvaluationError("a derived mean of perplexities is not defined; list them as separate metrics")
    ids = parts[0].ids
    total = np.zeros(len(ids))
    for part in (p.aligned(ids) for p in parts):
        total += part.values if part.weights is None else part.values / part.weights.mean()
    return ItemOutcomes(ids, total / len(parts), None, parts[0].answers, "mean")

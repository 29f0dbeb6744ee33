"""Run one lm-eval task against an OpenAI-compatible completions endpoint (lm-eval's `local-completions`).

lm-eval's own entry point (`simple_evaluate`) does the work; quantgate only chooses the arguments, keeps every
per-item sample, and turns them into per-item outcomes that the paired gates consume. lm-eval's `use_cache`
keys on request text alone and would hand one checkpoint's answers to another, so it is never enabled.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.errors import EvaluationError
from quantgate.evaluation.provenance import TASKS_DIR
from quantgate.matrix import Generation, Task

log = logging.getLogger(__name__)


# lm-eval `local-completions` (TemplateAPI) arguments that change what is asked or how it is scored: the
# tokenizer that counts and splits loglikelihood contexts, whether a BOS token is prepended, whether requests
# go as token ids or text, the context window lm-eval truncates to, and the default generation length.
# Pinned explicitly (at lm-eval 0.4.13's defaults, except the tokenizer backend, which lm-eval would
# auto-detect) and recorded in every result's key, so a change to any of them is a different experiment.
MEASURED_CLIENT_ARGS: dict[str, Any] = {
    "tokenizer_backend": "huggingface",  # the served checkpoint's own tokenizer (its sha256 is in the key)
    "add_bos_token": False,
    "tokenized_requests": True,
    "max_length": 2048,
    "truncate": False,
    "max_gen_toks": 256,
}


def client_settings(generation: Generation) -> dict[str, Any]:
    """The lm-eval client settings that can change a result, for its key; transport settings are left out."""
    return {"model": "local-completions", **MEASURED_CLIENT_ARGS, "seed": generation.seed}


def model_args(
    completions_url: str, served_name: str, tokenizer_dir: Path, generation: Generation
) -> dict[str, Any]:
    return {
        "model": served_name,
        "base_url": completions_url,
        "tokenizer": str(tokenizer_dir),
        **MEASURED_CLIENT_ARGS,
        # transport: how requests reach the server, not what is asked
        "num_concurrent": generation.concurrency,
        "batch_size": generation.batch_size,
        "max_retries": 3,
        "timeout": 600,
        "seed": generation.seed,
    }


@functools.cache
def scoring_code_sha256() -> str:
    """sha256 of quantgate's code that turns lm-eval samples into per-item outcomes and scores:
    ItemOutcomes, item_outcomes and _answer here, and the tasks' Python (tasks/qg_utils.py: loaders,
    process_results, the IFEval and wikitext scoring). A change to any of it is a different measurement."""
    h = hashlib.sha256()
    for obj in (ItemOutcomes, item_outcomes, _answer):
        h.update(inspect.getsource(obj).encode())
    for f in sorted(TASKS_DIR.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def gen_kwargs(task: Task, generation: Generation) -> dict[str, Any] | None:
    if task.name not in ("gsm8k", "ifeval"):
        return None
    kwargs: dict[str, Any] = {"temperature": generation.temperature}
    if generation.max_gen_toks:
        kwargs["max_gen_toks"] = generation.max_gen_toks
    if generation.temperature == 0:
        kwargs["do_sample"] = False
    return kwargs


def run_task(
    *,
    completions_url: str,
    served_name: str,
    tokenizer_dir: Path,
    task: Task,
    generation: Generation,
    data_dir: Path | None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Evaluate one task; returns (aggregate metrics, per-item samples, the lm-eval config that ran)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if data_dir is not None:
        os.environ["QUANTGATE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = task.lm_eval_name
    try:
        out = simple_evaluate(
            model="local-completions",
            model_args=model_args(completions_url, served_name, tokenizer_dir, generation),
            tasks=[name],
            num_fewshot=task.num_fewshot,
            limit=task.limit,
            log_samples=True,
            bootstrap_iters=0,  # quantgate computes its own paired intervals
            apply_chat_template=task.apply_chat_template,
            gen_kwargs=gen_kwargs(task, generation),
            task_manager=TaskManager(include_path=str(TASKS_DIR)),
            random_seed=generation.seed,
            numpy_random_seed=generation.seed,
            torch_random_seed=generation.seed,
            fewshot_random_seed=generation.seed,
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the task named
        raise EvaluationError(
            f"lm-eval failed on task {task.name} ({name}): {type(exc).__name__}: {exc}"
        ) from exc
    if not out or name not in out.get("results", {}):
        raise EvaluationError(f"lm-eval returned no results for task {task.name} ({name})")
    aggregate = out["results"][name]
    samples = out.get("samples", {}).get(name) or []
    if not samples:
        raise EvaluationError(f"lm-eval logged no per-item samples for task {task.name}")
    if task.metric_key not in aggregate:
        raise EvaluationError(
            f"task {task.name}: metric {task.metric_key!r} not in lm-eval's output; "
            f"available: {sorted(k for k in aggregate if not k.endswith('_stderr') and k != 'alias')}"
        )
    config = {
        "configs": out.get("configs", {}).get(name),
        "n-samples": out.get("n-samples", {}).get(name),
        "versions": out.get("versions", {}).get(name),
    }
    return aggregate, samples, config


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


def item_outcomes(samples: list[dict[str, Any]], metric_key: str) -> ItemOutcomes:
    metric, _, flt = metric_key.partition(",")
    rows = [s for s in samples if s.get("filter", "none") == (flt or "none")] or samples
    ids: list[str] = []
    values: list[float] = []
    weights: list[float] = []
    answers: dict[str, str] = {}
    kind = "mean"
    for s in sorted(rows, key=lambda r: int(r["doc_id"])):
        if metric not in s:
            raise EvaluationError(f"per-item samples carry no {metric!r}; keys: {sorted(s)}")
        v = s[metric]
        doc = str(s["doc_id"])
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

"""Teacher-forced token distributions from a vLLM server, stored like any task's result.

The text set (``DistributionSet`` in the matrix) is cut from WikiText-2's raw test split: the file is
tokenized once with the served checkpoint's tokenizer and ``documents`` chunks of ``tokens`` tokens are
taken at evenly spaced offsets, so that chunks come from different articles (the intervals are over chunks and
assume them roughly independent). Each chunk is sent as a token-id prompt to the server's OpenAI completions
endpoint with vLLM's ``prompt_logprobs: top_k`` (prefill only; one token is generated because vLLM needs
``max_tokens >= 1``). The server returns, for every position after the first, the ``top_k`` most probable
next tokens and the log-probability of the token that actually follows; these are stored raw, one line per
chunk, under the task name ``distribution-<dataset>``, keyed by provenance like an lm-eval task.

The BF16 baseline's stored result is the reference; a variant's is compared against it on demand
(``compare``), so the paired metrics and their intervals can always be recomputed from the two stored
results. Both must have scored the same token ids: ``compare`` raises TokenMismatchError otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.engines.kernels import attention_backend, kernel_path
from quantgate.errors import EvaluationError, MatrixError, NotStoredError, QuantgateError
from quantgate.evaluation.provenance import git_state, versions
from quantgate.evaluation.store import StoredResult
from quantgate.gates.distribution import (
    DocumentLogprobs,
    MetricSummary,
    TokenMismatchError,
    pair_documents,
    summarize,
)
from quantgate.matrix import DistributionSet
from quantgate.runner import Run, VariantRun

log = logging.getLogger("quantgate")

# Bump when what is sent or how a response is parsed changes: it is part of every result's key.
METHOD_VERSION = 1
DATASET_FILES = {"wikitext2": "wikitext2/wiki.test.raw"}
_REQUEST_TIMEOUT_S = 600
_IN_FLIGHT = 4  # the server batches concurrent prefills; a few in flight keep it busy without queueing


def task_name(settings: DistributionSet) -> str:
    """The result store's task directory of a distribution run."""
    return f"distribution-{settings.dataset}"


def _tokenizer_digest(checkpoint_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        f = checkpoint_dir / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def dataset_digest(data_dir: Path | None, dataset: str) -> str | None:
    """sha256 of the text set's file (None without a data folder: scoring then fails with its own error)."""
    if data_dir is None:
        return None
    path = data_dir / DATASET_FILES[dataset]
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def text_chunks(
    tokenizer_dir: Path, settings: DistributionSet, data_dir: Path | None
) -> list[tuple[int, int, list[int]]]:
    """(doc_id, token offset, token ids) of each chunk of the text set.

    Chunk i starts at token floor(i * (T - L) / (N - 1)) of the T-token text: N chunks of L tokens spread over
    the whole file. Raises MatrixError if the text holds fewer than N * L tokens (chunks would overlap).
    """
    if data_dir is None:
        raise QuantgateError("distribution metrics need the offline data folder (set QUANTGATE_DATA_DIR)")
    path = data_dir / DATASET_FILES[settings.dataset]
    if not path.is_file():
        raise QuantgateError(f"distribution text set {settings.dataset!r}: {path} not found (see its README)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    n, length, total = settings.documents, settings.tokens, len(ids)
    if n * length > total:
        raise MatrixError(
            f"distribution: {n} documents x {length} tokens = {n * length} tokens, but {settings.dataset} "
            f"holds {total} tokens with this tokenizer; lower documents or tokens"
        )
    offsets = [(i * (total - length)) // (n - 1) for i in range(n)]
    return [(i, o, list(ids[o : o + length])) for i, o in enumerate(offsets)]


def parse_prompt_logprobs(
    doc_id: int, sent: list[int], choice: dict[str, Any], top_k: int
) -> DocumentLogprobs:
    """One completions choice (vLLM, ``prompt_logprobs`` and ``return_token_ids``) as DocumentLogprobs.

    vLLM returns ``prompt_logprobs`` as a list with one entry per prompt token: None for the first, then a
    dict {token id (as a JSON string): {"logprob", "rank", "decoded_token"}} holding the ``top_k`` most
    probable tokens and the prompt token itself (which may be one of them). Raises TokenMismatchError if the
    server reports other prompt tokens than were sent, EvaluationError if the response lacks what was asked.
    """
    got = choice.get("prompt_token_ids")
    if got is None:
        raise EvaluationError(f"document {doc_id}: the server returned no prompt_token_ids (vLLM >= 0.10 needed)")
    if list(got) != list(sent):
        raise TokenMismatchError(
            f"document {doc_id}: sent {len(sent)} token ids, the server scored {len(got)} different ones "
            "(did it add a BOS token or retokenize?)"
        )
    plp = choice.get("prompt_logprobs")
    if not plp or len(plp) != len(sent):
        raise EvaluationError(
            f"document {doc_id}: expected {len(sent)} prompt_logprobs entries, got "
            f"{None if plp is None else len(plp)}"
        )
    top_ids = np.empty((len(sent) - 1, top_k), dtype=np.int64)
    top_lp = np.empty((len(sent) - 1, top_k), dtype=np.float64)
    ref_lp = np.empty(len(sent) - 1, dtype=np.float64)
    for t in range(1, len(sent)):
        entry = plp[t]
        if not entry:
            raise EvaluationError(f"document {doc_id}: no prompt logprobs at position {t}")
        ranked = sorted(((int(k), float(v["logprob"])) for k, v in entry.items()), key=lambda kv: -kv[1])
        if len(ranked) < top_k:
            raise EvaluationError(
                f"document {doc_id}: position {t} has {len(ranked)} logprobs, asked for top {top_k}"
            )
        ref = entry.get(str(sent[t]))
        if ref is None:
            raise EvaluationError(f"document {doc_id}: position {t} lacks the prompt token's own logprob")
        top_ids[t - 1] = [k for k, _ in ranked[:top_k]]
        top_lp[t - 1] = [v for _, v in ranked[:top_k]]
        ref_lp[t - 1] = float(ref["logprob"])
    return DocumentLogprobs(doc_id, tuple(sent), top_ids, top_lp, ref_lp)


def score_chunks(
    completions_url: str,
    served_name: str,
    chunks: list[tuple[int, int, list[int]]],
    top_k: int,
    api_key: str | None = None,
) -> list[DocumentLogprobs]:
    """Teacher-force every chunk through the server (token-id prompts) and parse the prompt logprobs.

    `api_key` is the server's own (VllmServer.api_key), sent as a bearer token as lm-eval sends it.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def one(chunk: tuple[int, int, list[int]]) -> DocumentLogprobs:
        doc_id, _, ids = chunk
        body = {
            "model": served_name,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_k,
            "return_token_ids": True,
        }
        import requests  # here, not at import: importing it costs seconds (chardet), and a warm rerun needs none

        try:
            resp = requests.post(completions_url, json=body, headers=headers, timeout=_REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            raise EvaluationError(f"document {doc_id}: request to {completions_url} failed: {exc}") from None
        if resp.status_code != 200:
            raise EvaluationError(f"document {doc_id}: HTTP {resp.status_code} from the server: {resp.text[:400]}")
        return parse_prompt_logprobs(doc_id, ids, resp.json()["choices"][0], top_k)

    with ThreadPoolExecutor(max_workers=_IN_FLIGHT) as pool:
        return list(pool.map(one, chunks))


def settings_of(run: Run) -> DistributionSet:
    if run.matrix.distribution is None:
        raise MatrixError("the matrix has no `distribution:` section: no distribution metrics to compute")
    return run.matrix.distribution


def result_key(vr: VariantRun, settings: DistributionSet, kernel: str) -> dict[str, Any]:
    """What a distribution result depends on: the served bytes, engine, kernel, text set and settings."""
    run = vr.run
    return {
        "checkpoint_sha256": vr.checkpoint().sha256,
        "served_sha256": vr.served_checkpoint().sha256,
        "engine": vr.support.engine,
        "task": task_name(settings),
        "distribution": settings.model_dump(exclude={"gate"}),
        "tokenizer_sha256": _tokenizer_digest(run.variant(vr.model.name, vr.model.baseline.name)
                                              .served_checkpoint().path),
        "method_version": METHOD_VERSION,
        "data": dataset_digest(run.data_dir, settings.dataset),
        "vllm": versions()["vllm"],
        "hardware": {"class": run.hw.hw_class, "name": run.hw.name},
        "kernel_path": kernel,
        "serve_args": vr.server_key()["serve_args"],
    }


_memo: weakref.WeakKeyDictionary[Run, dict[tuple[str, str], StoredResult]] = weakref.WeakKeyDictionary()


def distribution_result(run: Run, model: str, variant: str, stored_only: bool = False) -> StoredResult:
    """The variant's stored teacher-forced logprobs, from the store where the key matches, else scored now.

    The text is always tokenized with the BF16 baseline's tokenizer, so every variant of a model is sent the
    same token ids. Raises NotStoredError when nothing is stored in a reuse-only run, or with ``stored_only``
    (a reader such as the score table, which must not start a server).
    """
    memo = _memo.setdefault(run, {})
    if (model, variant) in memo:
        return memo[(model, variant)]
    settings = settings_of(run)
    vr = run.variant(model, variant)
    if vr.support.engine is None:
        raise QuantgateError(f"{vr.label}: {vr.support.reason}")
    if settings.tokens > vr.model.max_model_len:
        raise MatrixError(
            f"distribution.tokens = {settings.tokens} exceeds {model}'s max_model_len {vr.model.max_model_len}"
        )
    task = task_name(settings)
    record = run.server_records.get(vr.server_key())
    if record is not None:
        hit = run.store.find(model, variant, task, result_key(vr, settings, record["kernel_path"]))
        if hit is not None:
            run.events.reused.append(f"{vr.label}:{task}")
            memo[(model, variant)] = hit
            return hit
    if run.reuse_only or stored_only:
        raise NotStoredError(f"{vr.label}: no stored result for {task}")
    server = vr.ensure_server()
    key = result_key(vr, settings, kernel_path(server.log_text()))
    with run.store.lock(model, variant, task, key):
        hit = run.store.find(model, variant, task, key)
        if hit is None:
            hit = _score_and_store(vr, settings, key, server)
        else:
            run.events.reused.append(f"{vr.label}:{task}")
    memo[(model, variant)] = hit
    return hit


def _score_and_store(vr: VariantRun, settings: DistributionSet, key: dict[str, Any], server: Any) -> StoredResult:
    run = vr.run
    task = task_name(settings)
    t0 = time.monotonic()
    log.warning("quantgate: scoring %s on %s (%d x %d tokens, top %d)", task, vr.label,
                settings.documents, settings.tokens, settings.top_k)
    baseline_dir = run.variant(vr.model.name, vr.model.baseline.name).served_checkpoint().path
    chunks = text_chunks(baseline_dir, settings, run.data_dir)
    docs = score_chunks(server.completions_url, vr.label, chunks, settings.top_k, api_key=server.api_key)
    seconds = time.monotonic() - t0
    run.events.seconds["evaluate"] += seconds
    run.events.evaluated.append(f"{vr.label}:{task}")
    nll = -np.concatenate([d.ref_logprobs for d in docs])
    tail = np.concatenate([1.0 - np.exp(d.top_logprobs).sum(axis=1) for d in docs])
    aggregate = {
        "nll_mean": float(nll.mean()),
        "perplexity": float(math.exp(nll.mean())),
        "topk_tail_mass_mean": float(tail.mean()),
        "n_documents": len(docs),
        "n_tokens": int(nll.size),
    }
    offsets = {i: o for i, o, _ in chunks}
    samples = [{**d.to_record(), "offset": offsets[d.doc_id]} for d in docs]
    ckpt = vr.checkpoint()
    context = {
        "model": vr.model.name,
        "variant": vr.variant.name,
        "format": vr.variant.format,
        "builder": vr.variant.builder,
        "recipe": vr.variant.recipe,
        "checkpoint": {"path": str(ckpt.path), "origin": ckpt.origin, "size_bytes": ckpt.size_bytes,
                       "info": ckpt.info},
        "served_checkpoint": str(vr.served_checkpoint().path),
        "emulation": vr.served_checkpoint().info if vr.support.engine == "emulated" else None,
        "versions": versions(),
        "hardware": run.hw.as_dict(),
        "attention_backend": attention_backend(server.log_text()),
        "git": git_state(),
        "request": {"endpoint": "/v1/completions", "prompt": "token ids", "max_tokens": 1,
                    "prompt_logprobs": settings.top_k, "return_token_ids": True},
        "n_items": len(docs),
        "seconds": {"evaluate": round(seconds, 2), "server_start": round(server.startup_seconds or 0, 2)},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return run.store.put(vr.model.name, vr.variant.name, task, key, context, aggregate, samples, server.log_path)


@dataclass(frozen=True)
class Comparison:
    """A variant's distribution metrics against its BF16 baseline, with both stored results' provenance."""

    model: str
    variant: str
    summaries: dict[str, MetricSummary]
    reference: StoredResult
    compared: StoredResult

    def provenance(self) -> dict[str, Any]:
        """What the figures came from: both keys' kernel paths, versions, hardware, n."""
        ref, var = self.reference.provenance, self.compared.provenance
        s = self.summaries["kl"]
        return {
            "reference": {"variant": ref["variant"], "kernel_path": ref["key"]["kernel_path"],
                          "result": str(self.reference.path)},
            "variant": {"variant": var["variant"], "kernel_path": var["key"]["kernel_path"],
                        "engine": var["key"]["engine"], "result": str(self.compared.path)},
            "distribution": var["key"]["distribution"],
            "n_documents": s.n_documents,
            "n_tokens": s.n_tokens,
            "versions": var["versions"],
            "hardware": var["hardware"],
        }


def compare(run: Run, model: str, variant: str, level: float = 0.95, stored_only: bool = False) -> Comparison:
    """Pair the variant's stored logprobs with the baseline's, document by document, and summarize.

    ``stored_only``: raise NotStoredError rather than score what is not stored (see ``distribution_result``).
    """
    base = run.model(model).baseline.name
    reference = distribution_result(run, model, base, stored_only)
    compared = distribution_result(run, model, variant, stored_only)
    # A summary is a pure function of the two samples files and the level. The suite's gates (one test per
    # limit) and the score table ask for the same comparison up to four times per variant, in two Runs, so it
    # is computed once per process, keyed on the samples' sha256 that each entry's provenance records (the
    # store checks them on every read); an entry that records none is summarized every time.
    memo_key = (_samples_sha256(reference), _samples_sha256(compared), level)
    summaries = _summaries.get(memo_key) if None not in memo_key else None
    if summaries is None:
        ref_docs = [DocumentLogprobs.from_record(r) for r in reference.samples]
        var_docs = [DocumentLogprobs.from_record(r) for r in compared.samples]
        summaries = summarize(pair_documents(ref_docs, var_docs), level=level)
        if None not in memo_key:
            _summaries[memo_key] = summaries
    return Comparison(model, variant, summaries, reference, compared)


_summaries: dict[tuple[str | None, str | None, float], dict[str, MetricSummary]] = {}


def _samples_sha256(result: StoredResult) -> str | None:
    """The sha256 of a stored result's samples.jsonl as its provenance records it (the store checked the file
    against it when it read the entry); None for an entry that records none."""
    return (result.provenance.get("checksums") or {}).get("samples.jsonl")

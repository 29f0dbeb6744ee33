"""What a warm rerun no longer repeats, and that each cache follows the files it stands for (issue 14, item 4).

- A distribution summary's percentile bootstrap is computed on first use, with the same values as before.
- A stored entry is read and checked once per process while its files are unchanged; a replaced or edited
  entry is read (and checked) again.
- A distribution comparison is summarized once per pair of stored samples; new samples give a new summary.
No timings here: benchmarks/warm_rerun.py measures them.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from quantgate.evaluation import distribution as dist
from quantgate.evaluation.store import ResultStore
from quantgate.gates.distribution import DocumentLogprobs, pair_documents, percentile_intervals, summarize

KEY = {"checkpoint_sha256": "abc", "task": "distribution-wikitext2"}
TASK = "distribution-wikitext2"
V, K = 30, 4


def _records(seed: int, noise: float, n_docs: int = 6, length: int = 24) -> tuple[list[dict], list[dict]]:
    """Teacher-forced top-K logprob records of a reference and a perturbed variant on the same random tokens."""
    rng = np.random.default_rng(seed)
    ref, var = [], []
    for i in range(n_docs):
        toks = rng.integers(0, V, length)
        lp = rng.normal(0, 2.5, (length - 1, V))
        for out, logits in ((ref, lp), (var, lp + rng.normal(0, noise, lp.shape))):
            logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            top = np.argsort(-logp, axis=1)[:, :K]
            doc = DocumentLogprobs(i, tuple(int(t) for t in toks), top, np.take_along_axis(logp, top, 1),
                                   logp[np.arange(length - 1), toks[1:]])
            out.append(doc.to_record())
    return ref, var


def test_percentiles_are_computed_on_first_use_with_the_same_values():
    ref, var = _records(seed=1, noise=0.4)
    docs = pair_documents([DocumentLogprobs.from_record(r) for r in ref],
                          [DocumentLogprobs.from_record(r) for r in var])
    s = summarize(docs)["kl"]
    assert "percentiles" not in vars(s)  # summarize did not bootstrap
    assert s.percentiles == percentile_intervals([d.kl for d in docs], level=s.level, seed=0)
    assert "percentiles" in vars(s)  # kept for the next reader


def test_a_stored_entry_is_read_again_when_its_files_change(tmp_path):
    store = ResultStore(tmp_path)
    store.put("m", "v", "hellaswag", KEY, {}, {"acc,none": 0.5}, [{"doc_id": 0, "acc": 1.0}], None)
    first = store.get("m", "v", "hellaswag", KEY)
    again = store.get("m", "v", "hellaswag", KEY)
    assert again.samples is first.samples  # read and checked once while unchanged

    # replaced through the store (a new directory, new inodes): the new samples are read
    store.put("m", "v", "hellaswag", KEY, {}, {"acc,none": 0.0}, [{"doc_id": 0, "acc": 0.0}], None)
    replaced = store.get("m", "v", "hellaswag", KEY)
    assert replaced.samples == [{"doc_id": 0, "acc": 0.0}] and replaced.aggregate == {"acc,none": 0.0}

    # edited in place behind the store's back: read and checked again, so the edit is caught as corruption
    samples = replaced.path / "samples.jsonl"
    samples.write_text(json.dumps({"doc_id": 0, "acc": 1.0}) + "\n" + json.dumps({"doc_id": 1, "acc": 1.0}) + "\n")
    assert store.get("m", "v", "hellaswag", KEY) is None


def test_a_comparison_is_summarized_once_per_pair_of_stored_samples(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    ref, var = _records(seed=2, noise=0.3)
    store.put("m", "bf16", TASK, KEY, {}, {}, ref, None)
    store.put("m", "int8", TASK, KEY, {}, {}, var, None)
    # the Run's lookup stood in for by the store itself: compare's own logic is under test
    monkeypatch.setattr(dist, "distribution_result",
                        lambda run, model, variant, stored_only=False: store.get(model, variant, TASK, KEY))
    run = SimpleNamespace(model=lambda name: SimpleNamespace(baseline=SimpleNamespace(name="bf16")))

    first = dist.compare(run, "m", "int8")
    assert dist.compare(run, "m", "int8").summaries is first.summaries  # not summarized twice

    _, worse = _records(seed=2, noise=1.5)  # same tokens, a more damaged variant
    store.put("m", "int8", TASK, KEY, {}, {}, worse, None)
    after = dist.compare(run, "m", "int8")
    expected = summarize(pair_documents([DocumentLogprobs.from_record(r) for r in ref],
                                        [DocumentLogprobs.from_record(r) for r in worse]))
    assert after.summaries["kl"].mean == pytest.approx(expected["kl"].mean, rel=0, abs=0)
    assert after.summaries["kl"].mean > first.summaries["kl"].mean

"""Distribution metrics against BF16: the top-k-with-tail KL, agreement, intervals, the gate, and parsing of
vLLM's prompt logprobs. Pure logic, no server."""

import math

import numpy as np
import pytest
from pydantic import ValidationError

from quantgate.errors import EvaluationError
from quantgate.evaluation.distribution import parse_prompt_logprobs
from quantgate.gates.distribution import (
    DocumentLogprobs,
    InconclusiveError,
    distribution_gate,
    distribution_verdicts,
    mean_interval,
    overall_outcome,
    pair_documents,
    summarize,
    topk_tail_kl,
)
from quantgate.gates.outcome import Outcome
from quantgate.matrix import DistributionLimits, DistributionSet, Matrix

V, K = 40, 4


def _doc(doc_id: int, logits: np.ndarray, tokens: np.ndarray, k: int = K) -> DocumentLogprobs:
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = np.argsort(-lp, axis=1)[:, :k]
    ref = lp[np.arange(len(tokens) - 1), tokens[1:]]
    return DocumentLogprobs(doc_id, tuple(int(t) for t in tokens), top, np.take_along_axis(lp, top, 1), ref)


def _docs(seed: int, noise: float, n_docs: int = 12, length: int = 40):
    rng = np.random.default_rng(seed)
    ref, var, full = [], [], []
    for i in range(n_docs):
        toks = rng.integers(0, V, length)
        lp = rng.normal(0, 2.5, (length - 1, V))
        lq = lp + rng.normal(0, noise, lp.shape)
        ref.append(_doc(i, lp, toks))
        var.append(_doc(i, lq, toks))
        p = np.exp(lp - np.logaddexp.reduce(lp, 1, keepdims=True))
        q = np.exp(lq - np.logaddexp.reduce(lq, 1, keepdims=True))
        full.append((p * np.log(p / q)).sum(1))
    return ref, var, full


def test_kl_with_tail_bucket_matches_hand_computation():
    # P over 4 tokens: 0.5, 0.3, 0.15, 0.05; Q: 0.4, 0.4, 0.1, 0.1. Top-2 each; the reference token is 2.
    p = np.log([0.5, 0.3, 0.15, 0.05])
    q = np.log([0.4, 0.4, 0.1, 0.1])
    kl = topk_tail_kl(
        np.array([[0, 1]]), p[[0, 1]][None], np.array([[0, 1]]), q[[0, 1]][None],
        np.array([2]), p[[2]], q[[2]],
    )
    # Known on both sides: tokens 0, 1 and the reference 2; the tail is token 3 alone (0.05 vs 0.1).
    hand = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.15 * math.log(0.15 / 0.1) \
        + 0.05 * math.log(0.05 / 0.1)
    assert kl[0] == pytest.approx(hand, abs=1e-12)


def test_kl_tail_merges_tokens_known_on_one_side_only():
    # Top-1 lists differ (P: token 0, Q: token 1); the reference token is 3. Only token 3 is known on both
    # sides, so the tail holds tokens 0, 1, 2: P_tail = 0.9, Q_tail = 0.8.
    p = np.log([0.6, 0.2, 0.1, 0.1])
    q = np.log([0.3, 0.4, 0.1, 0.2])
    kl = topk_tail_kl(np.array([[0]]), p[[0]][None], np.array([[1]]), q[[1]][None], np.array([3]), p[[3]], q[[3]])
    hand = 0.1 * math.log(0.1 / 0.2) + 0.9 * math.log(0.9 / 0.8)
    assert kl[0] == pytest.approx(hand, abs=1e-12)
    full = float((np.exp(p) * (p - q)).sum())
    assert kl[0] < full  # the coarse-grained KL is a lower bound


def test_kl_with_tail_is_a_lower_bound_of_full_kl():
    ref, var, full = _docs(seed=1, noise=0.5)
    for m, f in zip(pair_documents(ref, var), full, strict=True):
        assert np.all(m.kl <= f + 1e-12)
        assert np.all(m.kl >= -1e-12)
    assert np.mean([m.kl.mean() for m in pair_documents(ref, var)]) > 0.2 * np.mean(np.concatenate(full))


def test_identical_distributions_give_zero_kl_and_full_agreement():
    ref, _, _ = _docs(seed=2, noise=0.0)
    s = summarize(pair_documents(ref, ref))
    assert s["kl"].mean == pytest.approx(0.0, abs=1e-12)
    assert (s["kl"].low, s["kl"].high) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert s["top1_agree"].mean == 1.0 and s["top1_agree"].low == 1.0
    assert s["delta_logp"].mean == 0.0
    verdicts = distribution_verdicts(s, DistributionLimits(mean_kl_max=0.01, top1_agreement_min=0.95, source="t"))
    assert [v.outcome for v in verdicts] == [Outcome.PASS, Outcome.PASS]
    assert overall_outcome(verdicts) is Outcome.PASS


def test_degraded_distribution_fails_the_gate():
    ref, var, _ = _docs(seed=3, noise=2.0)
    s = summarize(pair_documents(ref, var))
    assert s["top1_agree"].high < 0.9
    verdicts = distribution_verdicts(s, DistributionLimits(mean_kl_max=0.05, top1_agreement_min=0.9, source="t"))
    assert [v.outcome for v in verdicts] == [Outcome.FAIL, Outcome.FAIL]
    assert overall_outcome(verdicts) is Outcome.FAIL
    with pytest.raises(AssertionError, match="evidence of loss"):
        verdicts[0].raise_for_status()


def test_interval_straddling_the_limit_is_inconclusive_with_the_n_that_resolves_it():
    ref, var, _ = _docs(seed=4, noise=0.4, n_docs=4)
    s = summarize(pair_documents(ref, var))
    kl = s["kl"]
    assert kl.low < kl.mean < kl.high
    limit = kl.mean + 0.25 * kl.half_width  # inside the interval, just above the estimate
    v = distribution_gate(s, "mean_kl_max", limit)
    assert v.outcome is Outcome.INCONCLUSIVE
    # n * (half width / gap)^2 = 4 * 16 = 64 documents (65 when the float gap rounds down)
    assert v.required_n in (64, 65)
    with pytest.raises(InconclusiveError, match="straddles"):
        v.raise_for_status()
    assert distribution_gate(s, "mean_kl_max", kl.high * 1.01).outcome is Outcome.PASS
    assert distribution_gate(s, "mean_kl_max", kl.low * 0.99).outcome is Outcome.FAIL


def test_mean_interval_covers_at_its_level():
    # Coverage of the t interval over documents: ~95% of 400 simulated studies contain the true mean.
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(400):
        x = rng.gamma(2.0, 0.01, size=30)  # skewed like per-document KL
        _, lo, hi = mean_interval(x, 0.95)
        hits += lo <= 0.02 <= hi
    assert 0.91 <= hits / 400 <= 0.98


def test_mean_interval_edge_cases():
    assert mean_interval(np.array([0.3]))[1:] == (-math.inf, math.inf)
    assert mean_interval(np.array([0.25, 0.25, 0.25])) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="no documents"):
        mean_interval(np.array([]))


def test_percentiles_carry_bootstrap_intervals_over_documents():
    ref, var, _ = _docs(seed=6, noise=0.5)
    p = summarize(pair_documents(ref, var))["kl"].percentiles
    for name in ("p50", "p90", "p99"):
        est, lo, hi = p[name]
        assert lo <= est <= hi and lo < hi
    assert p["max"][0] >= p["p99"][0] >= p["p50"][0]


def test_token_mismatch_raises_a_clear_error():
    ref, var, _ = _docs(seed=7, noise=0.1, n_docs=2)
    d = var[1]
    shifted = DocumentLogprobs(d.doc_id, (d.token_ids[0] + 1, *d.token_ids[1:]), d.top_ids, d.top_logprobs,
                               d.ref_logprobs)
    with pytest.raises(ValueError, match=r"document 1: .*first different at position 0.*tokenizers"):
        pair_documents(ref, [var[0], shifted])
    with pytest.raises(ValueError, match="different text sets"):
        pair_documents(ref, var[:1])


def _choice(sent, entries):
    return {"prompt_token_ids": sent, "prompt_logprobs": [None, *entries]}


def test_parse_vllm_prompt_logprobs():
    sent = [5, 7, 9]
    entries = [
        {"7": {"logprob": -0.5, "rank": 1}, "3": {"logprob": -1.5, "rank": 2}},
        {"1": {"logprob": -0.2, "rank": 1}, "3": {"logprob": -2.0, "rank": 2}, "9": {"logprob": -4.0, "rank": 7}},
    ]
    doc = parse_prompt_logprobs(0, sent, _choice(sent, entries), top_k=2)
    assert doc.top_ids.tolist() == [[7, 3], [1, 3]]
    assert doc.ref_logprobs.tolist() == [-0.5, -4.0]
    with pytest.raises(ValueError, match="sent 3 token ids, the server scored 4"):
        parse_prompt_logprobs(0, sent, _choice([1, *sent], [None, *entries]), top_k=2)
    with pytest.raises(EvaluationError, match="asked for top 3"):
        parse_prompt_logprobs(0, sent, _choice(sent, entries), top_k=3)
    with pytest.raises(EvaluationError, match="no prompt_token_ids"):
        parse_prompt_logprobs(0, sent, {"prompt_logprobs": [None, *entries]}, top_k=2)


def test_document_record_round_trip():
    ref, _, _ = _docs(seed=8, noise=0.0, n_docs=1)
    back = DocumentLogprobs.from_record(ref[0].to_record())
    assert back.token_ids == ref[0].token_ids
    assert np.allclose(back.top_logprobs, ref[0].top_logprobs, atol=1e-6)


def test_matrix_distribution_section_is_strict():
    base = {
        "models": [{"name": "m", "source": {"kind": "local", "path": "/nonexistent"},
                    "variants": [{"name": "bf16", "format": "bf16"}]}],
        "tasks": [{"name": "hellaswag", "metric": "acc_norm"}],
    }
    m = Matrix.model_validate({**base, "distribution": {"documents": 8, "tokens": 256}})
    assert m.distribution == DistributionSet(documents=8, tokens=256)
    with pytest.raises(ValidationError, match="top_k"):
        Matrix.model_validate({**base, "distribution": {"top_k": 50}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        Matrix.model_validate({**base, "distribution": {"documnets": 8}})


def test_verdict_plugs_into_the_policy_as_a_judgement():
    from quantgate.gates.outcome import Outcome

    ref, var, _ = _docs(seed=9, noise=2.0)
    s = summarize(pair_documents(ref, var))
    v = distribution_gate(s, "top1_agreement_min", 0.9)
    assert (v.gate_name, v.outcome) == ("top1_agreement", Outcome.FAIL)
    p = v.parameters
    assert (p.floor, p.n, p.unit, p.level) == (0.9, 12, "agreement", 0.95)
    assert p.mdd is not None and 0 < p.mdd < 1
    assert distribution_gate(s, "mean_kl_max", 10.0).outcome == Outcome.PASS


def test_scoring_sends_the_servers_api_key_and_names_a_refusal():
    """Every server demands its own API key (engines/vllm_server.py): the teacher-forcing client must send it.
    A stand-in HTTP server on 127.0.0.1 answers like vLLM when the bearer token is right and 401 otherwise."""
    import http.server
    import json
    import threading

    from quantgate.evaluation.distribution import score_chunks

    sent = [5, 7, 9]
    entries = [{"7": {"logprob": -0.5, "rank": 1}, "3": {"logprob": -1.5, "rank": 2}},
               {"9": {"logprob": -0.2, "rank": 1}, "3": {"logprob": -2.0, "rank": 2}}]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ok = self.headers.get("Authorization") == "Bearer s3cret" and body["prompt"] == sent
            payload = {"choices": [_choice(sent, entries)]} if ok else {"error": "Unauthorized"}
            data = json.dumps(payload).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
    try:
        docs = score_chunks(url, "m", [(0, 0, sent)], top_k=2, api_key="s3cret")
        assert docs[0].ref_logprobs.tolist() == [-0.5, -0.2]
        with pytest.raises(EvaluationError, match="HTTP 401"):
            score_chunks(url, "m", [(0, 0, sent)], top_k=2, api_key=None)
    finally:
        server.shutdown()

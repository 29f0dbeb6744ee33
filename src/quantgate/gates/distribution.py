"""Distribution metrics of a variant against its BF16 baseline, from teacher-forced top-k prompt logprobs.

The comparison llama.cpp's ``llama-perplexity --kl-divergence`` makes (mean KL divergence, top-1 token
agreement, percentiles of the change in the reference token's probability), computed from what an
OpenAI-compatible server returns: per position, the k most probable next tokens with their log-probabilities,
plus the log-probability of the token that actually follows (the reference token).

Every function here is pure (numpy and scipy only); the server side is in ``quantgate.evaluation.distribution``.

Units: natural logarithms throughout (KL in nats, log-probabilities in nats); probabilities in [0, 1].

Intervals are over documents, never over tokens: tokens of one document are strongly correlated, documents
(chunks of text far apart) much less so. Each document gives one paired value per metric (its mean over its
tokens, the variant and BF16 having seen the same tokens), and the interval is a Student t interval over those
per-document values (``scipy.stats.ttest_1samp(...).confidence_interval``). Percentiles of per-token values get
a document-level (cluster) bootstrap interval (``scipy.stats.bootstrap``, percentile method, resampling
documents).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from quantgate.errors import InsufficientSampleError, QuantgateError
from quantgate.gates import scipy_memo
from quantgate.gates.outcome import GateParameters, Outcome
from quantgate.gates.stats import minimum_detectable_drop
from quantgate.matrix import DistributionLimits

# Floor on a tail bucket's mass. The tail of a softmax is never exactly 0; a computed 0 (or a negative) is
# float rounding of 1 - sum(top-k), and 1e-12 keeps log(p_tail / q_tail) finite without moving any KL that
# matters (its largest effect is p_tail * log(p_tail / 1e-12) for a p_tail that is itself rounding noise).
TAIL_FLOOR = 1e-12

PERCENTILES: tuple[float, ...] = (1.0, 10.0, 50.0, 90.0, 99.0)

class TokenMismatchError(QuantgateError, ValueError):
    """The two runs did not teacher-force the same token ids, so their distributions cannot be compared."""


@dataclass(frozen=True)
class DocumentLogprobs:
    """One teacher-forced document as an engine scored it.

    ``token_ids``: the L prompt tokens. Position t (0 <= t < L-1) is the distribution over token t+1 given
    tokens 0..t, so every array below has L-1 rows.
    ``top_ids`` (L-1, k) int: the k most probable next tokens, rank 1 first.
    ``top_logprobs`` (L-1, k) float: their log-probabilities (nats).
    ``ref_logprobs`` (L-1,) float: log-probability of the token that follows (``token_ids[t + 1]``).
    """

    doc_id: int
    token_ids: tuple[int, ...]
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    ref_logprobs: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.token_ids) - 1
        if n < 1:
            raise ValueError(f"document {self.doc_id}: needs at least 2 tokens, has {len(self.token_ids)}")
        if self.top_ids.ndim != 2 or self.top_ids.shape != self.top_logprobs.shape or self.top_ids.shape[0] != n:
            raise ValueError(
                f"document {self.doc_id}: top_ids {self.top_ids.shape} and top_logprobs "
                f"{self.top_logprobs.shape} must both be ({n}, k) for {n + 1} tokens"
            )
        if self.ref_logprobs.shape != (n,):
            raise ValueError(f"document {self.doc_id}: ref_logprobs {self.ref_logprobs.shape} must be ({n},)")

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> DocumentLogprobs:
        """From one stored sample line (``quantgate.evaluation.distribution`` writes them)."""
        return cls(
            doc_id=int(rec["doc_id"]),
            token_ids=tuple(int(t) for t in rec["token_ids"]),
            top_ids=np.asarray(rec["top_ids"], dtype=np.int64),
            top_logprobs=np.asarray(rec["top_logprobs"], dtype=np.float64),
            ref_logprobs=np.asarray(rec["ref_logprobs"], dtype=np.float64),
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id,
            "token_ids": list(self.token_ids),
            "top_ids": self.top_ids.tolist(),
            "top_logprobs": [[round(float(x), 6) for x in row] for row in self.top_logprobs],
            "ref_logprobs": [round(float(x), 6) for x in self.ref_logprobs],
        }


def topk_tail_kl(
    p_ids: np.ndarray, p_logprobs: np.ndarray, q_ids: np.ndarray, q_logprobs: np.ndarray,
    ref_ids: np.ndarray, p_ref: np.ndarray, q_ref: np.ndarray,
) -> np.ndarray:
    """Per-position KL(P || Q) in nats, from each side's top-k with a tail bucket. Shape (T,).

    Inputs: ``p_ids``/``p_logprobs`` (T, k) the reference (BF16) top-k, ``q_ids``/``q_logprobs`` (T, k') the
    variant's, ``ref_ids`` (T,) the token that follows with its log-probability under each (``p_ref``,
    ``q_ref``).

    Approximation: at each position, S is the set of tokens whose probability is known on both sides (the
    intersection of the two top-k lists, plus the reference token, which both sides always report). Every other
    token is merged into one tail bucket with mass 1 - sum_S P on the P side and 1 - sum_S Q on the Q side.
    The result is the exact KL divergence of these coarse-grained distributions over S + {tail}:

        KL~ = sum_{x in S} P(x) log(P(x) / Q(x)) + P_tail log(P_tail / Q_tail)

    By the log-sum inequality (Cover & Thomas, Elements of Information Theory, 2nd ed., thm 2.7.1; the
    data-processing inequality for a deterministic merge), KL~ <= KL(P || Q) for every position: it is a
    lower bound, and its bias is exactly P_tail * KL(P(.|tail) || Q(.|tail)), the divergence inside the tail.
    The bias grows with the tail mass (a flat distribution, a small k) and with how differently the two sides
    spread the tail; docs/distribution.md gives its measured size against full-vocabulary KL. Tail masses
    below ``TAIL_FLOOR`` (float rounding of a near-complete top-k) are raised to it.
    """
    p_ids = np.asarray(p_ids)
    q_ids = np.asarray(q_ids)
    ref_ids = np.asarray(ref_ids)[:, None]
    # The reference token is one more known column on each side, unless it is already in that side's top-k.
    a_ids = np.concatenate([p_ids, ref_ids], axis=1)
    a_lp = np.concatenate([np.asarray(p_logprobs, float), np.asarray(p_ref, float)[:, None]], axis=1)
    a_valid = np.concatenate([np.ones_like(p_ids, bool), ~(p_ids == ref_ids).any(axis=1, keepdims=True)], axis=1)
    b_ids = np.concatenate([q_ids, ref_ids], axis=1)
    b_lp = np.concatenate([np.asarray(q_logprobs, float), np.asarray(q_ref, float)[:, None]], axis=1)
    b_valid = np.concatenate([np.ones_like(q_ids, bool), ~(q_ids == ref_ids).any(axis=1, keepdims=True)], axis=1)
    match = (a_ids[:, :, None] == b_ids[:, None, :]) & a_valid[:, :, None] & b_valid[:, None, :]
    in_s = match.any(axis=2)  # (T, k+1): P's known token i is known on the Q side too
    q_lp_at_a = np.where(in_s, (match * b_lp[:, None, :]).sum(axis=2), 0.0)
    p_prob = np.where(in_s, np.exp(a_lp), 0.0)
    q_prob = np.where(in_s, np.exp(q_lp_at_a), 0.0)
    head = (p_prob * np.where(in_s, a_lp - q_lp_at_a, 0.0)).sum(axis=1)
    p_tail = np.maximum(1.0 - p_prob.sum(axis=1), TAIL_FLOOR)
    q_tail = np.maximum(1.0 - q_prob.sum(axis=1), TAIL_FLOOR)
    return head + p_tail * np.log(p_tail / q_tail)


@dataclass(frozen=True)
class DocumentMetrics:
    """Per-token paired metrics of one document. Every array has one entry per scored position."""

    doc_id: int
    kl: np.ndarray  # KL~(P_bf16 || Q_variant), nats
    top1_agree: np.ndarray  # 1.0 where both sides rank the same token first
    delta_logp: np.ndarray  # log Q(ref) - log P(ref), nats; negative: the variant likes the text less
    delta_p: np.ndarray  # Q(ref) - P(ref), llama.cpp's "Δp"


def document_metrics(reference: DocumentLogprobs, variant: DocumentLogprobs) -> DocumentMetrics:
    """The paired metrics of one document; raises TokenMismatchError if the two saw different tokens."""
    if reference.token_ids != variant.token_ids:
        first = next(
            (i for i, (a, b) in enumerate(zip(reference.token_ids, variant.token_ids, strict=False)) if a != b),
            min(len(reference.token_ids), len(variant.token_ids)),
        )
        raise TokenMismatchError(
            f"document {reference.doc_id}: the reference scored {len(reference.token_ids)} tokens and the "
            f"variant {len(variant.token_ids)}, first different at position {first}; distributions over "
            "different token sequences cannot be compared (different tokenizers, or a different text set)"
        )
    ref_next = np.asarray(reference.token_ids[1:], dtype=np.int64)
    kl = topk_tail_kl(
        reference.top_ids, reference.top_logprobs, variant.top_ids, variant.top_logprobs,
        ref_next, reference.ref_logprobs, variant.ref_logprobs,
    )
    return DocumentMetrics(
        doc_id=reference.doc_id,
        kl=kl,
        top1_agree=(reference.top_ids[:, 0] == variant.top_ids[:, 0]).astype(float),
        delta_logp=variant.ref_logprobs - reference.ref_logprobs,
        delta_p=np.exp(variant.ref_logprobs) - np.exp(reference.ref_logprobs),
    )


def pair_documents(
    reference: Sequence[DocumentLogprobs], variant: Sequence[DocumentLogprobs]
) -> list[DocumentMetrics]:
    """Metrics per document, matched by ``doc_id``; both sides must hold the same documents and tokens."""
    ref = {d.doc_id: d for d in reference}
    var = {d.doc_id: d for d in variant}
    if set(ref) != set(var):
        raise TokenMismatchError(
            f"the reference holds documents {sorted(ref)[:8]}... ({len(ref)}) and the variant "
            f"{sorted(var)[:8]}... ({len(var)}): they were scored on different text sets"
        )
    return [document_metrics(ref[i], var[i]) for i in sorted(ref)]


@dataclass(frozen=True)
class MetricSummary:
    """A metric's estimate over documents: mean of per-document means with a t interval over documents,
    and percentiles of the pooled per-token values with document-bootstrap intervals.

    ``percentiles`` ("p99" -> (estimate, low, high), see ``percentile_intervals``) is computed on first use
    from ``per_document_tokens`` (one array of per-token values per document) and ``seed``: its bootstrap
    (5 percentiles x 999 resamples per metric) is most of the cost of a summary, and no gate, verdict or
    table reads it, so a run that only gates (a warm rerun included) never pays for it.
    """

    name: str
    mean: float
    low: float
    high: float
    level: float
    n_documents: int
    n_tokens: int
    sd_documents: float  # standard deviation of the per-document means
    per_document_tokens: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    seed: int = 0

    @cached_property
    def percentiles(self) -> dict[str, tuple[float, float, float]]:
        """Percentiles of the pooled per-token values with document-bootstrap intervals (empty without
        ``per_document_tokens``)."""
        if not self.per_document_tokens:
            return {}
        return percentile_intervals(self.per_document_tokens, level=self.level, seed=self.seed)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean, "low": self.low, "high": self.high, "level": self.level,
            "n_documents": self.n_documents, "n_tokens": self.n_tokens, "sd_documents": self.sd_documents,
            "percentiles": {k: list(v) for k, v in self.percentiles.items()},
        }


def mean_interval(per_document: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): two-sided Student t interval at ``level`` for the mean of per-document values.

    One document gives no spread: the interval is (-inf, inf). Identical values give a zero-width interval.
    """
    x = np.asarray(per_document, dtype=float)
    if x.size == 0:
        raise ValueError("no documents: nothing to estimate")
    m = float(x.mean())
    if x.size < 2:
        return m, -math.inf, math.inf
    if np.ptp(x) == 0:
        return m, m, m
    low, high = scipy_memo.ttest_1samp_ci(x, level)
    return m, low, high


def percentile_intervals(
    per_document: Sequence[np.ndarray],
    qs: Sequence[float] = PERCENTILES,
    level: float = 0.95,
    n_resamples: int = 999,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Percentiles of the pooled per-token values, each with a document-level bootstrap interval.

    Keys ``p1``.. and ``max``; values (estimate, low, high). Documents are resampled with replacement
    (``scipy.stats.bootstrap``, percentile method, fixed seed) and the percentile recomputed on the pooled
    tokens of each resample, so the interval carries the correlation of tokens within a document. The max has
    no meaningful bootstrap interval (no resample exceeds it): its interval is reported as (max, max).
    """
    docs = [np.asarray(d, dtype=float) for d in per_document]
    pooled = np.concatenate(docs)
    est = np.percentile(pooled, qs)
    out: dict[str, tuple[float, float, float]] = {}
    if len(docs) >= 2:
        from scipy import stats  # here, not at import: see quantgate.gates.scipy_memo

        def stat(idx: np.ndarray) -> np.ndarray:
            return np.percentile(np.concatenate([docs[int(i)] for i in idx]), qs)

        res = stats.bootstrap(
            (np.arange(len(docs)),), stat, vectorized=False, paired=False, confidence_level=level,
            n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed),
        )
        lows, highs = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    else:
        lows, highs = np.full(len(qs), -math.inf), np.full(len(qs), math.inf)
    for q, e, lo, hi in zip(qs, est, lows, highs, strict=True):
        out[f"p{q:g}"] = (float(e), float(min(lo, e)), float(max(hi, e)))
    mx = float(pooled.max())
    out["max"] = (mx, mx, mx)
    out["min"] = (float(pooled.min()),) * 3
    return out


METRICS: tuple[str, ...] = ("kl", "top1_agree", "delta_logp", "delta_p")


def summarize(docs: Sequence[DocumentMetrics], level: float = 0.95, seed: int = 0) -> dict[str, MetricSummary]:
    """Every metric of ``METRICS`` summarized over documents (see MetricSummary)."""
    if not docs:
        raise ValueError("no documents to summarize")
    out = {}
    for name in METRICS:
        per_doc_tokens = [getattr(d, name) for d in docs]
        per_doc = np.array([v.mean() for v in per_doc_tokens])
        m, lo, hi = mean_interval(per_doc, level)
        out[name] = MetricSummary(
            name=name, mean=m, low=lo, high=hi, level=level, n_documents=len(docs),
            n_tokens=int(sum(v.size for v in per_doc_tokens)),
            sd_documents=float(per_doc.std(ddof=1)) if len(docs) > 1 else math.nan,
            per_document_tokens=tuple(per_doc_tokens), seed=seed,
        )
    return out


# ---- the gate ----------------------------------------------------------------------------------------------

# The gated statistic of each limit: which summary, and which side is bad.
LIMITS: dict[str, tuple[str, Literal["max", "min"]]] = {
    "mean_kl_max": ("kl", "max"),
    "top1_agreement_min": ("top1_agree", "min"),
    "mean_delta_logp_min": ("delta_logp", "min"),
}
# Each limit's gate name for the policy (thresholds/policy.yaml tiers) and its unit in printed parameters.
GATE_NAMES: dict[str, str] = {
    "mean_kl_max": "kl", "top1_agreement_min": "top1_agreement", "mean_delta_logp_min": "delta_logp",
}
_UNITS = {"kl": "nats", "top1_agree": "agreement", "delta_logp": "nats"}

_LABELS = {"kl": "mean KL (nats)", "top1_agree": "top-1 agreement", "delta_logp": "mean Δlogp (nats)"}


@dataclass(frozen=True)
class DistributionVerdict:
    """One distribution gate: a metric's interval over documents against a ceiling or a floor.

    ``outcome`` (the shared ``quantgate.gates.outcome.Outcome``): PASS, the whole interval is on the good side
    of the limit; FAIL, the whole interval is on the bad side (evidence of loss at ``level``); INCONCLUSIVE,
    the interval straddles the limit, and ``required_n`` documents would resolve it if the per-document spread
    and the estimate stay as measured.
    """

    outcome: Outcome
    limit_name: str
    limit: float
    summary: MetricSummary
    required_n: int | None
    label: str = ""
    source: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS

    @property
    def gate_name(self) -> str:
        """The policy's name of this gate: ``kl``, ``top1_agreement`` or ``delta_logp``."""
        return GATE_NAMES[self.limit_name]

    @property
    def parameters(self) -> GateParameters:
        """Level, limit (``floor``: a ceiling for KL), n documents, the minimum detectable change at this n
        (paired, over per-document means: ``gates.stats.minimum_detectable_drop``) and the n that resolves it."""
        s = self.summary
        metric, _ = LIMITS[self.limit_name]
        mdd = (minimum_detectable_drop(s.sd_documents, s.n_documents, s.level)
               if s.n_documents > 1 and math.isfinite(s.sd_documents) else None)
        return GateParameters(level=s.level, floor=self.limit, n=s.n_documents, mdd=mdd,
                              n_needed=self.required_n, unit=_UNITS[metric])

    def message(self) -> str:
        s = self.summary
        metric, side = LIMITS[self.limit_name]
        op = "<=" if side == "max" else ">="
        name = f" {self.label}" if self.label else ""
        lines = [
            f"{self.outcome.label}{name}: {_LABELS[metric]} {op} {self.limit:.4g} at {100 * s.level:.0f}% "
            f"confidence",
            f"  estimate   {s.mean:.4g} [{s.low:.4g}, {s.high:.4g}] over n = {s.n_documents} documents "
            f"({s.n_tokens} tokens), t interval over per-document means",
        ]
        if self.outcome is Outcome.PASS:
            lines.append(f"  verdict    the whole interval is {op} {self.limit:.4g}")
        elif self.outcome is Outcome.FAIL:
            lines.append(f"  verdict    the whole interval is beyond {self.limit:.4g}: evidence of loss")
        else:
            lines.append(f"  verdict    the interval straddles {self.limit:.4g}")
        power = f"  power      this n resolves a gap of {s.half_width:.3g} from the limit"
        if self.outcome is not Outcome.PASS:
            power += (f"; n >= {self.required_n} documents would resolve this one" if self.required_n
                      else "; no n resolves an estimate that sits on the limit")
        lines.append(power)
        if self.source:
            lines.append(f"  limit from {self.source}")
        return "\n".join(lines)

    def raise_for_status(self) -> None:
        """AssertionError on FAIL; InconclusiveError on INCONCLUSIVE; return on PASS."""
        if self.outcome is Outcome.FAIL:
            raise AssertionError(self.message())
        if self.outcome is Outcome.INCONCLUSIVE:
            raise InconclusiveError(self.message())


class InconclusiveError(InsufficientSampleError):
    """A distribution gate's interval straddles its limit: more documents are needed to decide.

    A subclass of InsufficientSampleError, so it is reported like the retention gates' "insufficient"."""


def required_documents(summary: MetricSummary, limit: float) -> int | None:
    """Documents needed for the interval to clear ``limit`` if the mean and spread stay as measured.

    The half-width shrinks as 1/sqrt(n) (normal approximation of the t interval), so
    n_needed = n * (half_width / |mean - limit|)^2, rounded up. None when the mean sits on the limit or the
    spread is undefined.
    """
    gap = abs(summary.mean - limit)
    hw = summary.half_width
    if gap == 0 or not math.isfinite(hw):
        return None
    return max(2, math.ceil(summary.n_documents * (hw / gap) ** 2))


def distribution_gate(
    summaries: Mapping[str, MetricSummary], limit_name: str, limit: float, *, label: str = "", source: str = ""
) -> DistributionVerdict:
    """Judge one limit (a key of ``LIMITS``) against the metric's interval. See DistributionVerdict."""
    if limit_name not in LIMITS:
        raise ValueError(f"unknown distribution limit {limit_name!r}; known: {sorted(LIMITS)}")
    metric, side = LIMITS[limit_name]
    s = summaries[metric]
    good_lo, bad = (s.high <= limit, s.low > limit) if side == "max" else (s.low >= limit, s.high < limit)
    outcome = Outcome.PASS if good_lo else Outcome.FAIL if bad else Outcome.INCONCLUSIVE
    req = None if outcome is Outcome.PASS else required_documents(s, limit)
    return DistributionVerdict(outcome, limit_name, limit, s, req, label, source)


def distribution_verdicts(
    summaries: Mapping[str, MetricSummary], limits: DistributionLimits, *, label: str = ""
) -> list[DistributionVerdict]:
    """One verdict per limit the format sets (``thresholds/distribution.yaml``), in ``LIMITS`` order."""
    out = []
    for name in LIMITS:
        value = getattr(limits, name)
        if value is not None:
            out.append(distribution_gate(summaries, name, value, label=label, source=limits.source))
    return out


def overall_outcome(verdicts: Sequence[DistributionVerdict]) -> Outcome:
    """FAIL if any gate failed, else INCONCLUSIVE if any is, else PASS (no limits at all: INCONCLUSIVE)."""
    outcomes = {v.outcome for v in verdicts}
    if Outcome.FAIL in outcomes:
        return Outcome.FAIL
    if Outcome.INCONCLUSIVE in outcomes or not verdicts:
        return Outcome.INCONCLUSIVE
    return Outcome.PASS

"""Paired statistics: the variant and its baseline answer the same items, so compare them item by item.

Retention is a ratio (variant / base, or base / variant for lower-is-better metrics) and its interval uses
the pairing, which is what makes it narrow: two runs that agree on 90% of items differ far less than two
independent samples of the same accuracy would.

* 0/1 metrics: Tang's asymptotic score interval for a ratio of paired proportions (Tang, Tang & Chan,
  Stat. Med. 2003). It is closed form up to a 1-d root, has near-nominal one-sided coverage down to small
  counts, and stays finite-width when no item flips (n identical answers give ``n11 / (n11 + z^2)``, not
  ``[1, 1]``).
* Continuous or ratio-of-sums metrics (per-doc log-likelihood, perplexity): a seeded, vectorised paired
  bootstrap over documents (percentile interval).
* Task averages: a stratified paired bootstrap (items resampled within each task).

Run ``python -m quantgate.gates.stats`` for the resolution table quoted in docs/gates.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from quantgate.gates import scipy_memo

Aggregate = Literal["mean", "perplexity"]
Method = Literal["auto", "score", "bootstrap"]

# Below this many items a percentile bootstrap under-covers badly and a zero-variance sample (identical
# outputs) would look infinitely precise; bootstrap-based gates report "insufficient" instead.
MIN_BOOTSTRAP_N = 30

# Elements of one bootstrap index matrix: bounds memory to ~32 MB whatever n and n_boot are.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class PairedEstimate:
    """Retention of a variant against its baseline on paired items, with a two-sided interval at ``level``.

    ``flips_down`` counts items where the variant is worse than the base (for 0/1 metrics: base right,
    variant wrong), ``flips_up`` the reverse. ``mcnemar_p`` is the exact two-sided McNemar p-value on those
    discordant items (for continuous metrics it is the same binomial test: the sign test).
    ``estimate``/``low``/``high`` are NaN when retention is undefined; ``note`` then says why.
    ``item_var`` (bootstrap methods) is the per-item variance of log-retention: Var(log R) ~ item_var / n.
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    base_mean: float
    variant_mean: float
    flips_down: int
    flips_up: int
    mcnemar_p: float
    method: str
    higher_is_better: bool = True
    discordance: float = 0.0
    item_var: float = 0.0
    binary: bool = True
    n_tasks: int = 1
    note: str = ""

    @property
    def defined(self) -> bool:
        return not self.note and math.isfinite(self.estimate)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def describe_method(self) -> str:
        return {
            "score": "Tang score interval for a paired ratio (0/1 items)",
            "bootstrap": "paired bootstrap over documents, percentile interval",
            "stratified-bootstrap": f"paired bootstrap within {self.n_tasks} tasks, percentile interval",
            "cluster-bootstrap": "paired bootstrap over subjects (clusters), percentile interval",
        }.get(self.method, self.method)

    def log_item_var(self) -> float:
        """Per-item variance of log-retention, Var(log R) ~ this / n (NaN when retention is undefined).

        Bootstrap methods carry it (``item_var``). For the score interval (0/1 items) it is the delta-method
        value of a variant with the observed discordance d, d / p^2, floored at the no-flip variance.
        """
        if not self.defined:
            return math.nan
        if self.item_var > 0 or not self.binary:
            return self.item_var
        d = max(self.discordance, _no_flip_discordance(self.n, _z(self.level)))
        return d / self.base_mean**2 if self.base_mean > 0 else math.nan

    def mdd(self, power: float = 0.8) -> float:
        """Minimum detectable drop of retention at this n (a fraction of the base score); see
        ``minimum_detectable_drop``."""
        v = self.log_item_var()
        if not math.isfinite(v) or self.n == 0:
            return math.nan
        return minimum_detectable_drop(math.sqrt(v), self.n, self.level, power, log_scale=True)

    def required_n(self, floor: float) -> int | None:
        """Items needed for the interval of a lossless variant to resolve ``floor`` (see docs/gates.md).

        None when retention is undefined (no number of items is meaningful until the base scores > 0).
        """
        _check_floor(floor)
        if not self.defined:
            return None
        if self.method == "score":
            # The lossless reference has the base's own rate of ones in the ratio's denominator.
            p = self.base_mean
            return required_n(p, self.discordance, floor, self.level) if p > 0 else None
        z = _z(self.level)
        return max(MIN_BOOTSTRAP_N, math.ceil(z * z * self.item_var / math.log(floor) ** 2 - 1e-9))


@dataclass(frozen=True)
class PairedChange:
    """Change of a score between two runs on the same items (``after - before``), for the regression gate.

    ``p_value`` is one-sided, against a change in the worse direction. The interval is two-sided at
    ``interval_level = 2 * level - 1`` so that it excludes 0 when a one-sided test at ``1 - level`` rejects
    (up to the difference between the interval's and the test's methods).
    """

    before: float
    after: float
    change: float
    low: float
    high: float
    interval_level: float
    p_value: float
    test: str
    n: int
    flips_down: int
    flips_up: int
    binary: bool
    higher_is_better: bool = True
    diff_sd: float = math.nan  # standard deviation of the per-item change (after - before)

    def mdd(self, level: float, power: float = 0.8) -> float:
        """Minimum detectable drop of the score at this n, in the metric's units (one-sided test at
        ``1 - level``); see ``minimum_detectable_drop``."""
        if not math.isfinite(self.diff_sd) or self.n == 0:
            return math.nan
        return minimum_detectable_drop(self.diff_sd, self.n, 2 * level - 1, power)

    @property
    def drop(self) -> float:
        """Loss in the metric's own units: positive when the current run is worse."""
        return -self.change if self.higher_is_better else self.change


# ---------------------------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=64)
def _z(level: float) -> float:
    return scipy_memo.norm_ppf(0.5 + level / 2)


def _check_level(level: float) -> None:
    if not 0.5 < level < 1:
        raise ValueError(f"level must be in (0.5, 1), got {level!r}")


def _check_floor(floor: float) -> None:
    # A floor of 1 (or more) can never be resolved by a finite sample: the lossless variant sits on it.
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor!r}")


def _as_values(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of per-item values, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} has a non-finite value at position {bad}: {a[bad]!r}")
    return a


def _paired_values(a: ArrayLike, b: ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_values(a, names[0]), _as_values(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must score the same items: {x.size} vs {y.size} values")
    return x, y


def _is_binary(a: np.ndarray) -> bool:
    return bool(np.all((a == 0) | (a == 1)))


def _sign_test_p(worse: int, better: int) -> float:
    """Exact two-sided McNemar (sign test) p-value on the discordant pairs.

    A fast path for ``scipy.stats.binomtest(worse, worse + better, 0.5).pvalue`` (the maintained exact test;
    tests/selftest/test_gates.py checks they agree): at p = 1/2 the binomial is symmetric, so the two-sided p
    is twice the smaller tail. One cdf call is ~10x faster, which matters to the calibration self-test that
    runs the gate thousands of times.
    """
    m = worse + better
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * scipy_memo.binom_cdf(min(worse, better), m, 0.5)))


def _no_flip_discordance(n: float, z: float) -> float:
    """Wilson upper bound on the discordance rate when no item flipped: z^2 / (n + z^2).

    Used as a floor on the per-item variance of 0/1 data, so that identical answers never look infinitely
    precise; it reproduces, to first order, the score interval's own width at zero flips.
    """
    return z * z / (n + z * z)


def _percentile_bounds(r: np.ndarray, level: float) -> tuple[float, float]:
    # Order statistics rather than interpolation, so that an infinite resample cannot poison a finite bound.
    r = np.sort(np.where(np.isnan(r), np.inf, r))
    b = r.size
    a = (1 - level) / 2
    lo = r[min(b - 1, int(math.floor(a * b)))]
    hi = r[max(0, int(math.ceil((1 - a) * b)) - 1)]
    return float(lo), float(hi)


def _resample_sums(rng: np.random.Generator, n_boot: int, *cols: np.ndarray) -> list[np.ndarray]:
    """Column sums over ``n_boot`` resamples of the rows (documents), drawn in memory-bounded chunks.

    Rows are resampled jointly across the columns, which is what keeps the pairing.
    """
    n = cols[0].size
    rows, counts = np.unique(np.column_stack(cols), axis=0, return_counts=True)
    if len(rows) * 4 <= n:
        # Few distinct rows (0/1 pairs have at most 4): resampling n rows with replacement is exactly a
        # multinomial draw over the distinct rows, O(n_boot * k) instead of O(n_boot * n).
        draws = rng.multinomial(n, counts / n, size=n_boot)
        sums = draws @ rows
        return [sums[:, j].astype(float) for j in range(len(cols))]
    out = [np.empty(n_boot) for _ in cols]
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        idx = rng.integers(0, n, size=(stop - start, n))
        for o, c in zip(out, cols, strict=True):
            o[start:stop] = c[idx].sum(axis=1)
    return out


def _ratio(sb: Any, sv: Any, sw: Any, aggregate: str, hib: bool) -> Any:
    """Retention from sums over documents; shared by the point estimate and every bootstrap resample."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if aggregate == "perplexity":
            # ppl = exp(-sum ll / sum w); retention = ppl_base / ppl_variant.
            return np.exp((np.asarray(sv) - np.asarray(sb)) / np.asarray(sw))
        num, den = (sv, sb) if hib else (sb, sv)
        return np.asarray(num, dtype=float) / np.asarray(den, dtype=float)


# ------------------------------------------------------------------------------------- Tang score interval


def _tang_statistic(phi: float, n11: float, n12: float, n21: float, n: float) -> float:
    """Score statistic for H0: (n11 + n12) / (n11 + n21) = phi, with Tang's constrained MLE of p21."""
    a = n * (1 + phi)
    b = (n11 + n21) * phi * phi - (n11 + n12 + 2 * n21)
    c = n21 * (1 - phi) * (n11 + n12 + n21) / n
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))
    # Larger root of a p^2 + b p + c, in the form that does not cancel when b > 0.
    p21 = (-b + root) / (2 * a) if b <= 0 else 2 * c / (-b - root)
    var = n * (1 + phi) * p21 + (n11 + n12 + n21) * (phi - 1)
    num = (n11 + n12) - (n11 + n21) * phi
    if num == 0:
        return 0.0
    return num / math.sqrt(max(var, 1e-300))


def tang_interval(n11: float, n12: float, n21: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Two-sided score interval for the ratio (n11 + n12) / (n11 + n21) of paired proportions.

    ``n11``: both items 1; ``n12``: numerator-only 1; ``n21``: denominator-only 1; ``n``: all pairs.
    Counts may be fractional (expected tables, used for planning). The roots come from
    ``scipy.optimize.brentq``; a Run keeps the interval in its scipy memo (quantgate.gates.scipy_memo).
    """
    _check_level(level)
    if n <= 0 or n11 + n21 <= 0:
        raise ValueError("the ratio is undefined: the denominator proportion is 0")
    args = (float(n11), float(n12), float(n21), float(n), float(level))
    return scipy_memo.memoized("tang_interval", _tang_interval, *args)


def _tang_interval(n11: float, n12: float, n21: float, n: float, level: float) -> tuple[float, float]:
    from scipy import optimize  # here, not at import: see quantgate.gates.scipy_memo

    z = _z(level)
    est = (n11 + n12) / (n11 + n21)
    log_min, log_max = math.log(1e-12), math.log(1e12)

    def f(t: float, target: float) -> float:
        return _tang_statistic(math.exp(t), n11, n12, n21, n) - target

    # The statistic is 0 at the estimate and falls as phi grows: bracket each root by doubling steps.
    if est == 0:
        low, t_est = 0.0, log_min
    else:
        t_est, step = math.log(est), 0.25
        while f(t_est - step, z) <= 0 and t_est - step > log_min:
            step *= 2
        lo_t = max(t_est - step, log_min)
        low = 0.0 if f(lo_t, z) <= 0 else math.exp(optimize.brentq(f, lo_t, t_est, args=(z,), xtol=1e-12))
    step = 0.25
    while f(t_est + step, -z) >= 0 and t_est + step < log_max:
        step *= 2
    hi_t = min(t_est + step, log_max)
    high = math.inf if f(hi_t, -z) >= 0 else math.exp(optimize.brentq(f, t_est, hi_t, args=(-z,), xtol=1e-12))
    return low, high


# ----------------------------------------------------------------------------------------- retention


def paired_retention(
    base: ArrayLike,
    variant: ArrayLike,
    *,
    level: float = 0.95,
    weights: ArrayLike | None = None,
    higher_is_better: bool = True,
    aggregate: Aggregate = "mean",
    method: Method = "auto",
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedEstimate:
    """Retention of ``variant`` against ``base`` on the same items (position i is the same doc id in both).

    ``aggregate="mean"``: the score is ``sum(x) / sum(weights)`` (a plain mean without weights).
    ``aggregate="perplexity"``: per-doc values are log-likelihood sums, ``weights`` the per-doc token or word
    counts, the score is ``exp(-sum ll / sum w)`` and retention is ``ppl_base / ppl_variant``.
    ``method="auto"`` uses the score interval for unweighted 0/1 data and the paired bootstrap otherwise.
    An undefined retention (no items, base score 0) returns NaNs with ``note`` saying why; it never raises
    for that, so that the gate can report "insufficient".
    """
    _check_level(level)
    b, v = _paired_values(base, variant, ("base", "variant"))
    n = b.size
    if weights is None:
        w = np.ones(n)
    else:
        w = _as_values(weights, "weights")
        if w.shape != b.shape:
            raise ValueError(f"weights must have one value per item: {w.size} vs {n}")
        if np.any(w <= 0):
            raise ValueError("weights must be positive (tokens or words per document)")
    if aggregate == "perplexity":
        if weights is None:
            raise ValueError("aggregate='perplexity' needs weights (tokens or words per document)")
        if higher_is_better:
            raise ValueError("perplexity is lower-is-better: pass higher_is_better=False")
    elif aggregate != "mean":
        raise ValueError(f"aggregate must be 'mean' or 'perplexity', got {aggregate!r}")
    if method not in ("auto", "score", "bootstrap"):
        raise ValueError(f"method must be 'auto', 'score' or 'bootstrap', got {method!r}")
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot} is too few resamples for a percentile interval (use >= 100)")

    binary = weights is None and aggregate == "mean" and _is_binary(b) and _is_binary(v)
    if method == "auto":
        method = "score" if binary else "bootstrap"
    if method == "score" and not binary:
        raise ValueError("method='score' needs unweighted 0/1 values; use method='bootstrap'")

    # Per-doc comparison in raw units: log-likelihoods are higher-is-better even though perplexity is not.
    raw_hib = higher_is_better if aggregate == "mean" else True
    worse = int(np.sum(v < b)) if raw_hib else int(np.sum(v > b))
    better = int(np.sum(v > b)) if raw_hib else int(np.sum(v < b))
    common = _flip_fields(level, n, worse, better, method, binary, higher_is_better=higher_is_better)
    if n == 0:
        return _undefined(common, math.nan, math.nan, "no items were evaluated")

    sb, sv, sw = float(b.sum()), float(v.sum()), float(w.sum())
    if aggregate == "perplexity":
        base_m, var_m = math.exp(-sb / sw), math.exp(-sv / sw)
    else:
        base_m, var_m = sb / sw, sv / sw
        why = _ratio_problem(base_m, var_m, higher_is_better, f"score over n = {n} items")
        if why:
            return _undefined(common, base_m, var_m, why)
    est = float(_ratio(sb, sv, sw, aggregate, higher_is_better))

    if method == "score":
        # Tang's table orientation: n12 counts items that are 1 only in the ratio's numerator, which is an
        # improvement in either direction (variant right for accuracy, base wrong for an error rate).
        n11 = float(np.sum(b * v))
        low, high = tang_interval(n11, float(better), float(worse), n, level)
        item_var = 0.0
    else:
        rng = np.random.default_rng(seed)
        rb, rv, rw = _resample_sums(rng, n_boot, b, v, w)
        low, high = _percentile_bounds(np.asarray(_ratio(rb, rv, rw, aggregate, higher_is_better)), level)
        item_var = _item_var([(b, v, w)], aggregate, level, binary)
        if binary:
            low, high = _widen(est, low, high, item_var, n, level)
    return PairedEstimate(
        estimate=est, low=low, high=high, base_mean=base_m, variant_mean=var_m, item_var=item_var, **common
    )


def _ratio_problem(base_m: float, var_m: float, hib: bool, what: str) -> str:
    den_name, den, num = ("base", base_m, var_m) if hib else ("variant", var_m, base_m)
    if den <= 0:
        return f"the {den_name} {what} is {den:.4g}, so retention (a ratio) is undefined"
    if num < 0:
        return f"a {what} is negative ({num:.4g}), so retention (a ratio) is meaningless"
    return ""


def _flip_fields(
    level: float, n: int, worse: int, better: int, method: str, binary: bool, **extra: Any
) -> dict[str, Any]:
    """The PairedEstimate fields every estimator shares: n, the flips both ways with their sign-test p-value,
    the discordance (flips / n; 0 for no items) and the method; ``extra`` adds estimator-specific fields."""
    return dict(
        level=level, n=n, flips_down=worse, flips_up=better, mcnemar_p=_sign_test_p(worse, better),
        method=method, discordance=(worse + better) / n if n else 0.0, binary=binary, **extra,
    )


def _undefined(common: dict[str, Any], base_m: float, var_m: float, why: str) -> PairedEstimate:
    nan = math.nan
    return PairedEstimate(
        estimate=nan, low=nan, high=nan, base_mean=base_m, variant_mean=var_m, note=why, **common
    )


def _item_var(
    tasks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], aggregate: str, level: float, binary: bool
) -> float:
    """Per-item variance of the influence on log-retention, so that Var(log R) ~ item_var / n_total.

    Equal task weights (the average of task means) give Var = sum_t var_t / (T^2 n_t). For 0/1 data the
    variance is floored at what a sample with no flips at all implies (``_no_flip_discordance``).
    """
    z = _z(level)
    t_count = len(tasks)
    n_total = sum(b.size for b, _, _ in tasks)
    if aggregate == "perplexity":
        ((b, v, w),) = tasks
        delta = (v.sum() - b.sum()) / w.sum()
        psi = ((v - b) - w * delta) / w.mean()
        return float(np.var(psi, ddof=1)) if b.size > 1 else 0.0
    a_b = float(np.mean([b.mean() for b, _, _ in tasks]))
    a_v = float(np.mean([v.mean() for _, v, _ in tasks]))
    # Callers guarantee the ratio's denominator is positive; the numerator's mean may be 0.
    den = max(a_b, a_v) if min(a_b, a_v) <= 0 else min(a_b, a_v)
    total = 0.0
    for b, v, _ in tasks:
        psi = (v / a_v if a_v > 0 else 0.0) - (b / a_b if a_b > 0 else 0.0)
        var_t = float(np.var(psi, ddof=1)) if b.size > 1 else 0.0
        if binary:
            var_t = max(var_t, _no_flip_discordance(b.size, z) / den**2)
        total += var_t / (t_count**2 * b.size)
    return n_total * total


def paired_retention_average(
    tasks: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    level: float = 0.95,
    higher_is_better: bool = True,
    seed: int = 0,
    n_boot: int = 2000,
) -> PairedEstimate:
    """Retention of the average over tasks of per-task means (the AVG column of a score table).

    Each task weighs the same whatever its size. The interval comes from a paired bootstrap that resamples
    items within each task independently. Flips and the McNemar/sign-test p-value are pooled over all items.
    """
    _check_level(level)
    if not tasks:
        raise ValueError("paired_retention_average needs at least one task")
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot} is too few resamples for a percentile interval (use >= 100)")
    arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for i, (tb, tv) in enumerate(tasks):
        b, v = _as_values(tb, f"task {i} base"), _as_values(tv, f"task {i} variant")
        if b.shape != v.shape:
            raise ValueError(f"task {i}: base and variant must score the same items: {b.size} vs {v.size}")
        arrays.append((b, v, np.ones(b.size)))
    n = sum(b.size for b, _, _ in arrays)
    worse = sum(int(np.sum(v < b if higher_is_better else v > b)) for b, v, _ in arrays)
    better = sum(int(np.sum(v > b if higher_is_better else v < b)) for b, v, _ in arrays)
    binary = all(_is_binary(b) and _is_binary(v) for b, v, _ in arrays)
    common = _flip_fields(level, n, worse, better, "stratified-bootstrap", binary,
                          higher_is_better=higher_is_better, n_tasks=len(arrays))
    empty = [i for i, (b, _, _) in enumerate(arrays) if b.size == 0]
    if empty:
        return _undefined(common, math.nan, math.nan, f"task(s) {empty} have no items: mean undefined")
    a_b = float(np.mean([b.mean() for b, _, _ in arrays]))
    a_v = float(np.mean([v.mean() for _, v, _ in arrays]))
    why = _ratio_problem(a_b, a_v, higher_is_better, "task average")
    if why:
        return _undefined(common, a_b, a_v, why)

    rng = np.random.default_rng(seed)
    boot_b = np.zeros(n_boot)
    boot_v = np.zeros(n_boot)
    for b, v, _ in arrays:
        rb, rv = _resample_sums(rng, n_boot, b, v)
        boot_b += rb / b.size
        boot_v += rv / b.size
    t_count = len(arrays)
    ratios = np.asarray(_ratio(boot_b / t_count, boot_v / t_count, 1.0, "mean", higher_is_better))
    low, high = _percentile_bounds(ratios, level)
    est = float(_ratio(a_b, a_v, 1.0, "mean", higher_is_better))
    item_var = _item_var(arrays, "mean", level, binary)
    if binary:
        low, high = _widen(est, low, high, item_var, n, level)
    return PairedEstimate(
        estimate=est, low=low, high=high, base_mean=a_b, variant_mean=a_v, item_var=item_var, **common
    )


def paired_retention_clustered(
    base: ArrayLike,
    variant: ArrayLike,
    clusters: Sequence[Any],
    *,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedEstimate:
    """Retention of mean scores on items grouped in clusters (MMLU: its subjects), with a cluster bootstrap.

    Items of one subject are not independent draws (one subject can be hard for a variant as a whole), so the
    interval resamples whole clusters with replacement, keeping each cluster's items paired (Field & Welsh,
    "Bootstrapping clustered data", JRSS-B 2007), the clustered interval NeMo Evaluator reports for
    subject-structured tasks. ``item_var`` is the cluster-robust (sandwich) delta-method variance of log R,
    ``n * sum_c (sum_{i in c} psi_i)^2 / n^2`` with ``psi_i = v_i / mean(v) - b_i / mean(b)``, floored for 0/1
    items at the no-flip variance, so ``required_n`` and ``mdd`` account for the clustering. With one item per
    cluster this is the paired bootstrap. Undefined retention returns NaNs with ``note``, as ``paired_retention``.
    """
    _check_level(level)
    b, v = _paired_values(base, variant, ("base", "variant"))
    labels = np.asarray(list(clusters), dtype=object)
    if labels.shape != b.shape:
        raise ValueError(f"clusters must label every item: {labels.size} labels for {b.size} items")
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot} is too few resamples for a percentile interval (use >= 100)")
    n = b.size
    worse, better = int(np.sum(v < b)), int(np.sum(v > b))
    binary = _is_binary(b) and _is_binary(v)
    _, inverse = np.unique(labels.astype(str), return_inverse=True)
    k = int(inverse.max()) + 1 if n else 0
    common = _flip_fields(level, n, worse, better, "cluster-bootstrap", binary, n_tasks=1)
    if n == 0:
        return _undefined(common, math.nan, math.nan, "no items were evaluated")
    base_m, var_m = float(b.mean()), float(v.mean())
    why = _ratio_problem(base_m, var_m, True, f"score over n = {n} items")
    if why:
        return _undefined(common, base_m, var_m, why)
    if k < 5:
        return _undefined(common, base_m, var_m, f"only {k} cluster(s): a cluster bootstrap needs at least 5")
    sb = np.bincount(inverse, weights=b, minlength=k)
    sv = np.bincount(inverse, weights=v, minlength=k)
    sn = np.bincount(inverse, minlength=k).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(k, np.full(k, 1 / k), size=n_boot)  # clusters drawn with replacement
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (draws @ sv) / (draws @ sn) / ((draws @ sb) / (draws @ sn))
    low, high = _percentile_bounds(np.asarray(ratios), level)
    est = var_m / base_m
    psi = v / var_m - b / base_m if var_m > 0 else -b / base_m
    per_cluster = np.bincount(inverse, weights=psi, minlength=k)
    item_var = float(n * np.sum(per_cluster**2) / n**2) * k / max(k - 1, 1)
    if binary:
        item_var = max(item_var, _no_flip_discordance(n, _z(level)) / min(base_m, var_m or base_m) ** 2)
        low, high = _widen(est, low, high, item_var, n, level)
    return PairedEstimate(
        estimate=est, low=low, high=high, base_mean=base_m, variant_mean=var_m, item_var=item_var, **common
    )


def _widen(est: float, low: float, high: float, item_var: float, n: int, level: float) -> tuple[float, float]:
    """Union of the bootstrap interval with the continuity-floored delta interval on log-retention.

    A bootstrap of 0/1 items with no flips is the single point [1, 1]; the floored delta interval keeps
    the displayed interval as honest as the min-n rule.
    """
    if est <= 0:
        return low, high
    half = _z(level) * math.sqrt(item_var / n)
    return min(low, est * math.exp(-half)), max(high, est * math.exp(half))


# ------------------------------------------------------------------------------------------- min-n rule


def required_n(base_mean: float, discordance: float, floor: float, level: float = 0.95) -> int:
    """Smallest n at which the interval of a lossless 0/1 variant resolves ``floor``.

    "Resolve": take a variant with no true loss (same accuracy ``base_mean``) whose answers differ from the
    base on a fraction ``discordance`` of items, split evenly both ways. On its expected table, the lower
    bound of the gate's own two-sided ``level`` interval (Tang score) must be at or above ``floor``: a
    lossless variant can then be told apart from one sitting at the floor.

    The score statistic of a table scaled by n is sqrt(n) times that of the per-item table, so the answer is
    closed form: ``n = z^2 / T1(floor)^2``. It is continuity-aware: with no flips at all the bound is the
    Wilson-type ``n p / (n p + z^2)``, so identical answers still need ``n ~ z^2 floor / (p (1 - floor))``.
    Delta-method approximation once flips dominate: ``n ~ z^2 d / (p log(floor))^2``.
    """
    _check_level(level)
    _check_floor(floor)
    if not 0 < base_mean <= 1:
        raise ValueError(f"base_mean must be in (0, 1] for 0/1 items, got {base_mean!r}")
    if not 0 <= discordance <= 1:
        raise ValueError(f"discordance must be in [0, 1], got {discordance!r}")
    # A lossless variant cannot flip more items than either side has: at most 2 min(p, 1 - p).
    d = min(discordance, 2 * min(base_mean, 1 - base_mean))
    t1 = _tang_statistic(floor, base_mean - d / 2, d / 2, d / 2, 1.0)
    return max(1, math.ceil(_z(level) ** 2 / t1**2 - 1e-9))


def lossless_interval(
    n: float, base_mean: float, discordance: float, level: float = 0.95
) -> tuple[float, float]:
    """The score interval a lossless 0/1 variant gets on its expected table (flips split evenly)."""
    if n <= 0 or not 0 < base_mean <= 1:
        raise ValueError("need n > 0 and base_mean in (0, 1]")
    half = n * min(discordance, 2 * min(base_mean, 1 - base_mean)) / 2
    return tang_interval(n * base_mean - half, half, half, n, level)


def resolvable_floor(n: int, base_mean: float, discordance: float, level: float = 0.95) -> float:
    """The highest floor that ``n`` items resolve, by the same rule as ``required_n``."""
    return lossless_interval(n, base_mean, discordance, level)[0]


# ----------------------------------------------------------------------------------- regression change


def paired_change(
    before: ArrayLike,
    after: ArrayLike,
    *,
    level: float = 0.95,
    higher_is_better: bool = True,
    n_resamples: int = 5000,
    seed: int = 0,
) -> PairedChange:
    """Change of the mean between two runs on the same items, with a one-sided test for a drop.

    0/1 items: exact McNemar (binomial on discordant pairs, one-sided) and an Agresti-Min adjusted Wald
    interval for the paired difference. Continuous items: a sign-flip randomisation test on the per-item
    differences (exact enumeration when 2^n <= n_resamples) and a paired bootstrap percentile interval.
    """
    _check_level(level)
    x, y = _paired_values(before, after, ("before", "after"))
    n = x.size
    if n == 0:
        raise ValueError("no items to compare")
    if n_resamples < 100:
        raise ValueError(f"n_resamples={n_resamples} is too few (use >= 100)")
    interval_level = 1 - 2 * (1 - level)
    worse = int(np.sum(y < x if higher_is_better else y > x))
    better = int(np.sum(y > x if higher_is_better else y < x))
    binary = _is_binary(x) and _is_binary(y)
    if binary:
        discordant = worse + better
        p = 1.0 if discordant == 0 else scipy_memo.binomtest_pvalue(worse, discordant, 0.5, "greater")
        # Agresti & Min (2005): add 1/2 to each cell; keeps the interval non-degenerate with no flips.
        n10 = float(np.sum((x == 1) & (y == 0))) + 0.5
        n01 = float(np.sum((x == 0) & (y == 1))) + 0.5
        nt = n + 2.0
        centre = (n01 - n10) / nt
        se = math.sqrt(max((n10 + n01) - (n01 - n10) ** 2 / nt, 0.0)) / nt
        zc = _z(interval_level)
        low, high = max(-1.0, centre - zc * se), min(1.0, centre + zc * se)
        test = "McNemar exact, one-sided"
    else:
        rng = np.random.default_rng(seed)
        gain = (y - x) if higher_is_better else (x - y)
        p = _sign_flip_p(gain, n_resamples, rng)
        rb, ra = _resample_sums(rng, n_resamples, x, y)
        low, high = _percentile_bounds((ra - rb) / n, interval_level)
        test = "sign-flip randomisation, one-sided"
    diff = y - x
    diff_sd = float(np.std(diff, ddof=1)) if n > 1 else math.nan
    if binary:
        # No flips would give sd 0 and an mdd of 0: floor at the Wilson bound on the discordance, as the
        # retention interval does.
        diff_sd = max(diff_sd if math.isfinite(diff_sd) else 0.0,
                      math.sqrt(_no_flip_discordance(n, _z(interval_level))))
    return PairedChange(
        diff_sd=diff_sd,
        before=float(x.mean()),
        after=float(y.mean()),
        change=float(y.mean() - x.mean()),
        low=low,
        high=high,
        interval_level=interval_level,
        p_value=p,
        test=test,
        n=n,
        flips_down=worse,
        flips_up=better,
        binary=binary,
        higher_is_better=higher_is_better,
    )


def _sign_flip_p(gain: np.ndarray, n_resamples: int, rng: np.random.Generator) -> float:
    """P(sum of randomly signed gains <= observed sum): small when the observed change is a real drop.

    ``scipy.stats.permutation_test`` with one sample and ``permutation_type="samples"`` flips the signs of
    the paired differences: exact enumeration when ``2^n <= n_resamples``, otherwise a randomised test whose
    p-value is ``(1 + count) / (1 + n_resamples)``; ties within scipy's relative tolerance count as extreme.
    """
    if not np.any(gain):
        return 1.0
    from scipy import stats  # here, not at import: importing scipy.stats costs a warm rerun ~1 s

    res = stats.permutation_test(
        (gain,),
        np.sum,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="less",
        rng=rng,
    )
    return float(res.pvalue)


def minimum_detectable_drop(
    item_sd: float, n: int, level: float = 0.95, power: float = 0.8, *, log_scale: bool = False
) -> float:
    """Smallest true drop a one-sided test at ``(1 - level) / 2`` detects with probability ``power``.

    TensorRT-LLM's accuracy tests (tests/integration/defs/accuracy/README.md, "hypothesis testing") use
    ``theta = (z_alpha + z_beta) * sigma * sqrt(2 / n)`` for two independent runs of per-item standard
    deviation sigma. Our gates pair items, so the paired equivalent replaces ``sigma * sqrt(2)`` by the
    standard deviation of the per-item difference ``item_sd``: ``theta = (z_alpha + z_beta) * item_sd /
    sqrt(n)``. With ``log_scale`` the difference is in log-retention and the drop is returned as a fraction of
    the base score, ``1 - exp(-theta)``. ``level`` is the two-sided level of the gate's interval, whose
    one-sided error is ``(1 - level) / 2``, so ``z_alpha = z(level)``; ``z_beta = Phi^-1(power)``.
    """
    _check_level(level)
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n!r}")
    theta = (_z(level) + scipy_memo.norm_ppf(power)) * item_sd / math.sqrt(n)
    return -math.expm1(-theta) if log_scale else theta


# --------------------------------------------------------------------------------------------- display


def format_value_interval(estimate: float, low: float, high: float, percent: bool = True) -> str:
    """``71.8 ± 1.9 [69.9, 73.7]``: the ± is the half-width of [low, high], which may be asymmetric."""
    if not (math.isfinite(estimate) and math.isfinite(low)) or math.isnan(high):
        return "n/a (undefined)"
    scale, fmt = (100.0, "{:.1f}") if percent else (1.0, "{:.3f}")
    if math.isinf(high):
        return f"{fmt.format(estimate * scale)} [{fmt.format(low * scale)}, inf]"
    pm = fmt.format((high - low) / 2 * scale)
    return f"{fmt.format(estimate * scale)} ± {pm} [{fmt.format(low * scale)}, {fmt.format(high * scale)}]"


def format_interval(est: PairedEstimate, percent: bool = True) -> str:
    """Retention with its interval, e.g. ``97.1 ± 1.9 [95.2, 99.0]`` (percent, one decimal)."""
    return format_value_interval(est.estimate, est.low, est.high, percent)


# ------------------------------------------------------------------------------------ resolution table

# (label, n, base accuracy, discordance, floor) for the table in docs/gates.md. Discordance is an
# assumption (the fraction of items a quantized variant answers differently); the table shows its effect.
_TABLE_ROWS = [
    ("hellaswag-like", 300, 0.42, 0.10, 0.95),
    ("ifeval-like", 150, 0.30, 0.10, 0.95),
    ("gsm8k 0.6B-like", 1319, 0.45, 0.15, 0.90),
    ("gsm8k 8B-like", 1319, 0.77, 0.08, 0.90),
]


def resolution_table(level: float = 0.95) -> list[dict[str, Any]]:
    """Interval widths at typical n for a lossless variant, and the n needed for typical floors."""
    rows: list[dict[str, Any]] = []
    for task, n, p, d, floor in _TABLE_ROWS:
        lo, hi = lossless_interval(n, p, d, level)
        acc_lo, acc_hi = _wilson_interval(p * n, n, level)
        rows.append(
            {
                "task": task,
                "n": n,
                "base": p,
                "discordance": d,
                "acc_half_width": (acc_hi - acc_lo) / 2,
                "retention_low": lo,
                "retention_high": hi,
                "retention_half_width": (hi - lo) / 2,
                "resolvable_floor": lo,
                "floor": floor,
                "required_n": required_n(p, d, floor, level),
            }
        )
    return rows


def _wilson_interval(k: float, n: float, level: float) -> tuple[float, float]:
    """Wilson score interval for a proportion, from ``scipy.stats.binomtest(...).proportion_ci``.

    ``k`` is rounded to whole items: the planning rows give a base accuracy, not a count.
    """
    from scipy import stats  # here, not at import: importing scipy.stats costs a warm rerun ~1 s

    ci = stats.binomtest(int(round(k)), int(round(n))).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def gsm8k_required_n(level: float = 0.95, floor: float = 0.90) -> list[tuple[float, float, int]]:
    """(base accuracy, discordance, required n) for the GSM8K question in docs/gates.md."""
    return [
        (p, d, required_n(p, d, floor, level)) for p in (0.45, 0.77) for d in (0.0, 0.05, 0.10, 0.20, 0.30)
    ]


def main() -> None:
    print("Lossless variant, two-sided 95%, flips split evenly (acc ± = one run's Wilson half-width):")
    print(
        f"{'task':<17}{'n':>6}{'acc':>6}{'disc':>6}{'acc ±':>8}{'ret ±':>8}{'ret interval':>17}"
        f"{'floor':>7}{'needs n':>9}"
    )
    for r in resolution_table():
        interval = f"[{100 * r['retention_low']:.1f}, {100 * r['retention_high']:.1f}]"
        print(
            f"{r['task']:<17}{r['n']:>6}{r['base']:>6.2f}{r['discordance']:>6.2f}"
            f"{100 * r['acc_half_width']:>7.1f}%{100 * r['retention_half_width']:>7.1f}%{interval:>17}"
            f"{100 * r['floor']:>6.0f}%{r['required_n']:>9}"
        )
    print("\nGSM8K (1319 items): n needed to resolve a 90% retention floor at 95% confidence:")
    print(f"{'base acc':>9}{'discordance':>13}{'required n':>12}")
    for p, d, req in gsm8k_required_n():
        print(f"{p:>9.2f}{d:>13.2f}{req:>12}")


if __name__ == "__main__":
    main()

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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats

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
            "stratified-bootstrap": (
                f"paired bootstrap within each of {self.n_tasks} tasks, percentile interval"
            ),
        }.get(self.method, self.method)

    def required_n(base_mean: float, discordance: float, floor: float, level: float = 0.95) -> int:
    """Smallest n at which the interval of a lossless 0/1 variant resolves ``floor``.

    "Resolve": take a variant with no true loss (same accuracy ``base_mean``) whose answers differ from the
    base on a fraction ``discordance`` of items, split evenly both ways. On its expected table, the lower
    bound of the gate's own two-sided ``level`` interval (Tang score) must be at or above ``floor``: a
    lossless variant can then be told apart from one sitting at the floor.

    The score statistic of a table scaled by n is sqrt(n) times that of the per-item table, so the answer is
    closed form: ``n = z^2 / T1(floor)^2``. It is continuity-aware: with no flips at all the bound is the
    Wilson-type ``n p / (n p + z^2)``, so identical answers still need ``n ~ z^2 floor / (p (1 - floor))``.
    Delta-method approximation for d >> 0: ``n ~ z^2 d / (p log(floor))^2``.
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


def resolvable_floor(n: int, base_mean: float, discordance: float, level: float = 0.95) -> float:
    """The highest floor that ``n`` items resolve, by the same rule as ``required_n``."""
    if n <= 0 or not 0 < base_mean <= 1:
        raise ValueError("need n > 0 and base_mean in (0, 1]")
    return lossless_interval(n, base_mean, discordance, level)[0]


def lossless_interval(
    n: float, base_mean: float, discordance: float, level: float = 0.95
) -> tuple[float, float]:
    """The score interval a lossless 0/1 variant would get on its expected table (flips split evenly)."""
    d = min(discordance, 2 * min(base_mean, 1 - base_mean))
    half = n * d / 2
    return tang_interval(n * base_mean - half, half, half, n, level)


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
    x = _as_values(before, "before")
    y = _as_values(after, "after")
    if x.shape != y.shape:
        raise ValueError(f"before and after must score the same items: {x.size} vs {y.size}")
    n = x.size
    if n == 0:
        raise ValueError("no items to compare")
    alpha = 1 - level
    interval_level = 1 - 2 * alpha
    worse = int(np.sum(y < x if higher_is_better else y > x))
    better = int(np.sum(y > x if higher_is_better else y < x))
    change = float(y.mean() - x.mean())
    binary = _is_binary(x) and _is_binary(y)
    if binary:
        p = (
            1.0
            if worse + better == 0
            else float(stats.binomtest(worse, worse + better, 0.5, "greater").pvalue)
        )
        # Agresti & Min (2005): add 1/2 to each cell; keeps the interval non-degenerate with no flips.
        n10, n01 = float(np.sum((x == 1) & (y == 0))) + 0.5, float(np.sum((x == 0) & (y == 1))) + 0.5
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
    return PairedChange(
        before=float(x.mean()),
        after=float(y.mean()),
        change=change,
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
    """P(mean of randomly signed gains <= observed mean gain): small when the observed change is a drop."""
    n = gain.size
    observed = gain.sum()
    tol = 1e-12 * max(1.0, float(np.abs(gain).sum()))
    if 2**n <= n_resamples:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(signs @ gain <= observed + tol))
    count = 0
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, step):
        m = min(step, n_resamples - start)
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int8) * 2 - 1
        count += int(np.sum(signs @ gain <= observed + tol))
    return (1 + count) / (n_resamples + 1)


# --------------------------------------------------------------------------------------------- display


def format_value_interval(estimate: float, low: float, high: float, percent: bool = True) -> str:
    """``71.8 ± 1.9 [69.9, 73.7]``: the ± is the half-width of [low, high], which may be asymmetric."""
    if not all(math.isfinite(x) for x in (estimate, low)) or math.isnan(high):
        return "n/a (undefined)"
    scale, fmt = (100.0, "{:.1f}") if percent else (1.0, "{:.3f}")
    hi_txt = fmt.format(high * scale) if math.isfinite(high) else "inf"
    pm = fmt.format((high - low) / 2 * scale) if math.isfinite(high) else "inf"
    return f"{fmt.format(estimate * scale)} ± {pm} [{fmt.format(low * scale)}, {hi_txt}]"


def format_interval(est: PairedEstimate, percent: bool = True) -> str:
    """Retention with its interval, e.g. ``97.1 ± 1.9 [95.2, 99.0]`` (percent, one decimal)."""
    return format_value_interval(est.estimate, est.low, est.high, percent)


# ------------------------------------------------------------------------------------ resolution table


def resolution_table(level: float = 0.95) -> list[dict[str, float | int | str]]:
    """The numbers quoted in docs/gates.md: interval widths at typical n, and n needed for typical floors."""
    z = _z(level)
    rows: list[dict[str, float | int | str]] = []
    for task, n, p, d, floor in [
        ("hellaswag-like", 300, 0.42, 0.10, 0.95),
        ("ifeval-like", 150, 0.30, 0.10, 0.95),
        ("gsm8k, 0.6B-like", 1319, 0.45, 0.15, 0.90),
        ("gsm8k, 8B-like", 1319, 0.77, 0.08, 0.90),
    ]:
        lo, hi = lossless_interval(n, p, d, level)
        acc_lo, acc_hi = _wilson_interval(p * n, n, z)
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
                "resolvable_floor": resolvable_floor(n, p, d, level),
                "floor": floor,
                "required_n": required_n(p, d, floor, level),
            }
        )
    return rows


def _wilson_interval(k: float, n: float, z: float) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def gsm8k_required_n(level: float = 0.95, floor: float = 0.90) -> list[tuple[float, float, int]]:
    """(base accuracy, discordance, required n) for the GSM8K question in docs/gates.md."""
    return [(p, d, required_n(p, d, floor, level)) for p in (0.45, 0.77) for d in (0.0, 0.05, 0.10, 0.20)]


def main() -> None:
    print("Interval widths at typical n (lossless variant, two-sided 95%, flips split evenly):")
    print(
        f"{'task':<18}{'n':>6}{'acc':>6}{'disc':>6}{'acc ±':>8}{'ret ±':>8}"
        f"{'resolvable floor':>18}{'floor':>7}{'needs n':>9}"
    )
    for r in resolution_table():
        print(
            f"{r['task']:<18}{r['n']:>6}{r['base']:>6.2f}{r['discordance']:>6.2f}"
            f"{100 * r['acc_half_width']:>7.1f}%{100 * r['retention_half_width']:>7.1f}%"
            f"{100 * r['resolvable_floor']:>17.1f}%{100 * r['floor']:>6.0f}%{r['required_n']:>9}"
        )
    print("\nGSM8K: items needed to resolve a 90% retention floor at 95% confidence:")
    print(f"{'base acc':>9}{'discordance':>13}{'required n':>12}")
    for p, d, req in gsm8k_required_n():
        print(f"{p:>9.2f}{d:>13.2f}{req:>12}")


if __name__ == "__main__":
    main()

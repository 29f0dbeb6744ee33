"""The regression gate: is the current run worse than the last accepted run, on the same items?

Items are matched by doc id; only ids present in both runs are compared, and the verdict says how many were
missing on either side. The gate fails on a significant drop (one-sided paired test at ``1 - level``:
McNemar exact for 0/1 items, sign-flip randomisation for continuous ones), and, when ``max_drop`` > 0, only
if the drop also exceeds ``max_drop`` (in the metric's own units, e.g. 0.02 = 2 points of accuracy).

Outcomes (quantgate.gates.outcome): FAIL on a significant drop; INCONCLUSIVE when so few items are shared
that no drop could be significant; NOT_GATED when the accepted run scores 0 on a higher-is-better metric (no
drop is possible, so a pass would mean nothing); PASS otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from quantgate.errors import InsufficientSampleError, QuantgateError
from quantgate.gates.outcome import GateParameters, Outcome
from quantgate.gates.stats import PairedChange, paired_change

MAX_LINES = 25  # one screen
_ANSWER_WIDTH = 96


class ItemMismatchError(QuantgateError, ValueError):
    """The accepted and current runs share no doc ids, so nothing can be compared."""


@dataclass(frozen=True)
class FlippedItem:
    doc_id: str
    before: float
    after: float
    accepted_answer: str | None = None
    current_answer: str | None = None


@dataclass(frozen=True)
class RegressionVerdict:
    """Outcome of the regression gate; ``message()`` explains it in at most 25 lines."""

    outcome: Outcome
    change: PairedChange
    level: float
    max_drop: float
    missing_in_current: int
    new_in_current: int
    examples: tuple[FlippedItem, ...]
    n_flipped: int
    label: str = ""
    reason: str = ""
    # What differs between the accepted run's result key and this one's ("field: before -> after"): the
    # checkpoint, kernel, versions or settings that a drop, or a pass, should be read against.
    changed: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS

    @property
    def parameters(self) -> GateParameters:
        """``floor`` is the tolerated drop (``max_drop``, in the metric's units); ``n_needed`` the fewest
        common items at which a drop can be significant at all (exact tests cannot go below 2^-n)."""
        mdd = self.change.mdd(self.level)
        return GateParameters(
            level=self.change.interval_level,
            floor=self.max_drop,
            n=self.change.n,
            mdd=None if math.isnan(mdd) else mdd,
            n_needed=min_items_for_significance(1 - self.level),
            unit="points" if self.change.binary else "score",
        )

    @property
    def before(self) -> float:
        return self.change.before

    @property
    def after(self) -> float:
        return self.change.after

    @property
    def n(self) -> int:
        return self.change.n

    def message(self) -> str:
        c = self.change
        name = f" {self.label}" if self.label else ""
        alpha = 1 - self.level
        lines = [
            f"{self.outcome.label}{name} vs accepted run: regression gate (one-sided test at {alpha:.0%})",
            f"  score    accepted {_val(c.before, c)} -> current {_val(c.after, c)} on {c.n} common items",
            f"  change   {_delta_interval(c)} ({c.interval_level:.0%} interval, matches the one-sided test)",
            f"  test     {c.test}: p = {c.p_value:.3g}",
            f"  verdict  {self.reason}",
            f"  flips    {c.flips_down} items worse, {c.flips_up} better",
            f"  gate     {self.parameters.text()}",
        ]
        if self.changed:
            lines.append(f"  changed  since the accepted run: {'; '.join(self.changed)}")
        if self.missing_in_current or self.new_in_current:
            lines.append(
                f"  items    {self.missing_in_current} accepted items missing from the current run; "
                f"{self.new_in_current} new items ignored"
            )
        if self.examples:
            lines.append(f"  flipped items (worse first; {len(self.examples)} of {self.n_flipped}):")
            per_item = 1 + sum(
                a is not None for a in (self.examples[0].accepted_answer, self.examples[0].current_answer)
            )
            room = max(0, (MAX_LINES - len(lines)) // per_item)
            for item in self.examples[:room]:
                lines.append(f"    doc {item.doc_id}: {item.before:.4g} -> {item.after:.4g}")
                if item.accepted_answer is not None:
                    lines.append(f"      accepted: {_shorten(item.accepted_answer)}")
                if item.current_answer is not None:
                    lines.append(f"      current:  {_shorten(item.current_answer)}")
        return "\n".join(lines[:MAX_LINES])

    def raise_for_status(self) -> None:
        """Raise AssertionError on FAIL, InsufficientSampleError on INCONCLUSIVE; return on PASS or NOT_GATED."""
        if self.outcome is Outcome.INCONCLUSIVE:
            raise InsufficientSampleError(self.message())
        if self.outcome is Outcome.FAIL:
            raise AssertionError(self.message())


def min_items_for_significance(alpha: float) -> int:
    """Fewest items at which an exact one-sided test can reach p < alpha: 2^-n < alpha."""
    return math.floor(math.log2(1 / alpha)) + 1


def _val(x: float, c: PairedChange) -> str:
    return f"{100 * x:.1f}%" if c.binary else f"{x:.4g}"


def _amount(x: float, c: PairedChange) -> str:
    return f"{100 * x:.1f} pts" if c.binary else f"{x:.4g}"


def _delta_interval(c: PairedChange) -> str:
    if c.binary:
        s = 100.0
        return (
            f"{s * c.change:+.1f} ± {s * (c.high - c.low) / 2:.1f} pts [{s * c.low:+.1f}, {s * c.high:+.1f}]"
        )
    return f"{c.change:+.4g} ± {(c.high - c.low) / 2:.3g} [{c.low:+.4g}, {c.high:+.4g}]"


def _shorten(text: str, width: int = _ANSWER_WIDTH) -> str:
    flat = " ".join(str(text).split())
    if len(flat) <= width:
        return repr(flat)
    # Keep both ends: a generated answer's conclusion (e.g. GSM8K's "#### 42") sits at its tail.
    head = width * 2 // 5
    tail = width - head - 5
    return repr(flat[:head] + " ... " + flat[-tail:])


def regression_gate(
    accepted: Mapping[str, float],
    current: Mapping[str, float],
    *,
    level: float = 0.95,
    max_drop: float = 0.0,
    accepted_answers: Mapping[str, str] | None = None,
    current_answers: Mapping[str, str] | None = None,
    higher_is_better: bool = True,
    show: int = 5,
    label: str = "",
    seed: int = 0,
) -> RegressionVerdict:
    """Compare the current run with the last accepted one, item by item, on their common doc ids.

    Raises ItemMismatchError when no id is shared. INCONCLUSIVE means no outcome on so few common items
    could be significant (even if every one of them dropped), so a pass would be uninformative. NOT_GATED
    means the accepted run scores 0 on a higher-is-better, non-negative metric, so no drop is possible.
    """
    if max_drop < 0 or not math.isfinite(max_drop):
        raise ValueError(f"max_drop must be a finite number >= 0, got {max_drop!r}")
    if show < 0:
        raise ValueError(f"show must be >= 0, got {show!r}")
    ids = [k for k in accepted if k in current]
    missing = [k for k in accepted if k not in current]
    new = [k for k in current if k not in accepted]
    if not ids:
        raise ItemMismatchError(
            f"no doc ids in common: the accepted run has {len(accepted)} items (e.g. {_some(accepted)}), "
            f"the current run has {len(current)} (e.g. {_some(current)}). Did the task, its limit or its "
            "doc-id scheme change? Accept a new baseline run."
        )
    before = [float(accepted[k]) for k in ids]
    after = [float(current[k]) for k in ids]
    c = paired_change(before, after, level=level, higher_is_better=higher_is_better, seed=seed)

    sign = 1.0 if higher_is_better else -1.0
    worse = [(sign * (b - a), i) for i, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
    # Largest drops first, then gains; ties keep the accepted run's order.
    worse.sort(key=lambda t: (-t[0], t[1]))
    examples = tuple(
        FlippedItem(
            doc_id=str(ids[i]),
            before=before[i],
            after=after[i],
            accepted_answer=None if accepted_answers is None else accepted_answers.get(ids[i], "<missing>"),
            current_answer=None if current_answers is None else current_answers.get(ids[i], "<missing>"),
        )
        for _, i in worse[:show]
    )

    alpha = 1 - level
    amount = _amount(c.drop, c)
    if higher_is_better and min(before) >= 0 and c.before == 0:
        # Nothing to lose: a gate that cannot fail must not count as a pass.
        status = Outcome.NOT_GATED
        reason = f"not gated: the baseline scores 0 (accepted run 0 on all {c.n} items), so no drop is possible"
    elif 0.5**c.n >= alpha:
        # Exact tests on n items cannot go below 2^-n, so no drop could ever be significant.
        status = Outcome.INCONCLUSIVE
        reason = f"{c.n} common items cannot show a significant drop at {alpha:.0%} (need >= "
        reason += f"{min_items_for_significance(alpha)}); a pass would mean nothing"
    elif c.p_value < alpha and c.drop > max_drop:
        status = Outcome.FAIL
        reason = f"significant drop of {amount} (p = {c.p_value:.3g} < {alpha:.2g})"
        if max_drop > 0:
            reason += f", more than max_drop {_amount(max_drop, c)}"
    elif c.p_value < alpha:
        status = Outcome.PASS
        reason = f"drop of {amount} is significant (p = {c.p_value:.3g}) "
        reason += f"but within max_drop {_amount(max_drop, c)}"
    else:
        status = Outcome.PASS
        reason = f"no significant drop (p = {c.p_value:.3g} >= {alpha:.2g})"
    return RegressionVerdict(
        outcome=status,
        change=c,
        level=level,
        max_drop=max_drop,
        missing_in_current=len(missing),
        new_in_current=len(new),
        examples=examples,
        n_flipped=len(worse),
        label=label,
        reason=reason,
    )


def _some(m: Mapping[str, float], k: int = 3) -> str:
    keys = [repr(x) for x, _ in zip(m, range(k), strict=False)]
    return ", ".join(keys) if keys else "none"

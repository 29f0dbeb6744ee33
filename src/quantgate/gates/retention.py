"""The retention gate: does a variant keep at least ``floor`` of its BF16 baseline's score, given the noise?

Modes (``level`` is the two-sided confidence of the estimate's interval, so each mode's one-sided error is
at most ``(1 - level) / 2``):

* ``point``: pass if the estimate >= floor. Ignores noise; a lossless variant near the floor fails often.
* ``confident``: pass only if the lower bound >= floor. Controls false passes; false failures are common.
* ``no-evidence-of-loss`` (default): fail only if the upper bound < floor. Controls false failures, the
  thing users of fixed-epsilon gates suffer from; the min-n rule keeps it from passing out of ignorance.

Outcomes (quantgate.gates.outcome): FAIL only on evidence of loss, the upper bound below the floor, in every
mode. Where a mode's pass condition is not met without such evidence, the interval straddles the floor and the
outcome is INCONCLUSIVE. Min-n rule: if fewer items were evaluated than it takes for a lossless variant's
interval to clear the floor (``PairedEstimate.required_n``), the outcome is INCONCLUSIVE, never PASS. A
significant loss still fails at any n: that evidence does not need more items. A baseline that scores 0 leaves
nothing to retain: the gate cannot fail, so it is NOT_GATED, neither pass nor fail. Values are compared
unrounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantgate.errors import InsufficientSampleError
from quantgate.gates.outcome import GateParameters, Outcome
from quantgate.gates.stats import PairedEstimate, format_interval
from quantgate.matrix import GateMode

MODES: tuple[str, ...] = GateMode.__args__  # type: ignore[attr-defined]

_RULES = {
    "point": "point: passes if estimate >= floor (ignores noise); fails only if upper bound < floor",
    "confident": "confident: passes only if lower bound >= floor; fails only if upper bound < floor",
    "no-evidence-of-loss": "no-evidence-of-loss: passes if upper bound >= floor at a resolving n; fails if not",
}


@dataclass(frozen=True)
class GateVerdict:
    """Outcome of the retention gate; ``message()`` explains it on one screen."""

    outcome: Outcome
    estimate: PairedEstimate
    floor: float
    mode: GateMode
    required_n: int | None
    label: str = ""
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASS

    @property
    def parameters(self) -> GateParameters:
        mdd = self.estimate.mdd()
        return GateParameters(
            level=self.estimate.level,
            floor=self.floor,
            n=self.estimate.n,
            mdd=None if math.isnan(mdd) else mdd,
            n_needed=self.required_n,
        )

    def message(self) -> str:
        e = self.estimate
        name = f" {self.label}" if self.label else ""
        lines = [
            f"{self.outcome.label}{name}: retention gate, mode {self.mode} at {_pct(e.level, 0)} confidence",
            f"  retention  {format_interval(e)} % of base   floor {_pct(self.floor)}",
            f"  verdict    {self.reason}",
        ]
        if not math.isnan(e.base_mean):
            tasks = f" in {e.n_tasks} tasks" if e.n_tasks > 1 else ""
            lines.append(
                f"  scores     base {_score(e.base_mean, e)}  variant {_score(e.variant_mean, e)}"
                f"  on n = {e.n} paired items{tasks}"
            )
        if e.n:
            if e.binary and e.higher_is_better:
                down, up = "worse (base right, variant wrong)", "better"
            else:
                down, up = "items worse", "better"
            test = "McNemar exact" if e.binary else "sign test"
            lines.append(
                f"  flips      {e.flips_down} {down}, {e.flips_up} {up}; {test} p = {e.mcnemar_p:.3g}"
            )
        lines.append(f"  gate       {self.parameters.text()}")
        lines.append(f"  rule       {_RULES[self.mode]}")
        method = f"  method     {e.describe_method()}"
        if self.required_n is not None:
            method += f"; resolves this floor from n >= {self.required_n}"
        lines.append(method)
        return "\n".join(lines)

    def raise_for_status(self) -> None:
        """Raise AssertionError on FAIL, InsufficientSampleError on INCONCLUSIVE; return on PASS or NOT_GATED.

        For code outside pytest; the regression suite lets the policy decide instead (quantgate.policy).
        """
        if self.outcome is Outcome.INCONCLUSIVE:
            raise InsufficientSampleError(self.message())
        if self.outcome is Outcome.FAIL:
            raise AssertionError(self.message())


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _score(x: float, e: PairedEstimate) -> str:
    return _pct(x) if e.binary else f"{x:.4g}"


def retention_gate(
    est: PairedEstimate, floor: float, mode: GateMode = "no-evidence-of-loss", *, label: str = ""
) -> GateVerdict:
    """Judge a paired retention estimate against ``floor`` (e.g. 0.95) in ``mode`` at ``est.level``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor!r}")

    def verdict(outcome: Outcome, req: int | None, reason: str) -> GateVerdict:
        return GateVerdict(outcome, est, floor, mode, req, label, reason)

    if not est.defined:
        base_zero = est.higher_is_better and est.base_mean == 0
        if est.n and base_zero:
            return verdict(
                Outcome.NOT_GATED, None,
                "not gated: the baseline scores 0, so no loss is possible and the gate cannot fail",
            )
        return verdict(Outcome.INCONCLUSIVE, None, f"{est.note or 'retention is undefined'}; it cannot pass")
    req = est.required_n(floor)
    level = _pct(est.level, 0)
    if est.high < floor:
        # Evidence of loss needs no more items: the whole interval is already below the floor.
        return verdict(
            Outcome.FAIL,
            req,
            f"upper bound {_pct(est.high)} < floor {_pct(floor)}: the loss is significant at {level}",
        )
    if req is not None and est.n < req:
        return verdict(
            Outcome.INCONCLUSIVE,
            req,
            f"n = {est.n} cannot resolve a {_pct(floor)} floor at {level}: needs n >= {req} "
            f"(base {_score(est.base_mean, est)}, {_pct(est.discordance)} of items differ)",
        )
    if mode == "point":
        ok, what, value = est.estimate >= floor, "estimate", est.estimate
    elif mode == "confident":
        ok, what, value = est.low >= floor, "lower bound", est.low
    else:
        ok, what, value = True, "upper bound", est.high
    if ok:
        return verdict(Outcome.PASS, req, f"{what} {_pct(value)} >= floor {_pct(floor)}")
    # The upper bound is at or above the floor here: no evidence of loss, so not a FAIL.
    return verdict(
        Outcome.INCONCLUSIVE,
        req,
        f"{what} {_pct(value)} < floor {_pct(floor)} but the upper bound {_pct(est.high)} >= floor: the "
        f"interval straddles the floor",
    )

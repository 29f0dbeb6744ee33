"""What every gate returns: an outcome, the parameters it was judged with, and a one-screen message.

A gate is ``name, tier, outcome, parameters, message`` (``Gate``). The gate functions (retention, regression,
and any other kind, e.g. distribution metrics against BF16) return a *judgement*: anything with ``outcome``,
``parameters`` and ``message()`` (the ``Judgement`` protocol). The policy (quantgate.policy) gives it a tier
and decides what its outcome does to the test and to the run.

Outcomes:

* ``PASS``: the evidence clears the floor.
* ``FAIL``: evidence of loss: the whole interval is on the wrong side of the floor. Nothing else is a FAIL.
* ``INCONCLUSIVE``: the interval straddles the floor, or n is below what resolves it. Not a failure.
* ``NOT_GATED``: the gate cannot fail (e.g. the baseline scores 0: no drop is possible). Neither pass nor fail.
* ``MISSING``: a gate the policy requires did not run.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol


class Outcome(enum.StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"
    NOT_GATED = "NOT_GATED"
    MISSING = "MISSING"

    @property
    def label(self) -> str:
        """How the outcome is printed: ``NOT GATED`` rather than the identifier."""
        return self.value.replace("_", " ")


@dataclass(frozen=True)
class GateParameters:
    """What a gate was judged with, printed with every verdict and recorded in JUnit XML.

    ``level``: two-sided confidence of the interval. ``floor``: the threshold in ``unit`` (for a
    lower-is-better metric such as KL divergence, its ceiling). ``n``: items (or documents) judged.
    ``mdd``: minimum detectable drop at this n, in ``unit`` (see ``gates.stats.minimum_detectable_drop``).
    ``n_needed``: the n at which the gate resolves its floor (None when no n would, or it is not defined).
    """

    level: float
    floor: float | None
    n: int
    mdd: float | None = None
    n_needed: int | None = None
    unit: str = "retention"
    power: float = 0.8

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    def text(self) -> str:
        """``level 95%, floor 95.0%, n 400, mdd 7.9% (80% power), resolves from n >= 860``."""
        pct = self.unit in ("retention", "points")

        def show(x: float) -> str:
            return f"{100 * x:.1f}%" if self.unit == "retention" else (
                f"{100 * x:.1f} pts" if pct else f"{x:.4g} {self.unit}"
            )

        parts = [f"level {100 * self.level:.0f}%"]
        if self.floor is not None:
            parts.append(f"floor {show(self.floor)}")
        parts.append(f"n {self.n}")
        if self.mdd is not None and math.isfinite(self.mdd):
            parts.append(f"mdd {show(self.mdd)} ({100 * self.power:.0f}% power)")
        if self.n_needed is not None:
            parts.append(f"resolves from n >= {self.n_needed}")
        return ", ".join(parts)


class Judgement(Protocol):
    """What a gate function returns; any gate kind that has these plugs into the policy and the reports."""

    @property
    def outcome(self) -> Outcome: ...

    @property
    def parameters(self) -> GateParameters: ...

    def message(self) -> str: ...


@dataclass(frozen=True)
class Gate:
    """One judged gate of one subject (``model/variant``), with the tier the policy gave it."""

    name: str  # e.g. "retention[hellaswag]", "retention[AVG]", "regression[gsm8k]", "kl"
    subject: str  # "model/variant"
    tier: str
    outcome: Outcome
    parameters: GateParameters
    message: str
    # the subject is a negative control (a deliberately damaged variant): its gates are expected to FAIL
    control: bool = False

    def as_json(self) -> str:
        """One line of JSON, for ``record_property`` and for the CLI to read back from test reports."""
        return json.dumps(
            {
                "name": self.name,
                "subject": self.subject,
                "tier": self.tier,
                "outcome": self.outcome.value,
                "parameters": self.parameters.as_dict(),
                "control": self.control,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, message: str = "") -> Gate:
        d = json.loads(text)
        return cls(
            d["name"], d["subject"], d["tier"], Outcome(d["outcome"]), GateParameters(**d["parameters"]), message,
            bool(d.get("control", False)),
        )

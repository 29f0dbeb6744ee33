"""The gating policy (thresholds/policy.yaml): each gate's tier, and what each outcome does per tier and cadence.

Tiers follow NVIDIA NeMo Evaluator's `nel gate`: ``critical`` gates are required (one that did not run is
MISSING, which fails the run), ``supporting`` gates count, ``advisory`` gates only inform. Per tier the policy
says what FAIL does (``fail`` or ``warn``) and, per cadence (``commit`` for a PR, ``nightly``, ``weekly``),
what INCONCLUSIVE does: ``fail`` (blocks the run, exit code 2, still never printed as FAIL), ``warn``
(reported, does not block) or ``pass-with-note``.

Gate names: ``retention[<task>]``, ``retention[AVG]``, ``regression[<task>]``, or another gate kind's own name
(e.g. a distribution metric, ``kl``). A policy key is a gate name or a task name, which stands for every gate
of that task; an exact gate name wins over its task.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantgate.errors import MatrixError
from quantgate.gates.outcome import Gate, GateParameters, Outcome
from quantgate.matrix import Cadence, _read_yaml, format_validation_errors

Tier = Literal["critical", "supporting", "advisory"]
TIERS: tuple[str, ...] = Tier.__args__  # type: ignore[attr-defined]
CADENCES: tuple[str, ...] = Cadence.__args__  # type: ignore[attr-defined]
OnFail = Literal["fail", "warn"]
OnInconclusive = Literal["fail", "warn", "pass-with-note"]
# What a judged gate does to its test and to the run.
# A negative control's gates invert: FAIL is what is expected ("expected-fail"), and a critical gate that does not
# FAIL it has stopped catching the damage ("control-missed"), which fails the run.
Disposition = Literal["pass", "fail", "warn", "note", "not-gated", "expected-fail", "control-missed"]

# a task, a gate kind, or kind[task] / kind[task:metric label] (a task's other metrics, Task.gate_keys)
_GATE_KEY = re.compile(r"^[A-Za-z0-9_.-]+(\[[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?\])?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PerCadence(_Strict):
    """What INCONCLUSIVE does at each cadence; ``weekly`` defaults to ``nightly``'s."""

    commit: OnInconclusive
    nightly: OnInconclusive
    weekly: OnInconclusive | None = None

    def at(self, cadence: str) -> OnInconclusive:
        if cadence == "weekly":
            return self.weekly or self.nightly
        return getattr(self, cadence)


class RequireSnapshot(_Strict):
    commit: bool = False
    nightly: bool = False
    weekly: bool | None = None

    def at(self, cadence: str) -> bool:
        if cadence == "weekly":
            return self.nightly if self.weekly is None else self.weekly
        return bool(getattr(self, cadence))


class Policy(_Strict):
    default_tier: Tier = Field("supporting", description="tier of a gate the policy does not name")
    tiers: dict[str, Tier] = Field(default_factory=dict, description="gate or task name -> tier")
    on_fail: dict[Tier, OnFail] = Field(
        default_factory=lambda: {"critical": "fail", "supporting": "fail", "advisory": "warn"}
    )
    on_inconclusive: dict[Tier, PerCadence]
    require_snapshot: RequireSnapshot = Field(
        RequireSnapshot(), description="fail the score-table test when this hardware has no committed snapshot"
    )

    @field_validator("tiers")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in v if not _GATE_KEY.match(k))
        if bad:
            raise ValueError(f"not a gate or task name: {bad} (use e.g. hellaswag, retention[AVG], kl)")
        return v

    @model_validator(mode="after")
    def _complete(self) -> Policy:
        for what, table in (("on_fail", self.on_fail), ("on_inconclusive", self.on_inconclusive)):
            missing = [t for t in TIERS if t not in table]
            if missing:
                raise ValueError(f"{what} must say what each tier does; missing {missing}")
        if self.on_fail["critical"] != "fail":
            raise ValueError("on_fail.critical must be fail: a critical gate that fails on evidence fails the run")
        return self

    # ------------------------------------------------------------------------------------------ lookups

    def tier(self, gate_name: str) -> Tier:
        """The tier of a gate: its exact name, else the task in its brackets, else (for a task's other metric,
        `retention[task:label]`) the gate of the task's first metric or the task, else ``default_tier``."""
        if gate_name in self.tiers:
            return self.tiers[gate_name]
        m = re.match(r"^[^\[]+\[(.+)\]$", gate_name)
        if m and m.group(1) in self.tiers:
            return self.tiers[m.group(1)]
        if m and ":" in m.group(1):  # a task's other metric (retention[task:label]): the task's tier
            task = m.group(1).split(":", 1)[0]
            for key in (f"{gate_name.split('[', 1)[0]}[{task}]", task):
                if key in self.tiers:
                    return self.tiers[key]
        return self.default_tier

    def disposition(self, outcome: Outcome, tier: str, cadence: str, control: bool = False) -> Disposition:
        """What an outcome in a tier does at a cadence (see the module docstring).

        For a negative control (`control`): FAIL is expected; a critical gate with any other outcome but
        MISSING has missed the damage; a non-critical gate is only reported.
        """
        if cadence not in CADENCES:
            raise ValueError(f"cadence must be one of {CADENCES}, got {cadence!r}")
        if control and outcome is not Outcome.MISSING:
            if outcome is Outcome.FAIL:
                return "expected-fail"
            return "control-missed" if tier == "critical" else "not-gated"
        if outcome is Outcome.PASS:
            return "pass"
        if outcome is Outcome.NOT_GATED:
            return "not-gated"
        if outcome in (Outcome.FAIL, Outcome.MISSING):
            return self.on_fail[tier]  # type: ignore[index]
        action = self.on_inconclusive[tier].at(cadence)  # type: ignore[index]
        return "note" if action == "pass-with-note" else action

    def required(self) -> list[str]:
        """Policy keys in the critical tier: gates that must run for every judged variant."""
        return sorted(k for k, t in self.tiers.items() if t == "critical")

    def describe(self, cadence: str, gates: Collection[str] | None = None) -> str:
        """One line per tier: what FAIL and INCONCLUSIVE do at this cadence, and the gates in it.

        `gates`: the gate names of the matrix (or run) in use; a policy entry naming none of them (neither the
        gate itself nor, for a task key, its ``retention[task]`` gate) is left out of the lists and counted.
        """
        lines = [f"policy at cadence {cadence} (default tier {self.default_tier}):"]
        listed = [k for k in self.tiers if gates is None or k in gates or f"retention[{k}]" in gates]
        for t in TIERS:
            names = sorted(k for k in listed if self.tiers[k] == t)
            lines.append(
                f"  {t:10} FAIL -> {self.on_fail[t]}, INCONCLUSIVE -> {self.on_inconclusive[t].at(cadence)}"  # type: ignore[index]
                + (f"; {', '.join(names)}" if names else "")
            )
        left_out = len(self.tiers) - len(listed)
        if left_out:
            lines.append(f"  ({left_out} policy entr{'y names a gate' if left_out == 1 else 'ies name gates'} "
                         "not in this matrix, not listed)")
        return "\n".join(lines)


# Used where no policy.yaml exists (another project that installs the plugin): every gate supporting,
# INCONCLUSIVE warns on a commit and fails nightly.
DEFAULT_POLICY = Policy(
    on_inconclusive={
        "critical": PerCadence(commit="fail", nightly="fail"),
        "supporting": PerCadence(commit="warn", nightly="fail"),
        "advisory": PerCadence(commit="pass-with-note", nightly="warn"),
    }
)


def load_policy(path: str | Path) -> Policy:
    """The policy file, validated strictly; a missing file is an error (callers choose the default)."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        return Policy.model_validate(data)
    except ValidationError as err:
        raise MatrixError(format_validation_errors(path, err, "policy", schema=Policy, data=data)) from None


def missing_gates(gates: list[Gate], policy: Policy) -> list[Gate]:
    """MISSING gates: for every judged variant (a subject with a gate other than a regression gate), each
    critical policy key with no gate of that name (or, for a task name, no ``retention[task]`` gate).

    A variant this hardware cannot run at all judges no gate and so misses none; a critical task that the
    matrix does not run is missing for every variant.
    """
    by_subject: dict[str, set[str]] = {}
    for g in gates:
        if g.outcome is Outcome.MISSING:
            continue
        by_subject.setdefault(g.subject, set()).add(g.name)
    out: list[Gate] = []
    for subject, names in by_subject.items():
        if all(n.startswith("regression[") for n in names):
            continue  # a baseline: it has no retention or distribution gates to miss
        for key in policy.required():
            wanted = {key} if "[" in key else {key, f"retention[{key}]"}
            if not wanted & names:
                out.append(
                    Gate(
                        name=key,
                        subject=subject,
                        tier="critical",
                        outcome=Outcome.MISSING,
                        parameters=GateParameters(level=float("nan"), floor=None, n=0),
                        message=f"MISSING {key} for {subject}: the policy makes it critical and it did not run",
                    )
                )
    return out

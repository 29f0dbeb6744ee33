"""The run's verdict and exit code, from its judged gates, the policy and the cadence (pure; no pytest).

Exit codes of ``quantgate run`` (and of ``RunVerdict.exit_code``):

* ``0`` PASS: every gate the policy counts passed (advisory warnings and notes do not block).
* ``1`` FAIL: a gate failed on evidence of loss in a blocking tier, a critical gate is MISSING, or a test
  other than a gate failed or errored (a build, a kernel check).
* ``2`` INCONCLUSIVE: nothing failed, but a gate whose policy blocks on INCONCLUSIVE did not resolve.
* ``3`` the run did not complete: bad configuration, interrupted, or pytest usage/internal error; or nothing
  ran at all (every test skipped or deselected, no gate judged): a green PASS would say the checkpoint was
  checked when nothing was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from quantgate.gates.outcome import Gate, Outcome
from quantgate.policy import Disposition, Policy, missing_gates

EXIT_PASS, EXIT_FAIL, EXIT_INCONCLUSIVE, EXIT_ERROR = 0, 1, 2, 3


@dataclass(frozen=True)
class RunVerdict:
    cadence: str
    judged: list[tuple[Gate, Disposition]]
    other_failures: list[str] = field(default_factory=list)  # node ids of failed non-gate tests
    errors: list[str] = field(default_factory=list)  # node ids that errored
    ran: int | None = None  # tests whose body ran (not skipped); None where unknown

    @property
    def nothing_ran(self) -> bool:
        """No test body ran and no gate was judged (every test skipped, deselected or none collected)."""
        return self.ran == 0 and not self.judged and not self.errors and not self.other_failures

    @property
    def exit_code(self) -> int:
        if self.nothing_ran:
            return EXIT_ERROR
        if self.errors or self.other_failures:
            return EXIT_FAIL
        if any(d == "fail" and g.outcome in (Outcome.FAIL, Outcome.MISSING) for g, d in self.judged):
            return EXIT_FAIL
        if any(d == "control-missed" for _, d in self.judged):
            return EXIT_FAIL
        if any(d == "fail" and g.outcome is Outcome.INCONCLUSIVE for g, d in self.judged):
            return EXIT_INCONCLUSIVE
        return EXIT_PASS

    @property
    def headline(self) -> str:
        """``PASS`` / ``FAIL`` / ``INCONCLUSIVE`` / ``NOTHING RAN``: FAIL only when something failed on evidence
        (or is missing or broke); a run whose only blocking gates are inconclusive is INCONCLUSIVE."""
        return {EXIT_PASS: "PASS", EXIT_FAIL: "FAIL", EXIT_INCONCLUSIVE: "INCONCLUSIVE",
                EXIT_ERROR: "NOTHING RAN"}[self.exit_code]

    def counts(self) -> Counter[str]:
        return Counter(g.outcome.label for g, _ in self.judged)

    def lines(self, policy: Policy | None = None) -> list[str]:
        """The verdict on one screen: each gate that did not simply pass, the policy, the headline."""
        out: list[str] = []
        order = {Outcome.FAIL: 0, Outcome.MISSING: 1, Outcome.INCONCLUSIVE: 2, Outcome.NOT_GATED: 3}
        shown = sorted(
            ((g, d) for g, d in self.judged if g.outcome is not Outcome.PASS or d == "control-missed"),
            key=lambda gd: (order.get(gd[0].outcome, 9), gd[0].subject, gd[0].name),
        )
        for g, d in shown:
            what = {"fail": "blocks", "warn": "warning", "note": "note", "not-gated": "not counted",
                    "expected-fail": "negative control, caught as expected",
                    "control-missed": "negative control NOT caught: blocks"}.get(d, d)
            out.append(f"  {g.outcome.label:12} {g.subject} {g.name} [{g.tier}, {what}]")
            if g.outcome is not Outcome.MISSING:
                out.append(f"               {g.parameters.text()}")
        for nodeid in self.other_failures:
            out.append(f"  FAILED       {nodeid} (not a gate)")
        for nodeid in self.errors:
            out.append(f"  ERROR        {nodeid}")
        if policy is not None:
            out.append(policy.describe(self.cadence, {g.name for g, _ in self.judged}))
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        if self.nothing_ran:
            counts = "none judged: every selected test was skipped (the SKIPPED lines say why)"
        out.append(f"VERDICT: {self.headline} (exit {self.exit_code}); gates: {counts or 'none judged'}")
        return out


def summarize(
    gates: list[Gate],
    policy: Policy,
    cadence: str,
    *,
    other_failures: list[str] | None = None,
    errors: list[str] | None = None,
    ran: int | None = None,
) -> RunVerdict:
    """Add the MISSING critical gates, resolve each gate's disposition, and give the run's verdict. `ran`: how
    many tests' bodies ran (None: unknown), so that a run where nothing ran is not a PASS."""
    all_gates = list(gates) + missing_gates(gates, policy)
    judged = [(g, policy.disposition(g.outcome, g.tier, cadence, control=g.control)) for g in all_gates]
    return RunVerdict(cadence, judged, list(other_failures or []), list(errors or []), ran)

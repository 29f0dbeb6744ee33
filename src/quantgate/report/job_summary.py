"""A CI job summary from a run's JUnit XML: the verdict, the gates that did not pass, and annotations.

pytest's ``--junitxml`` writes each test's user properties; every gate records its JSON as the
``quantgate.gate`` property and its disposition as ``quantgate.disposition`` (quantgate.plugin.qg_judge), and a
failed gate's ``<failure>`` text is its message (numbers, interval, floor and, for a regression, the items that
flipped with both answers). ``read_junit`` reads them back; ``summarize`` re-applies the policy (adding the
critical gates that are MISSING) to give the same verdict ``quantgate run`` printed.

``markdown`` renders GitHub-flavoured Markdown for ``$GITHUB_STEP_SUMMARY``; ``annotations`` renders GitHub
workflow commands (``::error title=...::message``), escaped as the Actions toolkit escapes them
(``%`` ``\\r`` ``\\n`` in messages, and also ``:`` ``,`` in properties: actions/toolkit, packages/core/src/command.ts).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from quantgate.errors import QuantgateError
from quantgate.gates.outcome import Gate, Outcome
from quantgate.policy import Policy
from quantgate.run_verdict import RunVerdict, summarize

GATE_PROPERTY = "quantgate.gate"  # as quantgate.plugin.GATE_PROPERTY (not imported: no pytest needed here)


@dataclass
class JunitRun:
    gates: list[Gate]
    messages: dict[tuple[str, str], str]  # (subject, gate name) -> the failure or skip text of its test
    other_failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cadence: str | None = None
    tests: int = 0
    skipped: int = 0


def read_junit(path: Path) -> JunitRun:
    """The gates, failures and errors of a pytest JUnit XML file; QuantgateError naming the file if unreadable."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise QuantgateError(f"JUnit XML {path} is unreadable ({exc}); pass the file `--junitxml` wrote") from None
    out = JunitRun([], {})
    for case in root.iter("testcase"):
        out.tests += 1
        nodeid = f"{case.get('classname', '')}::{case.get('name', '')}"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        out.skipped += skipped is not None
        text = next(
            ((el.text or el.get("message") or "").strip() for el in (failure, error, skipped) if el is not None), ""
        )
        if props.get("quantgate.cadence"):
            out.cadence = props["quantgate.cadence"]
        if GATE_PROPERTY in props:
            try:
                gate = Gate.from_json(props[GATE_PROPERTY], message=text)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise QuantgateError(f"{path}: test {nodeid}: bad {GATE_PROPERTY} property ({exc})") from None
            out.gates.append(gate)
            out.messages[(gate.subject, gate.name)] = text
        elif failure is not None:
            out.other_failures.append(nodeid)
        if error is not None:
            out.errors.append(nodeid)
    return out


def verdict_of(run: JunitRun, policy: Policy, cadence: str | None = None) -> RunVerdict:
    """The run's verdict as `quantgate run` gave it: the policy applied at the run's cadence."""
    return summarize(run.gates, policy, cadence or run.cadence or "commit",
                     other_failures=run.other_failures, errors=run.errors, ran=run.tests - run.skipped)


def _nothing_ran_why(run: JunitRun) -> str:
    return (f"all {run.tests} of the run's tests were skipped" if run.tests > 1 else
            "the run's one test was skipped" if run.tests == 1 else "the JUnit XML holds no test")


def _not_passed(verdict: RunVerdict) -> list[tuple[Gate, str]]:
    order = {Outcome.FAIL: 0, Outcome.MISSING: 1, Outcome.INCONCLUSIVE: 2, Outcome.NOT_GATED: 3}
    return sorted(
        ((g, d) for g, d in verdict.judged if g.outcome is not Outcome.PASS or d == "control-missed"),
        key=lambda gd: (order.get(gd[0].outcome, 9), gd[0].subject, gd[0].name),
    )


def markdown(verdict: RunVerdict, run: JunitRun, tables: list[str], policy: Policy | None = None,
             links: dict[str, str] | None = None, figures: dict[str, str] | None = None) -> str:
    """The job summary: headline, gate counts, a table of the gates that did not pass (each failing one with
    its message, flipped items included, in a collapsed block), other failures, then the score tables and
    links to the report's figures (`figures`: name -> URL, or a path inside the uploaded results)."""
    icon = {"PASS": ":white_check_mark:", "FAIL": ":x:", "INCONCLUSIVE": ":grey_question:",
            "NOTHING RAN": ":x:"}[verdict.headline]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(verdict.counts().items())) or "none judged"
    lines = [f"## {icon} quantgate: {verdict.headline} (exit {verdict.exit_code})", "",
             f"Cadence **{verdict.cadence}**; {run.tests} test{'' if run.tests == 1 else 's'}; gates: {counts}.", ""]
    shown = _not_passed(verdict)
    if verdict.nothing_ran:
        why = _nothing_ran_why(run) + (" (the run's log gives the skip reasons)" if run.tests else "")
        lines += [f"Nothing ran: {why}, so no checkpoint was checked.", ""]
    elif shown:
        lines += ["### Gates that did not pass", "", "| Outcome | Subject | Gate | Tier | Disposition | Parameters |",
                  "|---|---|---|---|---|---|"]
        for g, d in shown:
            params = "" if g.outcome is Outcome.MISSING else g.parameters.text()
            lines.append(f"| {g.outcome.label} | `{g.subject}` | `{g.name}` | {g.tier} | {d} | {_cell(params)} |")
        lines.append("")
        for g, d in shown:
            text = run.messages.get((g.subject, g.name), "")
            if d in ("fail", "control-missed") and text:
                lines += [f"<details><summary>{g.outcome.label} {g.subject} {g.name}</summary>", "", "```text",
                          text.replace("```", "'''"), "```", "", "</details>", ""]
    else:
        lines += ["Every judged gate passed.", ""]
    if run.other_failures or run.errors:
        lines += ["### Failed or errored tests (not gates)", ""]
        lines += [f"- FAILED `{n}`" for n in run.other_failures] + [f"- ERROR `{n}`" for n in run.errors] + [""]
    if policy is not None:
        lines += ["<details><summary>Policy</summary>", "", "```text", policy.describe(verdict.cadence), "```", "",
                  "</details>", ""]
    if tables:
        lines += ["### Scores", ""]
        for t in tables:
            lines += [t.replace("### ", "#### ", 1), ""]
    if figures:
        lines += ["### Figures", ""] + [f"- [{k}]({v})" for k, v in figures.items()] + [""]
    if links:
        lines += ["### Artifacts", ""] + [f"- [{k}]({v})" for k, v in links.items()] + [""]
    return "\n".join(lines)


def annotations(verdict: RunVerdict, run: JunitRun) -> list[str]:
    """``::error`` for each gate that blocks and each failed or errored test, ``::warning`` for the others
    that did not pass: GitHub shows them on the run and the pull request."""
    out = []
    for g, d in _not_passed(verdict):
        level = "error" if d in ("fail", "control-missed") else "warning"
        first = (run.messages.get((g.subject, g.name)) or g.message or g.outcome.label).splitlines()[0]
        title = f"quantgate {g.outcome.label} {g.subject} {g.name}"
        out.append(f"::{level} title={_escape_property(title)}::{_escape_data(first)}")
    for nodeid in run.other_failures + run.errors:
        out.append(f"::error title={_escape_property('quantgate test failed')}::{_escape_data(nodeid)}")
    if verdict.nothing_ran:
        out.append(f"::error title={_escape_property('quantgate: nothing ran')}::"
                   f"{_escape_data(_nothing_ran_why(run) + ': no checkpoint was checked')}")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(s: str) -> str:
    return _escape_data(s).replace(":", "%3A").replace(",", "%2C")

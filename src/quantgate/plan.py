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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantgate.errors import MatrixError
from quantgate.gates.regression import min_items_for_significance
from quantgate.gates.stats import _z, minimum_detectable_drop, required_n
from quantgate.matrix import Matrix, Thresholds

# Tasks whose metric is a perplexity: their gates use the bootstrap, which this plan does not model.
PERPLEXITY_TASKS = frozenset({"wikitext"})


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


def plan_rows(
    matrix: Matrix, th: Thresholds, base: dict[str, float], disc: dict[str, float], power: float = 0.8
) -> list[PlanRow]:
    level = th.retention.level
    rows: list[PlanRow] = []
    for model in matrix.models:
        for v in model.variants:
            subject = f"{model.name}/{v.name}"
            avg_terms: list[tuple[int, float, float]] = []
            if v.format != "bf16":
                for t in (t for t in matrix.tasks if t.gate):
                    floor = th.retention.floor(v.format, t.name)
                    p, d = base[t.name], disc[t.name]
                    if t.name in PERPLEXITY_TASKS:
                        rows.append(PlanRow(subject, f"retention[{t.name}]", floor, t.limit, None, None, None,
                                            None, "perplexity: bootstrap interval, not planned here"))
                        continue
                    if p <= 0:
                        rows.append(PlanRow(subject, f"retention[{t.name}]", floor, t.limit, p, d, None, None,
                                            "not gated: a baseline scoring 0 cannot lose anything"))
                        continue
                    n_needed = required_n(p, d, floor, level) if floor < 1 else None
                    mdd = None
                    if t.limit:
                        mdd = minimum_detectable_drop(_log_sd(p, d, t.limit, level), t.limit, level, power,
                                                      log_scale=True)
                        avg_terms.append((t.limit, p, d))
                    rows.append(PlanRow(subject, f"retention[{t.name}]", floor, t.limit, p, d, n_needed, mdd,
                                        "" if t.limit else "limit: all items (size unknown here)"))
                if avg_terms:
                    rows.append(_avg_row(subject, th.retention.floor(v.format), avg_terms, level, power))
            for t in (t for t in matrix.tasks if t.regression):
                d = disc[t.name]
                alpha = 1 - th.regression.level
                if base[t.name] == 0:
                    rows.append(PlanRow(subject, f"regression[{t.name}]", th.regression.max_drop, t.limit, 0.0,
                                        d, None, None, "not gated: an accepted run scoring 0 cannot drop"))
                    continue
                mdd = None
                if t.limit:
                    mdd = minimum_detectable_drop(max(math.sqrt(d), 1e-12), t.limit, 1 - 2 * alpha, power)
                rows.append(PlanRow(subject, f"regression[{t.name}]", th.regression.max_drop, t.limit,
                                    base[t.name], d, min_items_for_significance(alpha), mdd))
    return rows


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
                   f"{t_count} tasks, sizes scaled together")


def render_plan(rows: list[PlanRow], level: float, power: float) -> str:
    sw = max([len("subject"), *(len(r.subject) for r in rows)]) + 2
    gw = max([len("gate"), *(len(r.gate) for r in rows)]) + 2
    lines = [
        f"quantgate plan: level {100 * level:.0f}%, mdd at {100 * power:.0f}% power "
        "(TensorRT-LLM's theta, paired; docs/gates.md)",
        f"{'subject':{sw}}{'gate':{gw}}{'floor':>7}{'base':>6}{'disc':>6}{'n':>7}{'needs n':>9}{'mdd':>9}  verdict",
    ]
    for r in rows:
        reg = r.gate.startswith("regression[")
        floor = "—" if r.floor is None else (f"{100 * r.floor:.1f}" + ("pt" if reg else "%"))
        mdd = "—" if r.mdd is None else (f"{100 * r.mdd:.1f}" + ("pt" if reg else "%"))
        state = {True: "resolves", False: "INCONCLUSIVE expected", None: ""}[r.resolved]
        lines.append(
            f"{r.subject:{sw}}{r.gate:{gw}}{floor:>7}{_num(r.base):>6}{_num(r.discordance):>6}"
            f"{r.n if r.n is not None else 'all':>7}{r.n_needed if r.n_needed is not None else '—':>9}{mdd:>9}"
            f"  {'; '.join(x for x in (state, r.note) if x)}"
        )
    lines.append("base and disc are assumptions (--base, --discordance); measure them with a run and re-plan.")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"

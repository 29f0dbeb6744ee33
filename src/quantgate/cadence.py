"""Which variants a run evaluates at its cadence (`--qg-cadence commit|nightly|weekly`).

A variant's `cadence` (fixtures/*.yaml, default ``commit``) is the earliest cadence that evaluates it; the
order is commit < nightly < weekly, so a nightly run evaluates the commit and nightly variants and a weekly
run every variant. A variant later than the run's cadence is left out of that run altogether: its tests are
deselected, and nothing else of the run (retention AVG, distribution metrics, the score table and its
snapshot, the history line, the job summary, `quantgate plan` and `report`) reads it, so what a commit run
reports never depends on whether a nightly run happened to store results for it.

Pure: no pytest, nothing built or served.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantgate.errors import MatrixError
from quantgate.matrix import Cadence, Matrix, Model

ORDER: tuple[str, ...] = Cadence.__args__  # type: ignore[attr-defined]  # commit < nightly < weekly


def _rank(cadence: str) -> int:
    if cadence not in ORDER:
        raise MatrixError(f"cadence must be one of {list(ORDER)}, got {cadence!r}")
    return ORDER.index(cadence)


def runs_at(variant_cadence: str, run_cadence: str) -> bool:
    """Whether a variant of `variant_cadence` is evaluated by a run at `run_cadence`; MatrixError on an unknown
    cadence."""
    return _rank(variant_cadence) <= _rank(run_cadence)


@dataclass(frozen=True)
class Deferred:
    """A variant a run at some cadence leaves out: ``model/variant`` and the cadence that evaluates it."""

    model: str
    variant: str
    cadence: str

    @property
    def label(self) -> str:
        return f"{self.model}/{self.variant}"


def deferred_variants(matrix: Matrix, cadence: str) -> list[Deferred]:
    """The variants a run at `cadence` leaves out, in matrix order."""
    return [Deferred(m.name, v.name, v.cadence) for m in matrix.models for v in m.variants
            if not runs_at(v.cadence, cadence)]


def baseline_cadence_errors(matrix: Matrix) -> list[str]:
    """One message per model whose BF16 baseline is evaluated later than one of its quantized variants: at
    the variant's cadence its retention gates would have no baseline to be paired with."""
    return [e for e in map(_baseline_cadence_error, matrix.models) if e is not None]


def _baseline_cadence_error(m: Model) -> str | None:
    base = m.baseline
    early = [v for v in m.variants if v.format != "bf16" and _rank(v.cadence) < _rank(base.cadence)]
    if not early:
        return None
    first = min((v.cadence for v in early), key=_rank)
    verb = "runs" if len(early) == 1 else "run"
    return (
        f"models.{m.name}.variants.{base.name}: the BF16 baseline has cadence {base.cadence}, but "
        f"{', '.join(v.name for v in early)} {verb} at {first}: their retention gates would have no baseline at "
        f"--qg-cadence {first}; give the baseline the earliest cadence of its variants ({first}; "
        "a baseline is evaluated whenever any of its variants is)"
    )


def at_cadence(matrix: Matrix, cadence: str) -> Matrix:
    """The matrix a run at `cadence` evaluates: without the variants later than `cadence`, and without the
    models none of whose variants runs then. The same matrix (unchanged) when nothing is left out.

    Raises MatrixError (``baseline_cadence_errors``) when a model keeps a quantized variant but loses its
    baseline at this cadence."""
    deferred = {(d.model, d.variant) for d in deferred_variants(matrix, cadence)}
    if not deferred:
        return matrix
    models = []
    for m in matrix.models:
        kept = [v for v in m.variants if (m.name, v.name) not in deferred]
        if not kept:
            continue
        if (m.name, m.baseline.name) in deferred:
            raise MatrixError(_baseline_cadence_error(m) or f"models.{m.name}: the baseline is left out")
        models.append(m.model_copy(update={"variants": kept}))
    return matrix.model_copy(update={"models": models})


def deferred_line(deferred: list[Deferred], cadence: str, verb: str = "run") -> str | None:
    """The one line a run or reader prints about what it left out, with how to include it (``<verb> them with
    --qg-cadence ...``); None when nothing is left out."""
    if not deferred:
        return None
    later = sorted({d.cadence for d in deferred}, key=ORDER.index)
    listed = ", ".join(f"{d.label} ({d.cadence})" for d in deferred)
    how = " or ".join(f"--qg-cadence {c}" for c in later)
    return f"cadence: left out at {cadence} cadence, each to the cadence named: {listed}; {verb} them with {how}"


def snapshot_name(stem: str, matrix: Matrix, cadence: str) -> str:
    """The score-table snapshot's name for a matrix file's `stem` at `cadence`: the stem where the run
    evaluates only commit variants (so a nightly run of a matrix without later variants keeps its snapshot),
    else ``<stem>-<latest cadence it evaluates>`` (a nightly run's table has rows a commit run's lacks)."""
    included = [v.cadence for m in matrix.models for v in m.variants if runs_at(v.cadence, cadence)]
    latest = max(included, key=_rank, default="commit")
    return stem if latest == "commit" else f"{stem}-{latest}"

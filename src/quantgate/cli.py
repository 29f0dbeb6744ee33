"""The `quantgate` console script, a front door over the same pytest suite and the same library.

quantgate run [--matrix M] [--thresholds T] [PYTEST ARGS...]   run the regression suite, print verdict + table
quantgate report [--matrix M] [--out DIR]                      print the score tables; write figures + report.md
quantgate accept [--matrix M]                                  record current results as accepted baselines
quantgate check  [MATRIX...] [--matrix M] [--thresholds T]     validate matrices, thresholds and policy only
quantgate plan   [--matrix M] [--discordance D] [--base S]     n each gate needs, and its mdd at the matrix's n
quantgate merge SRC... --into DST                              merge shards' results directories (refuses conflicts)
quantgate accept --from-store [--matrix M]                     promote stored results to accepted baselines, no run
quantgate summary --junit J [--results DIR] [--annotations]    a CI job summary (Markdown) or ::error annotations
quantgate trend [--results DIR] [--png P]                      scores and retention over the runs in history.jsonl
quantgate init [DIR] [--force]                                 scaffold a project: matrix, thresholds, workflows
quantgate data [--matrix M] [--fetch]                          the datasets the matrix needs; fetch missing ones

`quantgate run` appends one line per run to <results>/history.jsonl (quantgate.history).

run, report, accept, check, plan and summary take --qg-limit N|TASK=N,... (the first N items of each task,
as pytest --qg-limit; readers read back the results of a run made with it); run, accept, check, summary,
report and plan take --qg-cadence commit|nightly|weekly (default commit): the policy's cadence, and the
variants evaluated, read or planned, those of that cadence and earlier (quantgate.cadence: commit < nightly <
weekly); each names the others in one line. `quantgate CMD --help` lists each command's options.

Exit codes of `quantgate run` (quantgate.run_verdict): 0 every counted gate passed; 1 a gate failed on
evidence of loss, a critical gate is MISSING, or another test failed or errored; 2 nothing failed but a gate
the policy blocks on is INCONCLUSIVE; 3 the run did not complete (bad configuration, usage, interrupted), or
nothing ran (every selected test skipped, or none selected: NOTHING RAN).
Every other command exits 3 on a usage or configuration error, and so does `quantgate report` when the results
folder holds no stored results for any model of the matrix (a wrong folder is not an empty report).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from quantgate.errors import QuantgateError
from quantgate.matrix import load_matrix, load_thresholds, with_task_limits
from quantgate.paths import results_dir
from quantgate.plugin import CALLER_PRINTS_VERDICT, STASH
from quantgate.policy import CADENCES, Policy, load_policy
from quantgate.run_verdict import EXIT_ERROR, RunVerdict


class _VerdictCollector:
    """Keeps the run's verdict (quantgate.run_verdict) and each skip's reason, for the CLI's summary."""

    def __init__(self) -> None:
        self.verdict: RunVerdict | None = None
        self.policy: Policy | None = None
        self.results: Path | None = None  # the session's results directory (--qg-results or QUANTGATE_RESULTS)
        self.skips: dict[str, list[str]] = {}

    def pytest_configure(self, config) -> None:  # noqa: ANN001 - pytest hook
        config.stash[CALLER_PRINTS_VERDICT] = True  # cmd_run prints the VERDICT line last, once

    def pytest_runtest_logreport(self, report) -> None:  # noqa: ANN001 - pytest hook
        if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")[:200]
            self.skips.setdefault(reason, []).append(report.nodeid)

    def pytest_sessionfinish(self, session) -> None:  # noqa: ANN001 - pytest hook
        qs = session.config.stash.get(STASH, None)
        if qs is not None:
            self.verdict, self.policy, self.results = qs.verdict(), qs.policy, qs.results


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    return Path(args.matrix).resolve(), Path(args.thresholds).resolve()


def _reading_run(matrix_path: Path, thresholds_path: Path, limit: str | None = None,
                 results: Path | None = None, cadence: str = "commit"):  # noqa: ANN202 - a quantgate.runner.Run
    """A Run that only reads stored results: it never builds a checkpoint or starts a server. It sees the
    variants a run at `cadence` evaluates, no others (quantgate.cadence)."""
    from quantgate.cadence import at_cadence
    from quantgate.runner import Run

    matrix = at_cadence(load_matrix(matrix_path), cadence)
    if limit:
        matrix = with_task_limits(matrix, limit)
    return Run(matrix, load_thresholds(thresholds_path), results or results_dir(), reuse_only=True)


def _tables(run, thresholds_path: Path) -> list[str]:  # noqa: ANN001 - a quantgate.runner.Run
    """The rendered score tables, with the distribution gates where thresholds/distribution.yaml sets them."""
    from quantgate import verdicts
    from quantgate.matrix_checks import check_distribution_limits, distribution_limits_path

    # a malformed or incomplete limits file stops `quantgate run` before it starts (cmd_run); a table is
    # printed without distribution gates then (the path argument only names the matrix in those errors)
    limits, errors = check_distribution_limits(run.matrix, thresholds_path, distribution_limits_path(thresholds_path))
    limits = None if errors else limits
    out = []
    for model in run.matrix.models:
        try:
            out.append(verdicts.score_table(run, model.name, partial=True, distribution_limits=limits).render())
        except QuantgateError as exc:
            out.append(f"(no complete table for {model.name}: {exc}; a run made with --qg-limit is read back "
                       "with the same --qg-limit)\n")
    return out


def _left_out(matrix_path: Path, cadence: str, verb: str) -> str | None:
    """The line naming the matrix's variants later than `cadence` (quantgate.cadence), or None."""
    from quantgate.cadence import deferred_line, deferred_variants

    return deferred_line(deferred_variants(load_matrix(matrix_path), cadence), cadence, verb)


def _model_names(matrix_path: Path, cadence: str) -> list[str]:
    """The names of the matrix's models that have a variant at `cadence` (quantgate.cadence)."""
    from quantgate.cadence import at_cadence

    return [m.name for m in at_cadence(load_matrix(matrix_path), cadence).models]


def _nothing_stored(matrix_path: Path, root: Path) -> str:
    """The one line saying that `root` holds no stored results for any model of the matrix, and what to do."""
    return (f"no stored results for any model of {matrix_path.name} in {root} (the results folder read): "
            f"`quantgate run --matrix {matrix_path} --qg-results {root}` (or QUANTGATE_RESULTS={root}) stores them "
            "there, or name the folder a run stored them in with --results DIR or QUANTGATE_RESULTS")


def _print_tables(matrix_path: Path, thresholds_path: Path, limit: str | None = None,
                  results: Path | None = None, cadence: str = "commit"):  # noqa: ANN202 - a quantgate.runner.Run
    """The score tables at `cadence` of the models with stored results; the others are named, and so are the
    variants left to a later cadence. Creates no results folder. Returns the reading Run.

    Raises QuantgateError (`quantgate report` exits 3) when no model of the matrix has stored results in the
    results folder: a report of nothing is a wrong folder or a matrix never run, not a success."""
    root = results or results_dir(create=False)
    names = _model_names(matrix_path, cadence)
    stored = [n for n in names if (root / n).is_dir()]
    if not stored:
        raise QuantgateError(_nothing_stored(matrix_path, root))
    left_out = _left_out(matrix_path, cadence, "report")
    if left_out is not None:
        print(left_out)
    for name in names:
        if name not in stored:
            print(f"(no stored results for {name} in {root}: nothing to report; `quantgate run --qg-results "
                  f"{root}` (or QUANTGATE_RESULTS={root}) stores them there)")
    run = _reading_run(matrix_path, thresholds_path, limit, root, cadence)
    for table in _tables(run, thresholds_path):
        print(table)
    return run


def _not_cached(run) -> str | None:  # noqa: ANN001 - a reading quantgate.runner.Run
    """Why variants with stored results were left out of the tables: each result's key names its checkpoint's
    sha256, which a reading run takes from the checkpoint cache and never builds; None when no such variant's
    checkpoint was missing from the cache."""
    from quantgate.checkpoints.cache import NotCachedError
    from quantgate.paths import cache_dir

    # only variants with stored results: one never run is left out of a partial table, and is no error
    missing = [vr for m in run.matrix.models for v in m.variants
               if isinstance((vr := run.variant(m.name, v.name)).failure, NotCachedError)
               and (run.store.root / m.name / v.name).is_dir()]
    if not missing:
        return None
    lines = [f"  {vr.label}: {vr.failure}" for vr in missing]
    return "\n".join([
        f"{len(missing)} variant(s) left out of the report: their checkpoints are not in the checkpoint cache "
        f"({cache_dir()}, QUANTGATE_CACHE), and a stored result is found by its checkpoint's sha256:", *lines,
        "point QUANTGATE_CACHE at the cache the run used, or `quantgate run` the same matrix to rebuild the "
        "checkpoints (a rebuilt checkpoint with the same sha256 finds its stored results again)",
    ])


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    matrix_path, thresholds_path = _paths(args)
    from quantgate.matrix_checks import check_distribution_limits, distribution_limits_path

    matrix = load_matrix(matrix_path)  # fail before pytest starts
    load_thresholds(thresholds_path), _policy(args)
    from quantgate.engines.vllm_server import user_engine_args_error

    env_args_error = user_engine_args_error()
    if env_args_error is not None:  # else every server start fails on it, each as a test failure
        raise QuantgateError(env_args_error)
    _, limit_errors = check_distribution_limits(matrix, matrix_path, distribution_limits_path(thresholds_path))
    if limit_errors:  # found here, not at the first distribution test after hours of builds
        raise QuantgateError("\n".join(limit_errors))
    if args.tests is not None and not Path(args.tests).is_dir():
        raise QuantgateError(f"no test suite at {args.tests} (--tests)")
    collector = _VerdictCollector()
    t0 = time.monotonic()
    code = pytest.main(_suite_argv(args, *extra), plugins=[collector])
    wall = time.monotonic() - t0
    print("\n" + "=" * 30 + " quantgate verdict " + "=" * 30)
    # Skips carry a reason each; grouped, the ones that matter are not lost among the `-m perf` ones.
    for reason, nodeids in collector.skips.items():
        where = nodeids[0] if len(nodeids) == 1 else f"{len(nodeids)} tests, e.g. {nodeids[0]}"
        print(f"  SKIPPED {where}\n          {reason}")
    if int(code) == pytest.ExitCode.NO_TESTS_COLLECTED:
        picks = [f"{a} {b!r}" for a, b in zip(extra, [*extra[1:], ""], strict=True) if a in ("-m", "-k")]
        picks += [a for a in extra if a.startswith(("-m", "-k")) and len(a) > 2]  # -mnvfp4, -knot_slow
        selection = " ".join(picks) or "the selection"
        print(f"VERDICT: NOTHING RAN (exit {EXIT_ERROR}): no test matched {selection} (pytest exit 5); "
              f"`pytest --markers` lists the markers, `quantgate run --collect-only` the tests  ({wall:.0f}s wall)")
        return EXIT_ERROR
    if collector.verdict is None or int(code) not in (0, 1):
        # pytest did not get to judge the suite (usage error, interrupted)
        print(f"VERDICT: ERROR (pytest exit {int(code)}), the run did not complete  ({wall:.0f}s wall)")
        if int(code) != pytest.ExitCode.USAGE_ERROR:  # a mistyped option is no run of the project's history
            _append_history(args, None, EXIT_ERROR, wall, collector.results, None)
        return EXIT_ERROR
    # The gates and the policy are listed just above, in pytest's terminal summary ("quantgate gates").
    print(f"{collector.verdict.lines()[-1]}  ({wall:.0f}s wall)")
    # the variants of this cadence only, as the suite evaluated them (its summary named the others)
    run = _reading_run(matrix_path, thresholds_path, args.qg_limit, collector.results, args.qg_cadence)
    for table in _tables(run, thresholds_path):
        print(table)
    _append_history(args, collector.verdict, collector.verdict.exit_code, wall, collector.results, run)
    return collector.verdict.exit_code


def _append_history(args: argparse.Namespace, verdict: RunVerdict | None, exit_code: int, wall: float,
                    results: Path | None, run) -> None:  # noqa: ANN001 - a reading quantgate.runner.Run or None
    """One line in <results>/history.jsonl; a failure to write it is reported, and the verdict stands."""
    from quantgate import history

    results = results or results_dir()
    try:
        variants = history.variant_records(run) if run is not None else {}
        hardware = run.hw.as_dict() if run is not None else None
        entry = history.run_entry(verdict, exit_code=exit_code, variants=variants, hardware=hardware,
                                  wall_s=wall, matrix=str(Path(args.matrix)), cadence=args.qg_cadence)
        path = history.append_entry(results, entry)
        print(f"history: appended run {len(history.read_history(path))} to {path}")
    except QuantgateError as exc:
        print(f"quantgate: warning: the run history was not written: {exc}", file=sys.stderr)


def _suite_argv(args: argparse.Namespace, *extra: str) -> list[str]:
    """pytest's arguments for the regression suite (never the selftests) on this matrix: the suite installed
    with quantgate (`--pyargs quantgate.suite`, so pytest's rootdir and ini file are the project's), or the
    folder --tests names."""
    matrix_path, thresholds_path = _paths(args)
    if args.tests is None:
        suite = ["--pyargs", "quantgate.suite"]
    else:
        tests = Path(args.tests)
        suite = [str(tests), "--ignore", str(tests / "selftest")]
    limit = ["--qg-limit", args.qg_limit] if args.qg_limit else []
    path = _policy_path(args)
    # `--opt=PATH`, one token: pytest picks its rootdir (and with it the ini file) from the bare paths among its
    # arguments, option values included, before it knows the plugin's options (quantgate.plugin)
    policy = [f"--qg-policy={path.resolve()}"] if path is not None else []
    return [
        *suite,
        f"--qg-matrix={matrix_path}", f"--qg-thresholds={thresholds_path}",
        "--qg-cadence", args.qg_cadence, "-p", "no:cacheprovider", *policy, *limit, *extra,
    ]


def cmd_report(args: argparse.Namespace) -> int:
    matrix_path, thresholds_path = _paths(args)
    results = _results_arg(args)
    run = _print_tables(matrix_path, thresholds_path, args.qg_limit, results, args.qg_cadence)
    if args.no_figures:
        return _report_complete(run)
    from quantgate import history
    from quantgate.matrix import load_distribution_thresholds
    from quantgate.matrix_checks import distribution_limits_path
    from quantgate.report.document import write_report

    limits_path = distribution_limits_path(thresholds_path)
    limits = load_distribution_thresholds(limits_path) if limits_path.exists() else None
    hist = history.history_path(results)
    entries = history.read_history(hist) if hist.exists() else None
    out = Path(args.out) if args.out else results / "report"
    files = write_report(run, out, distribution_limits=limits, history_entries=entries)
    for name, reason in files.missing.items():
        print(f"(no {name} figure: {reason})")
    print(f"report: {files.page} ({len(files.figures)} figures)")
    return _report_complete(run)


def _report_complete(run) -> int:  # noqa: ANN001 - a reading quantgate.runner.Run
    """0, or (what could be reported is written first) an error naming the checkpoints the cache lacks."""
    missing = _not_cached(run)
    if missing is not None:
        raise QuantgateError(missing)
    return 0


def cmd_accept(args: argparse.Namespace, extra: list[str]) -> int:
    if args.from_store:
        if extra:
            raise QuantgateError(f"accept --from-store runs no pytest: unrecognized arguments {' '.join(extra)}")
        from quantgate.promote import accept_stored

        run = _reading_run(*_paths(args), args.qg_limit, _results_arg(args), args.qg_cadence)
        promotion = accept_stored(run, force=args.force)
        for path in promotion.accepted:
            print(f"accepted: {path}")
        for line in promotion.skipped:
            print(f"skipped: {line}")
        for line in promotion.missing:
            print(f"not accepted: {line}")
        print(promotion.summary())
        return 0
    return int(pytest.main(_suite_argv(args, "--qg-accept", "-k", "regression", *extra)))


def _results_arg(args: argparse.Namespace) -> Path:
    """--results, else $QUANTGATE_RESULTS or results/; an explicit directory must exist."""
    if getattr(args, "results", None):
        path = Path(args.results).resolve()
        if not path.is_dir():
            raise QuantgateError(f"--results {args.results}: no such directory")
        return path
    return results_dir(create=False)  # readers leave no empty results folder behind


def cmd_summary(args: argparse.Namespace) -> int:
    from quantgate.report import job_summary

    junit = job_summary.read_junit(Path(args.junit))
    policy = _policy(args)
    verdict = job_summary.verdict_of(junit, policy, args.qg_cadence)
    if args.annotations:
        for line in job_summary.annotations(verdict, junit):
            print(line)
        return 0
    matrix_path, thresholds_path = _paths(args)
    results = _results_arg(args)
    if any((results / name).is_dir() for name in _model_names(matrix_path, verdict.cadence)):
        run = _reading_run(matrix_path, thresholds_path, args.qg_limit, results, verdict.cadence)
        tables = _tables(run, thresholds_path)
    else:
        # a run that stopped before storing a result still gets its summary (the verdict is the JUnit XML's);
        # the Scores section says which folder was read instead of a table per model that cannot be complete
        tables = [f"({_nothing_stored(matrix_path, results)})"]
    left_out = _left_out(matrix_path, verdict.cadence, "run")
    tables += [left_out] if left_out is not None else []
    bad = [link for link in args.link if "=" not in link]
    if bad:
        raise QuantgateError(f"--link {bad[0]!r}: expected NAME=URL")
    links = dict(link.split("=", 1) for link in args.link)
    print(job_summary.markdown(verdict, junit, tables, policy, links, _figure_links(args)))
    return 0


def _figure_links(args: argparse.Namespace) -> dict[str, str]:
    """The figures `quantgate report` wrote into <results>/report, linked under --report-url (where the report
    is published, e.g. the uploaded artifact), else named by their path inside the results directory."""
    from quantgate.report.document import REPORT_FILE

    report = _results_arg(args) / "report"
    if not (report / REPORT_FILE).exists():
        return {}
    base = args.report_url.rstrip("/") + "/" if args.report_url else "report/"
    return {p.name: base + p.name for p in [report / REPORT_FILE, *sorted(report.glob("*.png"))]}


def cmd_trend(args: argparse.Namespace) -> int:
    from quantgate import history

    results = _results_arg(args)
    entries = history.read_history(history.history_path(results))
    if args.cadence:
        entries = [e for e in entries if e.get("cadence") == args.cadence]
    if args.last:
        entries = entries[-args.last:]
    print(history.render_trend(entries), end="")
    png = Path(args.png) if args.png else results / "trend.png"
    try:
        print(f"trend plot: {history.plot_trend(entries, png)}")
    except QuantgateError as exc:
        if args.png:  # asked for explicitly: its absence is an error
            raise
        print(f"(no trend plot: {exc})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Each matrix named (positionally, or --matrix), one after the other; exit 3 when any has an error.

    Warnings exit 0. The last line of each says `valid`, or `valid, but` with the critical gates that the plan
    (quantgate.plan, at its default assumptions) expects INCONCLUSIVE or FAIL and those the matrix cannot
    produce (MISSING), each of which blocks the run.
    """
    paths = [*args.matrices, *([args.matrix] if args.matrix else [])] or [DEFAULT_MATRIX]
    code = 0
    for path in paths:
        try:
            _check_one(Path(path).resolve(), args)
        except QuantgateError as exc:
            print(f"quantgate: error: {exc}", file=sys.stderr)
            code = EXIT_ERROR
    return code


def _check_one(matrix_path: Path, args: argparse.Namespace) -> None:
    thresholds_path = Path(args.thresholds).resolve()
    m = load_matrix(matrix_path)
    if args.qg_limit:
        m = with_task_limits(m, args.qg_limit)
    th = load_thresholds(thresholds_path)
    policy = _policy(args)
    from quantgate.matrix_checks import (
        check_distribution_limits,
        check_matrix,
        distribution_limits_path,
        matrix_gate_names,
        policy_coverage_warnings,
    )
    from quantgate.paths import data_dir

    report = check_matrix(m, matrix_path, data_dir(required=False), th)
    limits_path = distribution_limits_path(thresholds_path)
    limits, limit_errors = check_distribution_limits(m, matrix_path, limits_path)
    report.errors.extend(limit_errors)
    missing = policy_coverage_warnings(m, policy, limits, limits_path)
    report.warnings.extend(missing)
    for line in report.notes:
        print(f"note: {line}")
    for line in report.warnings:
        print(f"warning: {line}")
    if report.errors:
        raise QuantgateError("\n".join([f"{matrix_path}: {len(report.errors)} error(s)", *report.errors]))
    print(policy.describe(args.qg_cadence, matrix_gate_names(m)))
    from quantgate.cadence import at_cadence, deferred_line, deferred_variants

    left_out = deferred_line(deferred_variants(m, args.qg_cadence), args.qg_cadence, "predict")
    if left_out is not None:
        print(f"note: {left_out}")
    # what a run at this cadence evaluates (check_matrix refused a baseline later than its variants)
    predicted = _predicted_blocking(at_cadence(m, args.qg_cadence), th, limits, policy, args.qg_cadence)
    for gate, outcome, tier in predicted:
        print(f"warning: {tier} gate {gate}: the plan predicts {outcome} at this n, which fails a run at cadence "
              f"{args.qg_cadence} (quantgate plan {matrix_path})")
    n = sum(len(x.variants) for x in m.models)
    head = f"{matrix_path}: {len(m.models)} model(s), {n} variant(s), {len(m.tasks)} task(s): valid"
    if not predicted and not missing:
        print(head)
        return
    counts = Counter(o for _, o, _ in predicted)
    parts = [f"{counts[o]} {o}" for o in ("FAIL", "INCONCLUSIVE") if counts[o]]
    parts += [f"{len(missing)} MISSING for every quantized variant"] if missing else []
    tiers = sorted({t for _, _, t in predicted} | ({"critical"} if missing else set()))
    print(f"{head}, but {' and '.join(tiers)} gates are predicted to block the run: {', '.join(parts)} (see the "
          f"warnings above and `quantgate plan {matrix_path}`)")


def _predicted_blocking(matrix, th, limits, policy: Policy,  # noqa: ANN001
                        cadence: str) -> list[tuple[str, str, str]]:
    """The plan's prediction for the gates that fail a run at `cadence` unless they PASS, at `quantgate plan`'s
    default assumptions (plan.blocking_gate_predictions)."""
    from quantgate.plan import (
        DEFAULT_BASE,
        DEFAULT_DISCORDANCE,
        DEFAULT_POWER,
        blocking_gate_predictions,
        distribution_plan_rows,
        parse_assumptions,
        plan_rows,
    )

    names = [t.name for t in matrix.tasks]
    base = parse_assumptions(DEFAULT_BASE, names, "--base")
    disc = parse_assumptions(DEFAULT_DISCORDANCE, names, "--discordance")
    rows = plan_rows(matrix, th, base, disc, power=DEFAULT_POWER)
    dist_rows = [] if limits is None else distribution_plan_rows(matrix, limits, DEFAULT_POWER)
    return blocking_gate_predictions(matrix, rows, dist_rows, policy, cadence)


def _policy_path(args: argparse.Namespace) -> Path | None:
    """--qg-policy, else policy.yaml beside the thresholds file, else None (the built-in default policy)."""
    if args.qg_policy:
        return Path(args.qg_policy)
    beside = Path(args.thresholds).parent / "policy.yaml"
    return beside if beside.exists() else None


def _policy(args: argparse.Namespace) -> Policy:
    from quantgate.policy import DEFAULT_POLICY

    path = _policy_path(args)
    return DEFAULT_POLICY if path is None else load_policy(path)


def cmd_plan(args: argparse.Namespace) -> int:
    from quantgate import plan
    from quantgate.cadence import at_cadence, deferred_line, deferred_variants
    from quantgate.matrix_checks import check_distribution_limits, distribution_limits_path

    matrix_path = Path(args.matrix)
    full = load_matrix(matrix_path)
    m = at_cadence(full, args.qg_cadence)  # the variants a run at this cadence evaluates
    if args.qg_limit:
        m = with_task_limits(m, args.qg_limit)
    th = load_thresholds(Path(args.thresholds))
    power = plan.DEFAULT_POWER if args.power is None else args.power
    base = plan.parse_assumptions(args.base or plan.DEFAULT_BASE, [t.name for t in m.tasks], "--base")
    disc = plan.parse_assumptions(args.discordance or plan.DEFAULT_DISCORDANCE, [t.name for t in m.tasks],
                                  "--discordance")
    rows = plan.plan_rows(m, th, base, disc, power=power)
    limits, limit_errors = check_distribution_limits(m, matrix_path, distribution_limits_path(Path(args.thresholds)))
    if limit_errors:
        raise QuantgateError("\n".join(limit_errors))
    dist_rows = [] if limits is None else plan.distribution_plan_rows(m, limits, power, plan.parse_doc_sd(args.doc_sd))
    print(plan.render_plan(rows, th.retention.level, power, dist_rows,
                           None if limits is None else limits.level, _policy(args)))
    left_out = deferred_line(deferred_variants(full, args.qg_cadence), args.qg_cadence, "plan")
    if left_out is not None:
        print(left_out)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from quantgate.merge import merge_results

    report = merge_results([Path(s) for s in args.sources], Path(args.into))
    print(f"{report.summary()} into {args.into}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from quantgate.scaffold import init_project

    report = init_project(Path(args.dir), force=args.force)
    for line in report.lines():
        print(line)
    print(f"quantgate project in {report.root}. The regression suite is installed with quantgate "
          "(quantgate.suite): `quantgate check`, then `quantgate run`, there.")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Exit 0 when everything the matrix reads is here (after --fetch), 1 when something is missing."""
    from quantgate.evaluation import hub_data
    from quantgate.paths import data_dir

    needs = hub_data.matrix_needs(load_matrix(Path(args.matrix)))
    data, cache = data_dir(required=False), hub_data.hub_cache_dir()
    lines, missing_hub, missing_files = hub_data.report_lines(needs, data, cache)
    print("\n".join(lines))
    if missing_hub and args.fetch:
        why = hub_data.hub_unreachable(missing_hub[0])
        if why is not None:
            print(f"cannot fetch: the Hugging Face Hub is not reachable ({why})")
        else:
            for ds in list(missing_hub):
                print(f"fetching {ds.label} ...", flush=True)
                try:
                    hub_data.fetch(ds)
                except Exception as exc:  # noqa: BLE001 - one dataset's failure is reported; the others go on
                    print(f"  failed: {type(exc).__name__}: {exc}")
                    continue
                missing_hub.remove(ds)
                print("  fetched")
    if missing_files:
        print(f"missing {len(missing_files)} data-folder file(s): put the offline bundle (shared/data) there or "
              "set QUANTGATE_DATA_DIR to it")
    if missing_hub:
        print(f"missing {len(missing_hub)} Hub dataset(s): " + ", ".join(d.label for d in missing_hub)
              + ("" if args.fetch else "; `quantgate data --fetch` downloads them where the Hub is reachable,"
                 " or put the offline bundle in QUANTGATE_DATA_DIR"))
    if missing_hub or missing_files:
        return 1
    print("all evaluation data the matrix needs is here")
    return 0


DEFAULT_MATRIX = "fixtures/demo.yaml"

_COMMAND_HELP = {
    "run": "run the regression suite (pytest), print the verdict and the score tables",
    "report": "print the score tables of the stored results; write figures and report.md",
    "accept": "record the current results as accepted baselines (--from-store: the stored ones, no run)",
    "check": "validate matrices, thresholds and policy, and predict the critical gates; builds and serves nothing",
    "plan": "the n each gate needs, and its minimum detectable drop at the matrix's n",
    "summary": "a CI job summary (Markdown) or ::error annotations from a run's JUnit XML",
}

# What --qg-limit does in each command: a limit is part of every result's key, so readers need the run's.
_LIMIT_HELP = {
    "run": "only the first N items of each task (or of the named ones); passed on to pytest",
    "accept": "the limit of the run: passed on to pytest, or (--from-store) the stored results to accept",
    "report": "read back the results of a run made with this --qg-limit",
    "summary": "read back the results of a run made with this --qg-limit",
    "check": "check the matrix with these task limits (as a run with this --qg-limit)",
    "plan": "plan with these task limits (as a run with this --qg-limit)",
}


# What --qg-cadence does in each command: the policy's cadence, and which variants (quantgate.cadence).
_CADENCE_HELP = {
    "run": "which cadence's policy applies (what INCONCLUSIVE does per tier), and which variants run: those of "
           "this cadence and earlier (commit < nightly < weekly); default commit",
    "accept": "the cadence of the run: its policy, and the variants it evaluates (or, --from-store, accepts)",
    "check": "the cadence whose policy is printed and whose variants the critical-gate prediction covers",
    "summary": "the run's cadence (default: the one its JUnit XML records): its policy and its variants",
    "report": "report the variants of this cadence and earlier (default commit, as `quantgate run`; the others "
              "are named in one line)",
    "plan": "plan the variants of this cadence and earlier (default commit; the others are named in one line)",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (the selftests parse the workflows' command lines with it)."""
    ap = _Parser(prog="quantgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name in ("run", "report", "accept", "check", "plan", "summary"):
        p = sub.add_parser(name, help=_COMMAND_HELP[name], description=_COMMAND_HELP[name])
        if name == "plan":
            p.add_argument("matrix_arg", nargs="?", default=None, metavar="MATRIX", help="matrix YAML (as --matrix)")
        if name == "check":
            p.add_argument("matrices", nargs="*", metavar="MATRIX",
                           help="matrix YAML files to check, one after the other (as --matrix)")
        p.add_argument("--matrix", "--qg-matrix", dest="matrix", default=None if name == "check" else DEFAULT_MATRIX,
                       help=f"matrix YAML (default {DEFAULT_MATRIX})")
        if name in ("run", "accept", "check", "summary", "report", "plan"):
            p.add_argument("--qg-cadence", choices=CADENCES, default="commit", help=_CADENCE_HELP[name])
        if name != "report":
            p.add_argument("--qg-policy", default=None, help="policy YAML (default: policy.yaml beside thresholds)")
        p.add_argument("--thresholds", default="thresholds/retention.yaml", help="retention thresholds YAML")
        if name in ("run", "accept"):
            p.add_argument("--tests", default=None, metavar="DIR",
                           help="a test folder to run instead of the installed suite (quantgate.suite)")
        p.add_argument("--qg-limit", default=None, metavar="N|TASK=N,...", help=_LIMIT_HELP[name])
        if name == "plan":
            # defaults None: quantgate.plan's DEFAULT_* apply (cmd_plan), the ones `quantgate check` predicts with
            p.add_argument("--discordance", default=None, metavar="D|TASK=D,...",
                           help="assumed fraction of items a variant answers differently from BF16 (default 0.10)")
            p.add_argument("--base", default=None, metavar="S|TASK=S,...",
                           help="assumed BF16 score (0..1) per task (default 0.5)")
            p.add_argument("--power", type=float, default=None,
                           help="power for the minimum detectable drop (default 0.8)")
            p.add_argument("--doc-sd", default=None, metavar="GATE=SD,...",
                           help="assumed per-document sd of a distribution gate (default: the measured one)")
        if name == "accept":
            p.add_argument("--from-store", action="store_true",
                           help="accept the stored results as they are: run nothing, build nothing, serve nothing")
            p.add_argument("--force", action="store_true",
                           help="replace an accepted baseline even by a result of fewer items (a --qg-limit run)")
        if name in ("accept", "summary", "report"):
            p.add_argument("--results", default=None, metavar="DIR",
                           help="results directory (default: $QUANTGATE_RESULTS or results/)")
        if name == "report":
            p.add_argument("--out", default=None, metavar="DIR",
                           help="where the figures and report.md go (default <results>/report)")
            p.add_argument("--no-figures", action="store_true", help="print the tables only")
        if name == "summary":
            p.add_argument("--junit", required=True, metavar="XML", help="the JUnit XML of the run (--junitxml)")
            p.add_argument("--annotations", action="store_true",
                           help="print GitHub ::error/::warning workflow commands instead of the Markdown summary")
            p.add_argument("--link", action="append", default=[], metavar="NAME=URL",
                           help="a link listed under Artifacts (repeatable)")
            p.add_argument("--report-url", default=None, metavar="URL",
                           help="where <results>/report is published: the summary links its figures there")
            p.set_defaults(qg_cadence=None)  # the run's own cadence, from its JUnit properties
    trend_help = "scores and retention over the runs of <results>/history.jsonl"
    trend = sub.add_parser("trend", help=trend_help, description=trend_help)
    trend.add_argument("--results", default=None, metavar="DIR",
                       help="results directory (default: $QUANTGATE_RESULTS or results/)")
    trend.add_argument("--png", default=None, metavar="PATH",
                       help="write the trend plot here (default <results>/trend.png when matplotlib is installed)")
    trend.add_argument("--last", type=int, default=None, metavar="N", help="only the last N runs")
    trend.add_argument("--qg-cadence", choices=CADENCES, default=None, dest="cadence",
                       help="only the runs at this cadence")
    # the option's name before session 8, kept so that existing workflows keep working
    trend.add_argument("--cadence", choices=CADENCES, dest="cadence", help=argparse.SUPPRESS)
    init_help = "scaffold a project: matrix, thresholds, CI workflows, pytest.ini, .gitignore"
    init = sub.add_parser("init", help=init_help, description=init_help)
    init.add_argument("dir", nargs="?", default=".", metavar="DIR", help="the project folder (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite files that exist")
    data_help = "the evaluation datasets the matrix needs, which are here; --fetch the rest"
    data = sub.add_parser("data", help=data_help, description=data_help)
    data.add_argument("--matrix", "--qg-matrix", dest="matrix", default=DEFAULT_MATRIX,
                      help=f"matrix YAML (default {DEFAULT_MATRIX})")
    data.add_argument("--fetch", action="store_true",
                      help="download the missing Hub datasets (datasets.load_dataset) when the Hub is reachable")
    merge_help = "merge the results directories of a run's shards into one"
    merge = sub.add_parser("merge", help=merge_help, description=merge_help)
    merge.add_argument("sources", nargs="+", metavar="SRC", help="a shard's results directory")
    merge.add_argument("--into", required=True, metavar="DST", help="the merged results directory")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra and args.cmd not in ("run", "accept"):
        ap.error(f"quantgate {args.cmd}: unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "matrix_arg", None):
        args.matrix = args.matrix_arg
    try:
        if args.cmd == "merge":
            if extra:
                ap.error(f"merge: unrecognized arguments: {' '.join(extra)}")
            return cmd_merge(args)
        if args.cmd == "run":
            return cmd_run(args, extra)
        if args.cmd == "accept":
            return cmd_accept(args, extra)
        if args.cmd == "report":
            return cmd_report(args)
        if args.cmd == "summary":
            return cmd_summary(args)
        if args.cmd == "trend":
            return cmd_trend(args)
        if args.cmd == "init":
            return cmd_init(args)
        if args.cmd == "data":
            return cmd_data(args)
        if args.cmd == "plan":
            return cmd_plan(args)
        return cmd_check(args)
    except QuantgateError as exc:
        print(f"quantgate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # the reader went away (`quantgate summary ... | head`): what it read was printed; no traceback.
        # stdout is pointed at devnull so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; 2 means INCONCLUSIVE here, so a usage error exits 3."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())

"""The `quantgate` console script, a front door over the same pytest suite and the same library.

quantgate run [--matrix M] [--thresholds T] [PYTEST ARGS...]   run the regression suite, print verdict + table
quantgate report [--matrix M]                                  print the score table from stored results
quantgate accept [--matrix M]                                  record current results as accepted baselines
quantgate check  [--matrix M] [--thresholds T]                 validate the matrix and thresholds only

Every command takes --qg-limit N|TASK=N,... (the first N items of each task, as pytest --qg-limit).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest

from quantgate.errors import QuantgateError
from quantgate.matrix import load_matrix, load_thresholds, with_task_limits
from quantgate.paths import results_dir


class _VerdictCollector:
    """Collects each test's outcome, so the CLI can print a one-screen verdict after pytest's own output."""

    def __init__(self) -> None:
        self.outcomes: dict[str, tuple[str, str]] = {}

    def pytest_runtest_logreport(self, report) -> None:  # noqa: ANN001 - pytest hook
        if report.when == "call" or report.outcome in ("failed", "skipped") and report.when == "setup":
            detail = ""
            if report.failed:
                lines = str(
                    report.longrepr.reprcrash.message
                    if hasattr(report.longrepr, "reprcrash")
                    else report.longrepr
                ).splitlines() or [""]
                detail = lines[0][:160]
                # A gate's message says why on its `verdict` line (the n it needs, the bound it missed).
                why = next((ln.strip() for ln in lines[1:] if ln.strip().startswith("verdict ")), None)
                if why:
                    detail += "\n          " + why[:200]
            elif report.skipped and isinstance(report.longrepr, tuple):
                detail = str(report.longrepr[2])[:160]
            self.outcomes[report.nodeid] = (report.outcome, detail)


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    return Path(args.matrix).resolve(), Path(args.thresholds).resolve()


def _print_tables(matrix_path: Path, thresholds_path: Path, limit: str | None = None) -> None:
    from quantgate import verdicts
    from quantgate.runner import Run

    matrix = load_matrix(matrix_path)
    if limit:
        matrix = with_task_limits(matrix, limit)
    run = Run(matrix, load_thresholds(thresholds_path), results_dir(), reuse_only=True)
    for model in run.matrix.models:
        try:
            print(verdicts.score_table(run, model.name, partial=True).render())
        except QuantgateError as exc:
            print(f"(no complete table for {model.name}: {exc})")


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    matrix_path, thresholds_path = _paths(args)
    load_matrix(matrix_path), load_thresholds(thresholds_path)  # fail before pytest starts
    tests = Path(args.tests)
    if not tests.is_dir():
        raise QuantgateError(f"no regression suite at {tests}: run from the project root or pass --tests")
    collector = _VerdictCollector()
    t0 = time.monotonic()
    code = pytest.main(_suite_argv(args, *extra), plugins=[collector])
    wall = time.monotonic() - t0
    counts: dict[str, int] = {}
    for outcome, _ in collector.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    print("\n" + "=" * 30 + " quantgate verdict " + "=" * 30)
    skips: dict[str, list[str]] = {}
    for nodeid, (outcome, detail) in collector.outcomes.items():
        if outcome == "skipped":
            skips.setdefault(detail.removeprefix("Skipped: "), []).append(nodeid)
        elif outcome != "passed":
            print(f"  {outcome.upper():7} {nodeid}" + (f"\n          {detail}" if detail else ""))
    # Skips carry a reason each; grouped, the ones that matter are not lost among the `-m perf` ones.
    for reason, nodeids in skips.items():
        where = nodeids[0] if len(nodeids) == 1 else f"{len(nodeids)} tests, e.g. {nodeids[0]}"
        print(f"  SKIPPED {where}\n          {reason}")
    verdict = "PASS" if code == 0 else ("FAIL" if code == 1 else f"ERROR (pytest exit {int(code)})")
    print(
        f"VERDICT: {verdict}  "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"  ({wall:.0f}s wall)"
    )
    _print_tables(matrix_path, thresholds_path, args.qg_limit)
    return int(code)


def _suite_argv(args: argparse.Namespace, *extra: str) -> list[str]:
    """pytest's arguments for the regression suite (never the selftests) on this matrix."""
    matrix_path, thresholds_path = _paths(args)
    tests = Path(args.tests)
    limit = ["--qg-limit", args.qg_limit] if args.qg_limit else []
    return [
        str(tests), "--ignore", str(tests / "selftest"),
        "--qg-matrix", str(matrix_path), "--qg-thresholds", str(thresholds_path),
        "-p", "no:cacheprovider", *limit, *extra,
    ]


def cmd_report(args: argparse.Namespace) -> int:
    _print_tables(*_paths(args), args.qg_limit)
    return 0


def cmd_accept(args: argparse.Namespace, extra: list[str]) -> int:
    return int(pytest.main(_suite_argv(args, "--qg-accept", "-k", "regression", *extra)))


def cmd_check(args: argparse.Namespace) -> int:
    matrix_path, thresholds_path = _paths(args)
    m = load_matrix(matrix_path)
    if args.qg_limit:
        m = with_task_limits(m, args.qg_limit)
    th = load_thresholds(thresholds_path)
    from quantgate.matrix_checks import check_matrix
    from quantgate.paths import data_dir

    report = check_matrix(m, matrix_path, data_dir(required=False), th)
    for line in report.notes:
        print(f"note: {line}")
    for line in report.warnings:
        print(f"warning: {line}")
    if report.errors:
        raise QuantgateError("\n".join([f"{matrix_path}: {len(report.errors)} error(s)", *report.errors]))
    n = sum(len(x.variants) for x in m.models)
    print(f"{matrix_path}: {len(m.models)} model(s), {n} variant(s), {len(m.tasks)} task(s): valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="quantgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "accept", "check"):
        p = sub.add_parser(name)
        p.add_argument("--matrix", default="fixtures/demo.yaml")
        p.add_argument("--thresholds", default="thresholds/retention.yaml")
        p.add_argument("--tests", default="tests")
        p.add_argument("--qg-limit", default=None, metavar="N|TASK=N,...",
                       help="only the first N items of each task (or the named ones); passed on to pytest")
    args, extra = ap.parse_known_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args, extra)
        if args.cmd == "accept":
            return cmd_accept(args, extra)
        if args.cmd == "report":
            return cmd_report(args)
        return cmd_check(args)
    except QuantgateError as exc:
        print(f"quantgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `quantgate` console script, a front door over the same pytest suite and the same library.

quantgate run [--matrix M] [--thresholds T] [PYTEST ARGS...]   run the regression suite, print verdict + table
quantgate report [--matrix M] [--qg-limit L]                  print the score table from stored results
quantgate accept [--matrix M]                                  record current results as accepted baselines
quantgate check  [--matrix M] [--thresholds T]                 validate the matrix and thresholds only
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
    code = pytest.main(_suite_argv(tests, matrix_path, thresholds_path, *extra), plugins=[collector])
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
    _print_tables(matrix_path, thresholds_path, _limit_of(extra))
    return int(code)


def _limit_of(pytest_args: list[str]) -> str | None:
    """The `--qg-limit` among the arguments passed through to pytest, so the table shows what just ran."""
    for i, arg in enumerate(pytest_args):
        if arg.startswith("--qg-limit="):
            return arg.split("=", 1)[1]
        if arg == "--qg-limit" and i + 1 < len(pytest_args):
            return pytest_args[i + 1]
    return None


def _suite_argv(tests: Path, matrix_path: Path, thresholds_path: Path, *extra: str) -> list[str]:
    """pytest's arguments for the regression suite (never the selftests) on this matrix."""
    return [
        str(tests), "--ignore", str(tests / "selftest"),
        "--qg-matrix", str(matrix_path), "--qg-thresholds", str(thresholds_path),
        "-p", "no:cacheprovider", *extra,
    ]


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    _print_tables(*_paths(args), _limit_of(extra))
    return 0


def cmd_accept(args: argparse.Namespace, extra: list[str]) -> int:
    matrix_path, thresholds_path = _paths(args)
    argv = _suite_argv(Path(args.tests), matrix_path, thresholds_path, "--qg-accept", "-k", "regression", *extra)
    return int(pytest.main(argv))


def cmd_check(args: argparse.Namespace) -> int:
    matrix_path, thresholds_path = _paths(args)
    m = load_matrix(matrix_path)
    load_thresholds(thresholds_path)
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
    args, extra = ap.parse_known_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args, extra)
        if args.cmd == "accept":
            return cmd_accept(args, extra)
        if args.cmd == "report":
            return cmd_report(args, extra)
        return cmd_check(args)
    except QuantgateError as exc:
        print(f"quantgate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

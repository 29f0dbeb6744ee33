"""Wall time of a warm rerun: `quantgate run` (or pytest on the suite) when every result is already stored.

Each rerun is a fresh child process, timed from spawn to exit, so the figure includes the interpreter start
and the imports a user pays. A warm rerun must build nothing, start no server and evaluate nothing; a child
whose output does not say so ("nothing changed" in `quantgate run`'s summary, or a pytest run that failed) is
reported as not warm, and its time is not a warm figure. One untimed rerun goes first: it checks the store
is warm before N timed ones, and fills a bytecode cache when --pycache-prefix is given. The load average
(os.getloadavg, 1 and 5 minutes) before and after the timed runs is printed with them: on a shared 2-core
machine it moves the figure by seconds.

Bytecode: with PYTHONDONTWRITEBYTECODE=1 and a virtual environment installed without .pyc files (uv's
default), every import compiles its module from source on every run. --pycache-prefix DIR lets Python write
the bytecode under DIR (PYTHONPYCACHEPREFIX) without touching the environment, which is what an ordinary
installation does on first use.

  python benchmarks/warm_rerun.py --results results                       # 5 warm `quantgate run`
  python benchmarks/warm_rerun.py --results results --runs 9 --mode pytest
  python benchmarks/warm_rerun.py --results results --pycache-prefix /tmp/pyc -- --qg-matrix fixtures/demo.yaml
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 3.0  # issue 14: a warm rerun in at most 3 s
HEAVY = ("torch", "vllm", "lm_eval", "transformers", "datasets")


def rerun_command(mode: str, python: str, extra: list[str]) -> list[str]:
    """The child's argv: the console script's own entry point, or pytest on the regression suite (the one
    `quantgate run` runs, `--pyargs quantgate.suite`; `tests/` holds the selftests) with the demo matrix."""
    if mode == "cli":
        return [python, "-c", "import sys; from quantgate.cli import main; sys.exit(main())", "run", *extra]
    matrix = [] if any(a.startswith("--qg-matrix") for a in extra) else ["--qg-matrix", "fixtures/demo.yaml"]
    return [python, "-m", "pytest", "--pyargs", "quantgate.suite", "-q", "-p", "no:cacheprovider", *matrix, *extra]


def child_env(results: Path, pycache_prefix: Path | None) -> dict[str, str]:
    env = dict(os.environ, QUANTGATE_RESULTS=str(results))
    if pycache_prefix is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache_prefix)
    return env


def one_rerun(cmd: list[str], env: dict[str, str], mode: str, project: Path) -> tuple[float, bool, str]:
    """(wall seconds, warm?, last output lines) of one child, run in `project` (fixtures/, tests/)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if mode == "cli":
        warm = "nothing changed" in out and proc.returncode in (0, 1, 2)
    else:
        warm = proc.returncode in (0, 1) and "evaluating " not in out and "starting vLLM" not in out
    return wall, warm, "\n".join(out.strip().splitlines()[-6:])


def heavy_imports(python: str, env: dict[str, str], project: Path) -> list[str]:
    """Heavy modules that importing the pytest plugin pulls in (should be none)."""
    code = ("import sys, quantgate.plugin, quantgate.cli; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([python, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    return proc.stdout.split()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True, help="a results directory holding every result")
    ap.add_argument("--runs", type=int, default=5, help="timed reruns (default 5)")
    ap.add_argument("--mode", choices=("cli", "pytest"), default="cli",
                    help="cli: `quantgate run`; pytest: `pytest --pyargs quantgate.suite --qg-matrix "
                         "fixtures/demo.yaml`")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the environment to time")
    ap.add_argument("--project", type=Path, default=ROOT,
                    help="project root the reruns run in (its fixtures/ and tests/; default this checkout)")
    ap.add_argument("--pycache-prefix", type=Path, default=None,
                    help="let Python cache bytecode under this folder (PYTHONPYCACHEPREFIX)")
    args, extra = ap.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if not args.results.is_dir():
        ap.error(f"--results {args.results}: not a directory")
    env = child_env(args.results.resolve(), args.pycache_prefix)
    cmd = rerun_command(args.mode, args.python, extra)

    wall, warm, tail = one_rerun(cmd, env, args.mode, args.project)  # untimed: is the store warm?
    if not warm:
        print(f"not a warm rerun ({wall:.1f} s): the store at {args.results} does not hold every result, or the "
              f"run failed:\n{tail}", file=sys.stderr)
        return 1
    load_before = os.getloadavg()
    walls = []
    for _ in range(args.runs):
        wall, warm, tail = one_rerun(cmd, env, args.mode, args.project)
        if not warm:
            print(f"a rerun was not warm:\n{tail}", file=sys.stderr)
            return 1
        walls.append(wall)
    load_after = os.getloadavg()
    heavy = heavy_imports(args.python, env, args.project)
    med = statistics.median(walls)
    print(f"warm rerun, {args.mode} ({' '.join(cmd[2:] if args.mode == 'cli' else cmd[1:])}), "
          f"{args.runs} runs, bytecode cache: {args.pycache_prefix or 'as the environment has it'}")
    print("| runs | median s | min s | max s | stdev s | goal s | load avg 1/5 min before -> after | CPUs "
          "| heavy modules after importing the plugin |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---|")
    spread = statistics.stdev(walls) if len(walls) > 1 else 0.0
    load = f"{load_before[0]:.2f}/{load_before[1]:.2f} -> {load_after[0]:.2f}/{load_after[1]:.2f}"
    print(f"| {len(walls)} | {med:.2f} | {min(walls):.2f} | {max(walls):.2f} | {spread:.2f} | {GOAL_S:.0f} | "
          f"{load} | {os.cpu_count()} | {', '.join(heavy) or 'none'} |")
    print("last output lines of the last rerun:\n" + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())

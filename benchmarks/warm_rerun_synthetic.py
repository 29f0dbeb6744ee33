"""Warm rerun without a real store: tests/selftest/test_warm_imports.py's fully stored synthetic run (one model,
two variants, two tasks, stand-in checkpoints, every result keyed by the real runner) collected and rerun by
pytest in a fresh child N+1 times (the first untimed); prints wall seconds, what was reused and the heavy
modules the child imported. The child imports `requests` through the test harness, which the real path does
not, so this is an upper bound of collection + reuse; benchmarks/warm_rerun.py times a real populated store.

  PYTHONPATH=$PWD/src python benchmarks/warm_rerun_synthetic.py DIR [RUNS]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    tmp = Path(argv[0])
    runs = int(argv[1]) if len(argv) > 1 else 5
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["QUANTGATE_CACHE"] = str(tmp / "cache")
    import pytest

    from tests.selftest import test_warm_imports as tw

    results, matrix, thresholds = tw.stored_synthetic_run(tmp, pytest.MonkeyPatch().setattr)
    env = dict(os.environ, QUANTGATE_CACHE=str(tmp / "cache"), QUANTGATE_RESULTS=str(results),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]))
    child = [sys.executable, "-c", tw.CHILD, str(tmp), str(ROOT / "src" / "quantgate" / "suite"),
             "--qg-matrix", str(matrix), "--qg-thresholds", str(thresholds), "-p", "no:cacheprovider", "-q",
             # the child's rootdir is this checkout: its score-table candidate goes under DIR, not tests/__snapshots__
             "--qg-snapshots", str(tmp / "snapshots"), "-k", "not test_checkpoint_structure"]
    walls = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(child, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
            return 1
        out = json.loads(lines[-1].removeprefix("RESULT "))
        ev = out["events"]
        print(f"run {i}{' (untimed)' if i == 0 else ''}: {wall:.2f} s, reused {len(ev['reused'])}, "
              f"evaluated {ev['evaluated']}, heavy {out['heavy']}", flush=True)
        if i:
            walls.append(wall)
    print(f"median {statistics.median(walls):.2f} s, min {min(walls):.2f}, max {max(walls):.2f} "
          f"over {len(walls)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

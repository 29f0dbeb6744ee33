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
    import yaml

    from quantgate.evaluation.provenance import versions
    from tests.selftest import fault_harness as fh
    from tests.selftest import test_warm_imports as tw

    fh.patch(pytest.MonkeyPatch().setattr, tmp)
    results = tmp / "results"
    run = fh.make_run(results)
    for variant in ("bf16", "w8a8"):
        vr = run.variant(fh.MODEL, variant)
        kernel = f"kernel-of-{variant}"
        run.server_records.put(vr.server_key(), {"kernel_path": kernel, "log": f"{variant}.log"})
        for task in run.matrix.tasks:
            metric = task.metric_key.split(",")[0]
            run.store.put(fh.MODEL, variant, task.key, vr.eval_key(task, kernel), {"versions": versions()},
                          {task.metric_key: 1.0}, tw._rows(task.name, metric), None)
    matrix, thresholds = tmp / "matrix.yaml", tmp / "thresholds.yaml"
    matrix.write_text(yaml.safe_dump(fh.MATRIX))
    thresholds.write_text(yaml.safe_dump(fh.THRESHOLDS))
    env = dict(os.environ, QUANTGATE_CACHE=str(tmp / "cache"), QUANTGATE_RESULTS=str(results),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]))
    child = [sys.executable, "-c", tw.CHILD, str(tmp), str(ROOT / "src" / "quantgate" / "suite"),
             "--qg-matrix", str(matrix), "--qg-thresholds", str(thresholds), "-p", "no:cacheprovider", "-q",
             "-k", "not test_checkpoint_structure"]
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

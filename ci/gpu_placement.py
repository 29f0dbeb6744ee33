"""Record which processes hold which GPU while a run goes on, through NVML (nvidia-ml-py), and what each one is:
the vLLM server of which variant (its --served-model-name), started by which pytest-xdist worker
(PYTEST_XDIST_WORKER in its environment) with which CUDA_VISIBLE_DEVICES.

usage: python ci/gpu_placement.py OUT.jsonl [--interval 1] [--stop-file PATH]
Samples until the stop file exists (or SIGTERM); then writes OUT.summary.json: per (worker, variant), the GPUs
seen and the peak memory. Lines of OUT.jsonl: {"t", "gpu", "uuid", "pid", "used_mib", "worker", "cvd", "served"}.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path


def describe(pid: int) -> dict:
    """What /proc says about a GPU process and its ancestors (the worker is found in the environment, which
    vLLM's engine processes inherit from the API server, which inherits it from the worker)."""
    import psutil

    out: dict = {"worker": None, "cvd": None, "served": None, "cmd": None}
    try:
        p = psutil.Process(pid)
    except psutil.Error:
        return out  # another PID namespace (a container): NVML's PIDs are the host's
    chain = [p, *p.parents()]
    for q in chain:
        try:
            env = q.environ()
            cmd = q.cmdline()
        except psutil.Error:
            continue
        out["cmd"] = out["cmd"] or " ".join(cmd)[:300]
        out["worker"] = out["worker"] or env.get("PYTEST_XDIST_WORKER")
        out["cvd"] = out["cvd"] or env.get("CUDA_VISIBLE_DEVICES")
        if "--served-model-name" in cmd and out["served"] is None:
            out["served"] = cmd[cmd.index("--served-model-name") + 1]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--stop-file", default=None)
    args = ap.parse_args()
    import pynvml

    pynvml.nvmlInit()
    n = pynvml.nvmlDeviceGetCount()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
    uuids = [pynvml.nvmlDeviceGetUUID(h) for h in handles]
    uuids = [u.decode() if isinstance(u, bytes) else u for u in uuids]
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("now", True))
    seen: dict[tuple, dict] = {}
    known: dict[int, dict] = {}
    out = Path(args.out)
    with open(out, "a") as fh:
        while not stop["now"] and not (args.stop_file and Path(args.stop_file).exists()):
            t = time.time()
            for i, h in enumerate(handles):
                try:
                    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                except pynvml.NVMLError as exc:
                    fh.write(json.dumps({"t": t, "gpu": i, "error": str(exc)}) + "\n")
                    continue
                for p in procs:
                    info = known.get(p.pid) or describe(p.pid)
                    if info.get("served"):
                        known[p.pid] = info
                    used = (p.usedGpuMemory or 0) / 2**20
                    row = {"t": round(t, 1), "gpu": i, "uuid": uuids[i], "pid": p.pid, "used_mib": round(used),
                           **{k: info[k] for k in ("worker", "cvd", "served")}}
                    fh.write(json.dumps(row) + "\n")
                    key = (info["worker"], info["served"], info["cvd"])
                    s = seen.setdefault(key, {"worker": key[0], "variant": key[1], "cuda_visible_devices": key[2],
                                              "gpus": set(), "pids": set(), "peak_mib": 0})
                    s["gpus"].add(i)
                    s["pids"].add(p.pid)
                    s["peak_mib"] = max(s["peak_mib"], round(used))
            fh.flush()
            time.sleep(args.interval)
    summary = [{**s, "gpus": sorted(s["gpus"]), "pids": sorted(s["pids"])} for s in seen.values()]
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    for s in summary:
        print(f"worker {s['worker']} variant {s['variant']} CUDA_VISIBLE_DEVICES={s['cuda_visible_devices']} "
              f"-> GPU(s) {s['gpus']} (pids {s['pids']}, peak {s['peak_mib']} MiB)")
    pynvml.nvmlShutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

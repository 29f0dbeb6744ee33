"""A stand-in for builders/llmcompressor_build.py, for fault injection (no llm-compressor, no calibration).

Called as quantgate calls a builder (`python <script> --spec <spec.json>`), it exports the base checkpoint's
files into spec["out"] (config.json first, then the weights) and behaves as env STANDIN_BUILD_MODE says:
  ok      copies every file of the base and exits 0 (once the file STANDIN_BUILD_GATE exists, if set)
  killed  spawns a worker (as a calibration run may), writes half of the weights, then SIGKILLs itself
  hang    spawns a worker, writes half of the weights, then sleeps (to be signalled from outside)
STANDIN_BUILD_COUNT, if set, gets one line per build started ("<pid>"): how often the builder ran.
STANDIN_BUILD_PIDFILE, if set, receives "<builder pid> <worker pid>" once the partial export is written.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

spec = json.loads(Path(sys.argv[sys.argv.index("--spec") + 1]).read_text())
base, out = Path(spec["base"]), Path(spec["out"])
mode = os.environ.get("STANDIN_BUILD_MODE", "ok")
if os.environ.get("STANDIN_BUILD_COUNT"):
    with open(os.environ["STANDIN_BUILD_COUNT"], "a") as fh:
        fh.write(f"{os.getpid()}\n")

shutil.copy2(base / "config.json", out / "config.json")
if mode == "ok":
    while os.environ.get("STANDIN_BUILD_GATE") and not os.path.exists(os.environ["STANDIN_BUILD_GATE"]):
        time.sleep(0.05)
    for f in base.iterdir():
        shutil.copy2(f, out / f.name)
    sys.exit(0)

worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
weights = (base / "model.safetensors").read_bytes()
(out / "model.safetensors").write_bytes(weights[: len(weights) // 2])
if os.environ.get("STANDIN_BUILD_PIDFILE"):
    with open(os.environ["STANDIN_BUILD_PIDFILE"] + ".tmp", "w") as fh:
        fh.write(f"{os.getpid()} {worker.pid}")
    os.replace(os.environ["STANDIN_BUILD_PIDFILE"] + ".tmp", os.environ["STANDIN_BUILD_PIDFILE"])
print(f"exporting to {out}", file=sys.stderr, flush=True)
if mode == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(600)

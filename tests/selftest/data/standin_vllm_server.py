"""A stand-in for `vllm serve MODEL ...` (quantgate.engines.vllm_cli), for fault injection (no model, no vLLM).

It takes vLLM's command line (only --port is read), spawns a child that sleeps (as vLLM spawns its engine
core) in its process group, and then behaves as env STANDIN_MODE says:
  healthy        /health answers 200; POST /v1/completions needs `Authorization: Bearer $VLLM_API_KEY`
                 (401 otherwise, as vLLM's AuthenticationMiddleware) and answers one choice; a prompt "die"
                 makes the server exit with code 1 without answering (a crash mid-request); a prompt
                 "hang-up" logs vLLM 0.26's API-server crash (reports/gpu-h200.md, session 8), leaves the
                 request unanswered and closes the port, and the leader exits 1 only STANDIN_HANGUP_EXIT_S
                 (default 5) seconds later, as vLLM's launcher shuts its other API servers down
  crash          prints STANDIN_MESSAGE (default: a crash line) and exits 1 before serving
  never-healthy  /health answers 503 forever
STANDIN_PIDFILE, if set, receives "<leader pid> <child pid>" once the child runs.
"""

import http.server
import json
import os
import subprocess
import sys
import threading
import time

mode = os.environ.get("STANDIN_MODE", "healthy")
port = int(sys.argv[sys.argv.index("--port") + 1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
if os.environ.get("STANDIN_PIDFILE"):
    with open(os.environ["STANDIN_PIDFILE"] + ".tmp", "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}")
    os.replace(os.environ["STANDIN_PIDFILE"] + ".tmp", os.environ["STANDIN_PIDFILE"])
print("Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8", flush=True)

if mode == "crash":
    print(os.environ.get("STANDIN_MESSAGE", "RuntimeError: engine core failed to start"), flush=True)
    sys.exit(1)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(200 if mode == "healthy" and self.path == "/health" else 503)
        self.end_headers()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.headers.get("Authorization") != f"Bearer {os.environ.get('VLLM_API_KEY')}":
            self.send_response(401)
            self.end_headers()
            return
        if body.get("prompt") == "die":
            os._exit(1)
        if body.get("prompt") == "hang-up":
            print(API_SERVER_CRASH, flush=True)
            threading.Thread(target=self.server.shutdown, daemon=True).start()
            return  # unanswered: the connection closes
        out = json.dumps({"choices": [{"index": 0, "text": f"echo {body.get('prompt')}"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


API_SERVER_CRASH = ("(ApiServer_2 pid=2468) ERROR 12-01 11:16:26 [async_llm.py:704] RuntimeError: shape '[25, 2]' "
                    "is invalid for input of size 44")
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
server.serve_forever()
# reached after a hang-up only: the port is closed while the leader lives on, then it exits
server.server_close()
time.sleep(float(os.environ.get("STANDIN_HANGUP_EXIT_S", "5")))
sys.exit(1)

"""A stand-in for `vllm serve MODEL ...` (quantgate.engines.vllm_cli), for fault injection (no model, no vLLM).

It takes vLLM's command line (only --port is read), spawns a child that sleeps (as vLLM spawns its engine
core) in its process group, and then behaves as env STANDIN_MODE says:
  healthy        /health answers 200; POST /v1/completions needs `Authorization: Bearer $VLLM_API_KEY`
                 (401 otherwise, as vLLM's AuthenticationMiddleware) and answers one choice; a prompt "die"
                 makes the server exit with code 1 without answering (a crash mid-request)
  crash          prints STANDIN_MESSAGE (default: a crash line) and exits 1 before serving
  never-healthy  /health answers 503 forever
STANDIN_PIDFILE, if set, receives "<leader pid> <child pid>" once the child runs.
"""

import http.server
import json
import os
import subprocess
import sys

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
        out = json.dumps({"choices": [{"index": 0, "text": f"echo {body.get('prompt')}"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()

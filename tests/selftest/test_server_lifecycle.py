"""Server lifecycle, by fault injection: stand-in server programs replace vLLM (the module path is the only
thing swapped), so the start/health/teardown logic is exercised without a model."""

import os
import sys
import textwrap
import time

import psutil
import pytest

from quantgate.engines import vllm_server
from quantgate.engines.vllm_server import VllmServer, kill_tree
from quantgate.errors import ServerError

HEALTHY = """
import http.server, sys, subprocess, time
port = int(sys.argv[sys.argv.index('--port') + 1])
# a child process, as vLLM's engine core is: teardown must kill it too
subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')
    def log_message(self, *a): pass
print('Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8', flush=True)
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"""
CRASHES = "import sys; print('boom: CUDA out of memory', flush=True); sys.exit(3)"
NEVER_HEALTHY = """
import http.server, sys
port = int(sys.argv[sys.argv.index('--port') + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"""


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    def install(source: str) -> None:
        (tmp_path / "fake_vllm_server.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        monkeypatch.setattr(vllm_server, "SERVER_MODULE", "fake_vllm_server")

    return install


def make(tmp_path, timeout=30.0) -> VllmServer:
    # the KV cache is sized from the checkpoint's config before start: a tiny model's
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64, "torch_dtype": "bfloat16"}')
    return VllmServer(
        tmp_path,
        log_path=tmp_path / "logs" / "server.log",
        served_name="m",
        startup_timeout=timeout,
        python=sys.executable,
    )


def test_healthy_server_serves_then_whole_tree_is_killed(tmp_path, fake_module):
    fake_module(HEALTHY)
    with make(tmp_path) as server:
        assert server.port and server.completions_url.startswith("http://127.0.0.1:")
        time.sleep(0.5)
        tree = [server.proc.pid] + [c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)]
        assert len(tree) >= 2
        assert "CPUInt8ScaledMMLinearKernel" in server.log_text()
    time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in tree)
    assert (tmp_path / "logs" / "server.log").exists(), "the log is kept after teardown"


def test_server_that_exits_fails_fast_with_code_and_log_tail(tmp_path, fake_module):
    fake_module(CRASHES)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"exited with code 3[\s\S]*CUDA out of memory"):
        make(tmp_path, timeout=120).__enter__()
    assert time.monotonic() - t0 < 30, "must not wait for the deadline when the process died"


def test_server_never_healthy_times_out_and_is_killed(tmp_path, fake_module):
    fake_module(NEVER_HEALTHY)
    server = make(tmp_path, timeout=4)
    with pytest.raises(ServerError, match="not healthy after 4s"):
        server.__enter__()
    assert server.proc.poll() is not None, "a failed start leaves no process behind"


def test_teardown_on_exception_inside_block(tmp_path, fake_module):
    fake_module(HEALTHY)
    with pytest.raises(KeyboardInterrupt):
        with make(tmp_path) as server:
            pid = server.proc.pid
            raise KeyboardInterrupt
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_kill_tree_of_missing_pid_is_a_no_op():
    kill_tree(2**22 + 12345)

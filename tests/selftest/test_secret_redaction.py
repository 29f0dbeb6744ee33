"""The server's API key never reaches logs: fault injection against a local HTTP stub that answers 500.

lm-eval 0.4.13 logs a failed request's exception repr, which with aiohttp holds the request headers
(``Authorization: Bearer <key>``). ``server_api_key`` (quantgate.evaluation.lmeval_runner) redacts the key from
every log record while lm-eval holds it (quantgate.redaction). The stub records what it received, so the test
knows the key was really sent; a control run without the redaction shows the leak the test guards against.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from quantgate.evaluation.lmeval_runner import server_api_key
from quantgate.redaction import PLACEHOLDER, redact, secret_redacted_from_logs

pytest_plugins = ["pytester"]

KEY = "qg-test-key-7f3a9c51d2e84b60"


@pytest.fixture
def failing_server() -> Iterator[tuple[str, list[str]]]:
    """A completions URL on 127.0.0.1 whose every POST answers 500, and the Authorization headers it saw."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(500)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"injected failure")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/completions", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def stderr_log() -> Iterator[None]:
    """Every log record to stderr, as a run's console shows them (request it after capfd: it writes there)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _fail_requests(url: str) -> list[str]:
    """Send one request through lm-eval's async path and one through its sync path; both fail."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=url, model="m", tokenizer_backend=None, tokenized_requests=False,
                             max_retries=1, num_concurrent=1)
    errors = []
    try:
        asyncio.run(lm.get_batched_requests([["hello"]], cache_keys=[None], generate=True,
                                            gen_kwargs={"until": ["\n"]}))
    except Exception as exc:  # noqa: BLE001 - the injected failure
        errors.append(repr(exc))
    try:
        lm.model_call(["hello"], generate=True, gen_kwargs={"until": ["\n"]})
    except Exception as exc:  # noqa: BLE001 - the injected failure
        errors.append(repr(exc))
    return errors


def test_a_failed_request_logs_no_api_key(capfd, failing_server, stderr_log, caplog):
    url, seen = failing_server
    caplog.set_level(logging.DEBUG)
    with server_api_key(KEY):
        errors = _fail_requests(url)
    assert len(errors) == 2 and seen and all(h == f"Bearer {KEY}" for h in seen)  # the key was really sent
    err = capfd.readouterr().err
    assert "ClientResponseError" in err and f"Bearer {PLACEHOLDER}" in err  # lm-eval's header dump, redacted
    assert KEY not in err
    assert KEY not in caplog.text and all(KEY not in r.getMessage() for r in caplog.records)
    assert logging.getLogRecordFactory() is logging.LogRecord  # restored


def test_without_the_redaction_the_key_leaks(capfd, failing_server, stderr_log, monkeypatch):
    # The control: the key in lm-eval's environment with nothing redacting it, as before the fix.
    url, _ = failing_server
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    _fail_requests(url)
    assert f"Bearer {KEY}" in capfd.readouterr().err


def test_redaction_covers_arguments_and_tracebacks(caplog):
    log = logging.getLogger("lm_eval.models.some_child")  # a child logger: a filter on "lm_eval" would miss it
    caplog.set_level(logging.INFO)
    with secret_redacted_from_logs(KEY):
        log.warning("headers %s", {"Authorization": f"Bearer {KEY}"})
        try:
            raise RuntimeError(f"request failed with key {KEY}")
        except RuntimeError:
            log.exception("failed")
        log.info("nothing secret %d", 3)
    log.warning("after the block %s", KEY)  # the key is no longer in use: not rewritten
    text = caplog.text
    assert text.count(KEY) == 1 and "after the block" in text and text.count(PLACEHOLDER) == 2
    assert caplog.records[2].getMessage() == "nothing secret 3"
    assert redact(f"a {KEY} b", KEY) == f"a {PLACEHOLDER} b" and redact("x", None) == "x"


def test_pytest_tracebacks_print_the_server_key_redacted(pytester: pytest.Pytester) -> None:
    """pytest's long tracebacks print every frame's arguments; run_task(..., api_key=...) printed the server's
    key in session 8's GPU logs. The server's key is a redaction.Secret: its repr is the placeholder, its value
    the key. Control: the same key as a plain str is printed."""
    pytester.makepyfile(test_leak=f"""
        from quantgate.redaction import Secret

        KEY = "{KEY[:6]}" + "{KEY[6:]}"  # split, so that the printed source lines do not hold it whole

        def run_task(api_key):
            raise RuntimeError("evaluation failed")

        def test_secret():
            run_task(Secret(KEY))

        def test_plain_control():
            run_task(KEY)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    text = result.stdout.str()
    secret_part, control_part = text.split("test_plain_control", 1)
    assert KEY not in secret_part and f"api_key = '{PLACEHOLDER}'" in secret_part
    assert f"api_key = '{KEY}'" in control_part
    from quantgate.redaction import Secret

    assert str(Secret(KEY)) == KEY and f"{Secret(KEY)}" == KEY and Secret(KEY) == KEY  # the value is untouched

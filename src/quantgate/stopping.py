"""Whether this process was asked to stop (SIGTERM from a CI timeout or `kill`), readable by library code.

The pytest plugin turns SIGTERM into `pytest.exit`, whose `Exit` is an ordinary Exception: code that catches
every Exception to name a failure (lm-eval's request loop, quantgate's own wrappers) would swallow it, record one
failed task and let the session go on with the next server. Such code asks `requested()` and re-raises instead,
and the plugin stops the session before the next test even if something did swallow it.
"""

from __future__ import annotations

_SIGNAL: int | None = None


def request(signum: int) -> None:
    """Record that signal `signum` asked this process to stop (first one wins)."""
    global _SIGNAL
    if _SIGNAL is None:
        _SIGNAL = signum


def requested() -> int | None:
    """The signal number that asked this process to stop, or None."""
    return _SIGNAL


def reset() -> None:
    """Forget a recorded stop (for tests that simulate one)."""
    global _SIGNAL
    _SIGNAL = None

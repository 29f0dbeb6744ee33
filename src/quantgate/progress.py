"""Progress of a long run, one line per step: build, server start, task evaluation (items done/total, items/s,
ETA), then each gate.

On a terminal a step is a live tqdm line, redrawn in place and left behind when the step ends. Elsewhere (CI logs,
a pipe) a redrawn line would leave one log line per redraw, so nothing is drawn while the step runs and exactly
one plain line is written when it ends: ``quantgate: <step> <what>: <done>/<total> <unit>, <rate> <unit>/s,
<seconds>s [note]``.

Under pytest the output is captured; the plugin calls ``use_stream`` with a stream that writes past the capture
(pytest's capture manager suspended), so the lines reach the terminal or the CI log while tests run.

lm-eval shows its own tqdm over the requests it sends to the server (lm_eval/models/api_models.py, "Requesting
API"). ``counting_lm_eval_requests`` replaces that module's tqdm classes, for the duration of one evaluation, with
subclasses that draw nothing and report each update to the current step: the unit is lm-eval's request (a prompt,
or with concurrency a batch of prompts), counted where lm-eval counts it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from tqdm import tqdm


@dataclass
class Step:
    """One step: ``kind`` (build, server start, evaluate, gate), ``what`` (model/variant, task), its counts."""

    kind: str
    what: str
    total: int | None = None
    unit: str = "items"
    done: int = 0
    note: str = ""
    started: float = field(default_factory=time.monotonic)
    bar: Any = None  # the live tqdm line on a terminal

    def add_total(self, n: int) -> None:
        """More work joins the step (lm-eval's next phase of requests): the total grows by `n`."""
        self.total = (self.total or 0) + n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def update(self, n: int = 1) -> None:
        """`n` more units are done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def line(self, seconds: float | None = None) -> str:
        """The step's one plain line (see the module docstring); `seconds` defaults to the time since it began."""
        seconds = time.monotonic() - self.started if seconds is None else seconds
        text = f"quantgate: {self.kind} {self.what}"
        if self.total is not None:
            rate = self.done / seconds if seconds > 0 else 0.0
            text += f": {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s"
        text += f", {seconds:.1f}s"
        return text + (f" [{self.note}]" if self.note else "")


class Progress:
    """Writes steps to `stream`: live tqdm lines when `live`, else one plain line per step at its end."""

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = _isatty(self.stream) if live is None else live
        self.current: Step | None = None

    @contextmanager
    def step(self, kind: str, what: str, total: int | None = None, unit: str = "items") -> Iterator[Step]:
        """A step for the block's duration. An exception ends it with note ``FAILED: <type>`` and propagates."""
        st = Step(kind, what, total, unit)
        if self.live and not getattr(self.stream, "closed", False):
            fmt = ("{desc}: {n_fmt}/{total_fmt} " + unit + " [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
                   if total is not None else "{desc}: {elapsed}{postfix}")
            st.bar = tqdm(total=total, desc=f"quantgate: {kind} {what}", unit=unit, file=self.stream,
                          bar_format=fmt, leave=True, mininterval=0.5, dynamic_ncols=True)
        previous, self.current = self.current, st
        try:
            yield st
        except BaseException as exc:
            st.note = f"FAILED: {type(exc).__name__}"
            raise
        finally:
            self.current = previous
            self._end(st)

    def line(self, text: str) -> None:
        """One line that is a step of its own (a gate's outcome)."""
        self._write(f"quantgate: {text}\n")

    def _write(self, text: str) -> None:
        # Progress never breaks a run: a stream closed under it (an inner pytest session's) falls back to stderr.
        try:
            self.stream.write(text)
            self.stream.flush()
        except (ValueError, OSError):
            self.stream, self.live = sys.stderr, False
            sys.stderr.write(text)

    def _end(self, st: Step) -> None:
        if st.bar is not None:
            if st.note:
                st.bar.set_postfix_str(st.note, refresh=False)
            st.bar.close()
            return
        self._write(st.line() + "\n")


class _Sink:
    """Where lm-eval's own bars draw while their counts go to a step."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class PytestTerminal:
    """A stream that writes past pytest's output capture (its capture manager suspended for each write), so
    progress lines show while a test runs. `stream` is the terminal pytest had before it captured."""

    def __init__(self, capture_manager: Any, stream: IO[str]) -> None:
        self.capman = capture_manager
        self.stream = stream

    def write(self, text: str) -> int:
        if self.capman is None:
            return self.stream.write(text)
        with self.capman.global_and_fixture_disabled():
            n = self.stream.write(text)
            self.stream.flush()
        return n

    def flush(self) -> None:
        pass  # each write is flushed while the capture is suspended

    def isatty(self) -> bool:
        return _isatty(self.stream)

    @property
    def closed(self) -> bool:
        return bool(getattr(self.stream, "closed", False))


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or minimal stream: not a terminal
        return False


_progress = Progress()


def use_stream(stream: IO[str], live: bool | None = None) -> None:
    """Send the process's progress to `stream` (live lines when `live`, default: whether it is a terminal)."""
    global _progress
    _progress = Progress(stream, live)


def step(kind: str, what: str, total: int | None = None, unit: str = "items"):  # noqa: ANN201 - a context manager
    """``Progress.step`` on the process's progress stream."""
    return _progress.step(kind, what, total, unit)


def line(text: str) -> None:
    """``Progress.line`` on the process's progress stream."""
    _progress.line(text)


@contextmanager
def counting_lm_eval_requests(st: Step) -> Iterator[None]:
    """While the block runs, lm-eval's API models report their requests to `st` instead of drawing a bar.

    Patches ``lm_eval.models.api_models.tqdm`` and ``.tqdm_asyncio`` (lm-eval 0.4.13's names); where lm-eval
    has no such names the block runs unchanged and the step counts nothing (its line still has its time)."""
    try:
        from lm_eval.models import api_models
    except ImportError:
        yield
        return
    base, base_async = getattr(api_models, "tqdm", None), getattr(api_models, "tqdm_asyncio", None)
    if base is None or base_async is None:
        yield
        return

    class Counted(base):  # type: ignore[misc, valid-type]
        # Not disabled (a disabled tqdm's iteration counts nothing): it draws into a sink instead. tqdm's own
        # iteration calls update() at intervals and sets `n` at its end, so close() reports the remainder.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(file=_Sink(), disable=False)
            self._reported = 0
            super().__init__(*args, **kwargs)
            if self.total:
                st.add_total(int(self.total))

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            self._report()
            return out

        def close(self) -> None:
            self._report()
            super().close()

        def _report(self) -> None:
            new = int(self.n) - self._reported
            if new > 0:
                self._reported += new
                st.update(new)

    class CountedAsync(Counted, base_async):  # type: ignore[misc, valid-type]
        pass

    api_models.tqdm, api_models.tqdm_asyncio = Counted, CountedAsync
    try:
        yield
    finally:
        api_models.tqdm, api_models.tqdm_asyncio = base, base_async

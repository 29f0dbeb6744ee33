"""Keeping a secret (a vLLM server's API key) out of every log record while it is in use.

lm-eval 0.4.13 logs the repr of a failed request's exception (``TemplateAPI.amodel_call``: ``Exception:{e!r}``),
and aiohttp's ``ClientResponseError`` repr holds the request's headers, ``Authorization: Bearer <key>``
included. That record reaches stderr, pytest's captured log and JUnit XML. No lm-eval option stops it, and a
filter on one logger misses records of its child loggers (logging applies a logger's filters only to records
created at that logger), so the redaction sits where every record is made: ``logging``'s record factory
(``logging.setLogRecordFactory``), for as long as the secret is in use. A record whose message or exception
text contains the secret is rewritten with the secret replaced before any handler or formatter sees it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

PLACEHOLDER = "<redacted>"


class Secret(str):
    """A str whose repr hides its value: what pytest's long tracebacks print for every frame's arguments
    (``api_key = '<redacted>'``), and what any ``{x!r}`` or container repr shows. Its value (``str(s)``, the
    header it is sent in, the environment variable it is passed through) is the secret's own."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(PLACEHOLDER)


def redact(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``PLACEHOLDER`` (unchanged for no secret)."""
    return text.replace(secret, PLACEHOLDER) if secret else text


@contextmanager
def secret_redacted_from_logs(secret: str | None) -> Iterator[None]:
    """While the block runs, no log record carries ``secret``: not in its message, nor in its traceback.

    Records made by any logger of the process are checked (the message is formatted once, at creation, only to
    look for the secret; records without it are left as they are). The previous record factory is restored on
    exit. ``None`` or an empty secret: nothing to redact, the block runs unchanged.
    """
    if not secret:
        yield
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, not ours
            return record
        if secret in message:
            record.msg, record.args = redact(message, secret), None
        if record.exc_info and record.exc_info[1] is not None:
            # Formatter.format uses exc_text when it is set: the traceback text is fixed here, redacted.
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            if secret in text:
                record.exc_text = redact(text, secret)
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)

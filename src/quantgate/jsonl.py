"""Reading JSON Lines files (one JSON value per line, https://jsonlines.org): the one reader of the result
store's samples, the offline data mirrors and the run history.

Blank lines are skipped (a trailing newline, or a file edited by hand). A line that is not JSON raises the
caller's error type naming the file and the line number, so each caller keeps its own error class (a corrupt
stored result, bad offline data, a bad history file) and nothing has to parse the message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path, error: Callable[[str], Exception] = ValueError) -> list[Any]:
    """The parsed non-blank lines of ``path``, in order.

    Raises ``error("<path>:<line> is not JSON (<cause>)")`` for a line that does not parse. OSError and
    UnicodeDecodeError (a missing or unreadable file, bytes that are not UTF-8) propagate unchanged: callers
    word those themselves.
    """
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{lineno} is not JSON ({exc})") from None
    return rows

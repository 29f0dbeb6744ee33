"""The one JSON Lines reader (quantgate.jsonl): blank lines skipped, a bad line named in the caller's error type."""

from __future__ import annotations

import pytest

from quantgate.evaluation.store import CorruptResultError
from quantgate.jsonl import read_jsonl


def test_reads_values_in_order_and_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n[2]\n"x"\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, [2], "x"]


def test_a_bad_line_raises_the_callers_error_naming_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(CorruptResultError, match=r"samples\.jsonl:3 is not JSON \(Expecting value"):
        read_jsonl(path, CorruptResultError)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "none.jsonl")

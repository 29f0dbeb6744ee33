"""A syrupy extension that stores score tables as Markdown files (`.md`, text mode).

Serialisation is the table's own stable rendering (fixed decimals, rows in matrix order, no timestamps or
paths); comparison is syrupy's, so `--snapshot-update` keeps its usual meaning.
"""

from __future__ import annotations

from typing import Any

from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

from quantgate.report.table import ScoreTable


class MarkdownTableExtension(SingleFileSnapshotExtension):
    file_extension = "md"
    _write_mode = WriteMode.TEXT

    def serialize(self, data: Any, **kwargs: Any) -> str:
        if isinstance(data, ScoreTable):
            return data.render(stable=True)
        if isinstance(data, str):
            return data
        raise TypeError(f"MarkdownTableExtension serializes ScoreTable or str, not {type(data).__name__}")

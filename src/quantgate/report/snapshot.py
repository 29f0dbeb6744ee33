"""A syrupy extension that stores score tables as Markdown files (`.md`, text mode).

Serialisation is the table's own stable rendering (fixed decimals, rows in matrix order, no timestamps or
paths); comparison is syrupy's, so `--snapshot-update` keeps its usual meaning.
"""

from __future__ import annotations

from pathlib import Path
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


def per_hardware(hw_key: str) -> type[MarkdownTableExtension]:
    """The extension storing snapshots in a folder of their own per hardware class or CPU tier.

    Other hardware gives other, equally valid numbers, so each keeps its own snapshot. The folder matters:
    `--snapshot-update` deletes every snapshot in the scanned folder that the session did not use, and a CPU
    session must not delete the H100's.
    """

    class PerHardwareTable(MarkdownTableExtension):
        @classmethod
        def dirname(cls, *, test_location: Any) -> str:
            return str(Path(super().dirname(test_location=test_location)) / hw_key)

    return PerHardwareTable

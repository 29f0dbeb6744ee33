"""Project-level pytest configuration. The quantgate plugin itself is registered by its entry point
(pyproject.toml, `pytest11`), so another repository that installs quantgate gets the same fixtures."""

import pytest

from quantgate.report.snapshot import MarkdownTableExtension


@pytest.fixture
def table_snapshot(snapshot):
    """syrupy's snapshot, storing score tables as Markdown files under tests/__snapshots__/."""
    return snapshot.use_extension(MarkdownTableExtension)

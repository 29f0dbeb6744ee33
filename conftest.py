"""Project-level pytest configuration. The quantgate plugin itself is registered by its entry point
(pyproject.toml, `pytest11`), so another repository that installs quantgate gets the same fixtures."""

import pytest

from quantgate.report.snapshot import per_hardware


@pytest.fixture
def table_snapshot(snapshot, qg_run):
    """syrupy's snapshot, storing score tables as JSON under tests/__snapshots__/, one folder per hardware
    class or CPU tier (`sm90`, `cpu-avx2`), compared within noise (quantgate.report.snapshot)."""
    return snapshot.use_extension(per_hardware(qg_run.hw.keys[0]))

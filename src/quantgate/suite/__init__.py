"""The regression suite, installed with quantgate so that `pip install -U quantgate` upgrades it.

Run it from a project that has a matrix and thresholds (`quantgate init` scaffolds one) with `quantgate run`,
or with pytest directly: `pytest --pyargs quantgate.suite` (the project's pytest.ini or pyproject.toml gives
the matrix, thresholds and snapshot folder). Its fixtures and options come from the quantgate pytest plugin
(quantgate.plugin, registered by the `pytest11` entry point). Score-table snapshots are stored in the
project's own folder (ini `quantgate_snapshots`, default tests/__snapshots__), never in the installed package.
"""

"""The score table (size, a column per task, AVG, retention, verdict), snapshotted with syrupy. The snapshot
holds structure (variants, formats, engines, kernels, sizes, n per task, verdict per gate) and scores as
intervals: a rerun whose scores move within noise matches it, a kernel, verdict or structure change or a score
moving beyond noise does not (quantgate.report.snapshot)."""

from pathlib import Path

import pytest

from quantgate import verdicts
from quantgate.cadence import snapshot_name
from quantgate.matrix_checks import check_distribution_limits, distribution_limits_path
from quantgate.report.snapshot import accept_hint, record_candidate


def test_score_table(request, qg_session, qg_run, qg_model, table_snapshot):
    # the distribution gates (KL, top-1 agreement) join the table where thresholds/distribution.yaml sets them
    limits, _ = check_distribution_limits(
        qg_run.matrix, qg_session.matrix_path, distribution_limits_path(qg_session.thresholds_path)
    )
    table = verdicts.score_table(qg_run, qg_model, distribution_limits=limits)
    print()
    print(table.render())
    # One snapshot per matrix, in the project's folder for this hardware class or CPU tier (table_snapshot,
    # quantgate.plugin): other kernels give other (equally valid) numbers. A run that evaluates nightly variants
    # has rows a commit run lacks: its own snapshot (<matrix>-nightly), so neither overwrites the other.
    snap = table_snapshot(name=snapshot_name(qg_session.matrix_path.stem, qg_session.matrix, qg_session.cadence))
    where = Path(snap.extension.get_location(test_location=snap.test_location, index=snap.index))
    if not where.exists() and not request.config.getoption("--snapshot-update"):
        candidate = record_candidate(where, table)
        message = (
            f"no committed score-table snapshot for {qg_run.hw.keys[0]} yet: recorded a candidate at {candidate}; "
            + accept_hint(where, candidate)
        )
        if qg_session.policy.require_snapshot.at(qg_session.cadence):
            pytest.fail(f"{message} (the policy requires a committed snapshot at cadence {qg_session.cadence})",
                        pytrace=False)
        pytest.skip(message)
    assert table == snap

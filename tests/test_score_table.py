"""The score table (size, a column per task, AVG, retention), snapshotted with syrupy. Identical inputs give
an identical table: results are reused from the store, and the stable rendering leaves out timestamps,
paths and machine names."""

from quantgate import verdicts


def test_score_table(qg_session, qg_run, qg_model, table_snapshot):
    table = verdicts.score_table(qg_run, qg_model)
    print()
    print(table.render())
    # One snapshot per matrix, in the folder of this hardware class or CPU tier (conftest.py): other kernels give
    # other (equally valid) numbers.
    assert table.render(stable=True) == table_snapshot(name=qg_session.matrix_path.stem)

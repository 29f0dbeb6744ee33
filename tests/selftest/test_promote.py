"""`quantgate accept --from-store`: stored results become accepted baselines with nothing evaluated, built or
served; the regression gate then reads them back and passes on the same results; an empty store is an error
naming what is not stored."""

from __future__ import annotations

import pytest

from quantgate import verdicts
from quantgate.cli import main as cli_main
from quantgate.errors import QuantgateError
from quantgate.gates.outcome import Outcome
from quantgate.promote import accept_stored
from tests.selftest.synthetic_store import THRESHOLDS, make_run, write_store  # noqa: F401 - fixture


def test_accept_from_store_then_the_regression_gate_reads_it_back(tmp_path, make_run, monkeypatch, capsys):  # noqa: F811
    results = write_store(make_run(tmp_path / "results", reuse_only=False))
    monkeypatch.setenv("QUANTGATE_PROJECT", str(tmp_path / "project"))
    argv = ["accept", "--from-store", "--matrix", str(tmp_path / "matrix.yaml"), "--thresholds", str(THRESHOLDS),
            "--results", str(results)]
    assert cli_main(argv) == 0
    assert "accepted 3 baseline(s)" in capsys.readouterr().out
    run = make_run(results)
    for variant in ("bf16", "fp8", "int8"):
        assert verdicts.accepted_path(run, "m", variant, "hellaswag").exists()
        verdict = verdicts.regression_verdict(run, "m", variant, "hellaswag")
        assert verdict is not None and verdict.outcome is not Outcome.FAIL
    assert run.events.servers_started == [] and run.events.evaluated == []


def test_accept_from_store_names_what_is_not_stored(tmp_path, make_run, monkeypatch):  # noqa: F811
    monkeypatch.setenv("QUANTGATE_PROJECT", str(tmp_path / "project"))
    with pytest.raises(QuantgateError, match=r"(?s)no stored result to accept .*m/bf16/hellaswag"):
        accept_stored(make_run(tmp_path / "empty"))
    with pytest.raises(QuantgateError, match="reuse_only"):
        accept_stored(make_run(tmp_path / "empty", reuse_only=False))
    assert not (tmp_path / "project").exists()


def test_a_smaller_result_never_silently_replaces_an_accepted_baseline(tmp_path, make_run, monkeypatch, capsys):  # noqa: F811
    """Found by a new user: `accept --from-store --qg-limit 8` replaced the committed 400-item baseline."""
    import json

    results = write_store(make_run(tmp_path / "results", reuse_only=False))
    monkeypatch.setenv("QUANTGATE_PROJECT", str(tmp_path / "project"))
    run = make_run(results)
    path = verdicts.accepted_path(run, "m", "bf16", "hellaswag")
    accept_stored(run)
    stored = json.loads(path.read_text())
    bigger = {**stored, "items": {**stored["items"], **{f"extra{i}": 1 for i in range(50)}}}
    path.write_text(json.dumps(bigger))  # as if a larger run had been accepted before
    with pytest.raises(QuantgateError, match=r"n=\d+ items; this result has n=\d+ .*--force"):
        verdicts.accept(run, "m", "bf16", "hellaswag")
    assert json.loads(path.read_text()) == bigger  # untouched
    promotion = accept_stored(run)
    assert path not in promotion.accepted and any("--force" in m for m in promotion.missing)
    assert json.loads(path.read_text()) == bigger
    assert path in accept_stored(run, force=True).accepted
    assert json.loads(path.read_text())["items"] == stored["items"]

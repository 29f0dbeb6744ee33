"""A stop request (SIGTERM turned into pytest.exit, an ordinary Exception) is not reported as a task's failure."""

import pytest

from quantgate import stopping
from quantgate.errors import EvaluationError
from quantgate.evaluation import lmeval_runner, task_registry
from quantgate.matrix import Generation, Task


class _Stop(Exception):
    """Stands in for pytest's Exit, which the plugin raises on SIGTERM."""


@pytest.fixture
def raising_task_spec(monkeypatch):
    def spec(name, data_dir):
        raise _Stop("quantgate: received SIGTERM")

    monkeypatch.setattr(lmeval_runner, "lm_eval_task_spec", spec)
    monkeypatch.setattr(task_registry, "task_manager", lambda names: None)
    yield
    stopping.reset()


def _run():
    return lmeval_runner.run_task(completions_url="http://127.0.0.1:9/v1/completions", served_name="m",
                                  tokenizer_dir=".", task=Task(name="gsm8k", metric="exact_match,strict-match"),
                                  generation=Generation(), data_dir=None)


def test_without_a_stop_an_error_is_this_tasks_failure(raising_task_spec):
    with pytest.raises(EvaluationError, match=r"lm-eval failed on task gsm8k \(gsm8k\): _Stop"):
        _run()


def test_after_a_stop_request_the_exception_goes_up_unchanged(raising_task_spec):
    stopping.request(15)
    stopping.request(2)
    assert stopping.requested() == 15, "the first signal is the one reported"
    with pytest.raises(_Stop):
        _run()

"""Progress lines (quantgate.progress): off a terminal exactly one plain line per step, with done/total, items/s
and the time; on a terminal a live tqdm line; lm-eval's own request bars counted into the current step."""

from __future__ import annotations

import asyncio
import io
import re

import pytest

from quantgate.progress import Progress, Step, counting_lm_eval_requests

LINE = re.compile(r"^quantgate: evaluate m/int8 hellaswag: 40/40 items, (\d+\.\d\d) items/s, (\d+\.\d)s$")


def test_not_a_terminal_gives_one_line_per_step_with_total_and_rate():
    out = io.StringIO()
    progress = Progress(out)
    assert progress.live is False  # a StringIO is not a terminal
    with progress.step("build", "m/int8") as st:
        st.note = "built"
    with progress.step("server start", "m/int8"):
        pass
    with progress.step("evaluate", "m/int8 hellaswag", total=40) as st:
        for _ in range(40):
            st.update()
    progress.line("gate retention[AVG] m/int8: PASS")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert re.match(r"^quantgate: build m/int8, \d+\.\ds \[built\]$", lines[0])
    assert re.match(r"^quantgate: server start m/int8, \d+\.\ds$", lines[1])
    assert LINE.match(lines[2]), lines[2]
    assert lines[3] == "quantgate: gate retention[AVG] m/int8: PASS"


def test_the_line_reports_the_rate_over_the_elapsed_time():
    st = Step("evaluate", "m/fp8 gsm8k", total=400, unit="requests", done=100)
    assert st.line(seconds=50.0) == "quantgate: evaluate m/fp8 gsm8k: 100/400 requests, 2.00 requests/s, 50.0s"


def test_a_failed_step_still_writes_its_line_and_names_the_failure():
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress(out).step("server start", "m/int8"):
        raise RuntimeError("boom")
    assert out.getvalue().count("\n") == 1 and out.getvalue().rstrip().endswith("[FAILED: RuntimeError]")


def test_on_a_terminal_the_step_is_a_live_tqdm_line():
    out = io.StringIO()
    with Progress(out, live=True).step("evaluate", "m/int8 hellaswag", total=4) as st:
        st.update(2)
        st.update(2)
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "quantgate: evaluate m/int8 hellaswag: 4/4 items" in text.split("\r")[-1]  # the line left behind


def test_lm_eval_request_bars_count_into_the_step_and_draw_nothing(capsys):
    """lm-eval's real module names are patched for the block only: its synchronous bar (update per request)
    and its asyncio gather (one tick per batch) both count, over two phases of one task."""
    from lm_eval.models import api_models

    original = api_models.tqdm, api_models.tqdm_asyncio
    out = io.StringIO()
    with Progress(out).step("evaluate", "m/int8 hellaswag", unit="requests") as st:
        with counting_lm_eval_requests(st):
            bar = api_models.tqdm(desc="Requesting API", total=5)
            for _ in range(5):
                bar.update(1)
            bar.close()

            async def one(i: int) -> int:
                await asyncio.sleep(0)
                return i

            async def gather() -> list[int]:
                return await api_models.tqdm_asyncio.gather(*[one(i) for i in range(7)], desc="Requesting API")

            assert asyncio.run(gather()) == list(range(7))
        assert (st.done, st.total) == (12, 12)
    assert (api_models.tqdm, api_models.tqdm_asyncio) == original
    assert "Requesting API" not in capsys.readouterr().err  # lm-eval's own bar drew into the sink
    assert ": 12/12 requests," in out.getvalue()

"""The pytest plugin: options, markers, parametrization and fixtures. Thin by design: all logic is in
quantgate.runner, quantgate.gates and quantgate.report, which work without pytest.

Fixtures a suite uses:
  qg_run        the session's Run (results store, servers, events)
  qg_variant    each quantized variant of each model (param), markers from its format
  qg_any_variant  every variant including the BF16 baselines
  qg_task       each gated task (param); qg_regression_task each task with `regression: true`
  qg_model      each model (param)
Markers: bf16 fp8 int8 int4 nvfp4 mxfp4 mxfp8 (from the format), gpu, perf, slow, nightly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantgate.errors import QuantgateError
from quantgate.matrix import (
    FORMATS,
    Matrix,
    Thresholds,
    load_matrix,
    load_thresholds,
    with_task_limits,
)
from quantgate.paths import results_dir
from quantgate.runner import Run

FORMAT_MARKERS = {f: f"{f} variants (and the BF16 baselines they are compared against)" for f in FORMATS}
OTHER_MARKERS = {
    "gpu": "needs a GPU for real kernels (emulated or skipped elsewhere)",
    "perf": "serving performance budgets (latency, throughput, memory, size)",
    "slow": "long-running",
    "nightly": "nightly cadence",
    "weekly": "weekly cadence",
}
STASH = pytest.StashKey["QuantgateSession"]()


@dataclass
class QuantgateSession:
    matrix: Matrix
    thresholds: Thresholds
    matrix_path: Path
    thresholds_path: Path
    results: Path
    accept: bool
    run: Run | None = None

    def get_run(self) -> Run:
        if self.run is None:
            self.run = Run(self.matrix, self.thresholds, self.results)
        return self.run


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantgate")
    group.addoption("--qg-matrix", default=None, help="matrix YAML (default: ini quantgate_matrix)")
    group.addoption(
        "--qg-thresholds", default=None, help="thresholds YAML (default: ini quantgate_thresholds)"
    )
    group.addoption(
        "--qg-results", default=None, help="results directory (default: $QUANTGATE_RESULTS or results/)"
    )
    group.addoption(
        "--qg-accept",
        action="store_true",
        help="record this run's per-item outcomes as the accepted baseline for regression tests",
    )
    group.addoption(
        "--qg-limit",
        default=None,
        metavar="N|TASK=N,...",
        help="evaluate only the first N items of every task (or of the named tasks): a quick run on "
        "slow hardware; the limit is part of each result's key",
    )
    parser.addini("quantgate_matrix", "matrix YAML", default="fixtures/demo.yaml")
    parser.addini("quantgate_thresholds", "thresholds YAML", default="thresholds/retention.yaml")


def _resolve(config: pytest.Config, option: str, ini: str) -> Path:
    value = config.getoption(option) or config.getini(ini)
    path = Path(value)
    return path if path.is_absolute() else Path(config.rootpath) / path


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in {**FORMAT_MARKERS, **OTHER_MARKERS}.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    matrix_path = _resolve(config, "--qg-matrix", "quantgate_matrix")
    thresholds_path = _resolve(config, "--qg-thresholds", "quantgate_thresholds")
    if not matrix_path.exists() and not config.getoption("--qg-matrix"):
        return  # a project that installs the plugin but has no matrix: stay out of the way
    try:
        matrix = load_matrix(matrix_path)
        if config.getoption("--qg-limit"):
            matrix = with_task_limits(matrix, config.getoption("--qg-limit"))
        thresholds = load_thresholds(thresholds_path)
    except QuantgateError as exc:
        raise pytest.UsageError(str(exc)) from None
    results = (
        Path(config.getoption("--qg-results")).resolve()
        if config.getoption("--qg-results")
        else results_dir()
    )
    _pin_gpu_for_xdist_worker()
    config.stash[STASH] = QuantgateSession(
        matrix, thresholds, matrix_path, thresholds_path, results, config.getoption("--qg-accept")
    )


def _pin_gpu_for_xdist_worker() -> None:
    """Give each xdist worker its own GPU, so two servers never share a card by accident."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or "CUDA_VISIBLE_DEVICES" in os.environ:
        return
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no GPU: nothing to pin
        return
    if count:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker.removeprefix("gw")) % count)


def _session(config: pytest.Config) -> QuantgateSession | None:
    return config.stash.get(STASH, None)


def _variant_marks(model, variant) -> list:
    marks = [getattr(pytest.mark, variant.format), pytest.mark.xdist_group(f"{model.name}/{variant.name}")]
    if variant.builder == "modelopt":
        marks.append(pytest.mark.gpu)
    if variant.cadence != "commit":
        marks += [getattr(pytest.mark, variant.cadence), pytest.mark.slow]
    return marks


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    qs = _session(metafunc.config)
    if qs is None:
        return
    m = qs.matrix
    if "qg_variant" in metafunc.fixturenames or "qg_any_variant" in metafunc.fixturenames:
        name = "qg_variant" if "qg_variant" in metafunc.fixturenames else "qg_any_variant"
        params = [
            pytest.param((model.name, v.name), id=f"{model.name}/{v.name}", marks=_variant_marks(model, v))
            for model in m.models
            for v in model.variants
            if name == "qg_any_variant" or v.format != "bf16"
        ]
        metafunc.parametrize(name, params)
    if "qg_task" in metafunc.fixturenames:
        metafunc.parametrize("qg_task", [t.key for t in m.tasks if t.gate])
    if "qg_regression_task" in metafunc.fixturenames:
        metafunc.parametrize("qg_regression_task", [t.key for t in m.tasks if t.regression])
    if "qg_model" in metafunc.fixturenames:
        metafunc.parametrize("qg_model", [model.name for model in m.models])


def _variant_of(item: pytest.Item) -> tuple[str, str] | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return callspec.params.get("qg_variant") or callspec.params.get("qg_any_variant")


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Run each variant's tests together, baselines first, so each server starts at most once."""
    qs = _session(config)
    if qs is None:
        return
    order = {
        (mo.name, v.name): (i, v.format != "bf16", j)
        for i, mo in enumerate(qs.matrix.models)
        for j, v in enumerate(mo.variants)
    }
    last = (len(order) + 1, True, 0)
    items.sort(key=lambda it: order.get(_variant_of(it), last) if _variant_of(it) else last)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    qs = _session(item.config)
    if qs is None or qs.run is None:
        return
    if nextitem is None or _variant_of(nextitem) != _variant_of(item):
        qs.run.stop_servers()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    qs = _session(session.config)
    if qs is None or qs.run is None:
        return
    qs.run.close()
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["quantgate_events"] = qs.run.events.summary()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    qs = _session(config)
    if qs is None or qs.run is None:
        return
    ev = qs.run.events
    terminalreporter.write_sep("-", "quantgate")
    terminalreporter.write_line(ev.summary())
    s = ev.seconds
    terminalreporter.write_line(
        f"time: build {s['build']:.1f}s, server start {s['server_start']:.1f}s, evaluation {s['evaluate']:.1f}s"
        + (f", serving benchmarks {s['benchmark']:.1f}s" if s.get("benchmark") else "") + "; "
        f"results in {qs.results}"
    )


@pytest.fixture(scope="session")
def qg_session(request: pytest.FixtureRequest) -> QuantgateSession:
    qs = _session(request.config)
    if qs is None:
        pytest.skip("no quantgate matrix configured (--qg-matrix / ini quantgate_matrix)")
    return qs


@pytest.fixture(scope="session")
def qg_run(qg_session: QuantgateSession) -> Run:
    return qg_session.get_run()

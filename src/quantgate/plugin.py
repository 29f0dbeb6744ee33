"""The pytest plugin: options, markers, parametrization and fixtures. Thin by design: all logic is in
quantgate.runner, quantgate.gates and quantgate.report, which work without pytest.

Fixtures a suite uses:
  qg_run        the session's Run (results store, servers, events)
  qg_variant    each quantized variant of each model (param), markers from its format
  qg_any_variant  every variant including the BF16 baselines
  qg_task       each metric of each gated task (param: Task.gate_keys, `task` for the first metric, `task:label`
                for the others); qg_regression_task each task with `regression: true`
  qg_model      each model (param)
  qg_judge      judge(gate_name, subject, judgement): the policy's tier and disposition applied to the test
  table_snapshot  syrupy's snapshot for score tables, stored in the project's snapshot folder
The regression suite itself is the package quantgate.suite (`pytest --pyargs quantgate.suite`).
Markers: bf16 fp8 int8 int4 nvfp4 mxfp4 mxfp8 (from the format), gpu, perf, slow, nightly, weekly.
A variant whose `cadence` is later than --qg-cadence (commit < nightly < weekly) is not run: its tests are
deselected and the run's Run never sees it (quantgate.cadence); one summary line names it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from quantgate import progress
from quantgate.cadence import at_cadence, deferred_line, deferred_variants
from quantgate.devices import DeviceError, pin_xdist_worker
from quantgate.errors import QuantgateError
from quantgate.gates.outcome import Gate, Judgement, Outcome
from quantgate.matrix import (
    FORMATS,
    Matrix,
    Thresholds,
    load_matrix,
    load_thresholds,
    with_task_limits,
)
from quantgate.paths import results_dir
from quantgate.policy import CADENCES, DEFAULT_POLICY, Policy, load_policy
from quantgate.run_verdict import RunVerdict, summarize
from quantgate.runner import Run
from quantgate.scheduling import make_variant_scheduler

GATE_PROPERTY = "quantgate.gate"


class QuantgateNote(UserWarning):
    """A gate that passed with a note (an INCONCLUSIVE outcome the policy lets pass)."""

FORMAT_MARKERS = {f: f"{f} variants (and the BF16 baselines they are compared against)" for f in FORMATS}
OTHER_MARKERS = {
    "gpu": "needs a GPU for real kernels (emulated or skipped elsewhere)",
    "perf": "serving performance budgets (latency, throughput, memory, size)",
    "slow": "long-running",
    "nightly": "nightly cadence",
    "weekly": "weekly cadence",
}
STASH = pytest.StashKey["QuantgateSession"]()
# Set by a caller that prints the VERDICT line itself after the session (`quantgate run`, with its wall time and
# the skips above it): the terminal summary then lists the gates and the policy without it, so it shows once.
CALLER_PRINTS_VERDICT = pytest.StashKey[bool]()


@dataclass
class QuantgateSession:
    matrix: Matrix
    thresholds: Thresholds
    matrix_path: Path
    thresholds_path: Path
    results: Path
    accept: bool
    policy: Policy = DEFAULT_POLICY
    policy_path: Path | None = None
    cadence: str = "commit"
    run: Run | None = None
    gates: list[Gate] = field(default_factory=list)
    deselected: list[str] = field(default_factory=list)  # model/variant labels whose tests the cadence deselected
    other_failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ran: int | None = 0  # tests whose body ran (a "call" phase reported, not skipped); None: --collect-only

    @property
    def evaluated_matrix(self) -> Matrix:
        """The matrix this run evaluates: without the variants later than its cadence (quantgate.cadence).
        `matrix` keeps them, so that their tests are collected, and then deselected, by name."""
        return at_cadence(self.matrix, self.cadence)

    def get_run(self) -> Run:
        if self.run is None:
            self.run = Run(self.evaluated_matrix, self.thresholds, self.results)
        return self.run

    def verdict(self) -> RunVerdict:
        return summarize(
            self.gates, self.policy, self.cadence, other_failures=self.other_failures, errors=self.errors,
            ran=self.ran,
        )


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
    group.addoption(
        "--qg-cadence",
        default="commit",
        choices=CADENCES,
        help="which cadence's policy applies (what INCONCLUSIVE does per tier): commit (default), nightly, weekly",
    )
    group.addoption("--qg-policy", default=None, help="policy YAML (default: ini quantgate_policy)")
    group.addoption("--qg-snapshots", default=None,
                    help="score-table snapshot folder (default: ini quantgate_snapshots, tests/__snapshots__)")
    parser.addini("quantgate_matrix", "matrix YAML", default="fixtures/demo.yaml")
    parser.addini("quantgate_policy", "gating policy YAML", default="thresholds/policy.yaml")
    parser.addini("quantgate_thresholds", "thresholds YAML", default="thresholds/retention.yaml")
    parser.addini("quantgate_snapshots", "score-table snapshot folder, in the project (table_snapshot)",
                  default="tests/__snapshots__")


@pytest.hookimpl(wrapper=True)
def pytest_cmdline_main(config: pytest.Config):  # noqa: ANN201 - a hook wrapper's result is pytest's
    """`-n N` without a `--dist` of the user's: schedule by xdist_group (`--dist loadgroup`), so each variant's
    tests, marked with one group per variant, run on one worker and its server starts once.

    A wrapper runs before every plain implementation, xdist's included, which turns dist "no" into "load"."""
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "no" \
            and not getattr(config.option, "distload", False):
        config.option.dist = "loadgroup"
    return (yield)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # noqa: ANN001 - xdist's WorkerController
    """Hand the controller's --dist to each worker: a worker re-reads the command line, which lacks the
    loadgroup chosen above, and xdist's workers add the group to each test id only under loadgroup."""
    node.workerinput["quantgate_dist"] = node.config.option.dist


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201 - xdist's types
    """Under loadgroup, schedule by variant from the test ids (scheduling.py: xdist's own groups are lost
    with pytest 9.2)."""
    qs = _session(config)
    if qs is None or config.getvalue("dist") != "loadgroup":
        return None
    labels = [f"{m.name}/{v.name}" for m in qs.matrix.models for v in m.variants]
    return make_variant_scheduler(config, log, labels)


def _ini_pytest_skipped(config: pytest.Config) -> Path | None:
    """The pytest configuration file in the invocation folder that pytest did not use because `--qg-matrix PATH`
    (a bare path, read before plugins are known) moved its rootdir elsewhere; None when that did not happen."""
    if not config.getoption("--qg-matrix") or config.inipath is not None or config.option.rootdir:
        return None
    if getattr(config, "args_source", None) == pytest.Config.ArgsSource.ARGS:
        return None  # test paths given: they, not the ini file's testpaths, say what is collected
    here = Path(config.invocation_params.dir)
    if Path(config.rootpath) == here:
        return None
    for name, section in (("pytest.ini", ""), ("pyproject.toml", "[tool.pytest.ini_options]"),
                          ("tox.ini", "[pytest]"), ("setup.cfg", "[tool:pytest]")):
        candidate = here / name
        if candidate.is_file() and section in candidate.read_text(errors="replace"):
            return candidate
    return None


def _resolve(config: pytest.Config, option: str, ini: str) -> Path:
    """An option's or ini setting's path; a relative one from the ini file's folder, else from where pytest was
    started. Not from pytest's rootdir: with no ini file beside the arguments, pytest takes the common folder of
    any existing paths on its command line as rootdir, option values included (`--qg-matrix /elsewhere/m.yaml`
    made it /elsewhere, and thresholds/ was looked for there)."""
    value = config.getoption(option) or config.getini(ini)
    path = Path(value)
    if path.is_absolute():
        return path
    base = config.inipath.parent if config.inipath is not None else config.invocation_params.dir
    return Path(base) / path


def _stop_session_on_sigterm(signum: int, frame: object) -> None:
    # The library's handler (vllm_server.install_sigterm_handler) raises SystemExit, which pytest records as one
    # failed test and then goes on with the next: a CI timeout's SIGTERM would not stop the run. pytest.exit
    # ends the session (teardowns and the servers' atexit stop still run).
    from quantgate import stopping

    stopping.request(signum)
    print("quantgate: received SIGTERM; stopping the session and every server", file=sys.stderr, flush=True)
    pytest.exit("quantgate: received SIGTERM", returncode=128 + signum)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # pytest.exit raises an ordinary Exception: a catch-all on its way up (lm-eval's request loop, a builder's
    # wrapper) can turn it into one failed test, after which the next test would start the next server
    from quantgate import stopping

    if (signum := stopping.requested()) is not None:
        pytest.exit(f"quantgate: received signal {signum} during an earlier test", returncode=128 + signum)


def pytest_configure(config: pytest.Config) -> None:
    import signal

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, _stop_session_on_sigterm)
        except ValueError:  # not the main thread (pytest run from a thread): keep the default
            pass
    if getattr(config, "workerinput", {}).get("quantgate_dist") == "loadgroup":
        config.option.loadgroup = True  # read by xdist's worker when it collects (xdist/remote.py)
    for name, doc in {**FORMAT_MARKERS, **OTHER_MARKERS}.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    skipped_ini = _ini_pytest_skipped(config)
    if skipped_ini is not None:
        raise pytest.UsageError(
            f"pytest took {config.rootpath} as its rootdir, from the path given to --qg-matrix, and so ignored "
            f"{skipped_ini} here (its testpaths and settings: the run would collect other tests too). Give the "
            "matrix as --qg-matrix=PATH (with '='), or add --rootdir=.")
    matrix_path = _resolve(config, "--qg-matrix", "quantgate_matrix")
    thresholds_path = _resolve(config, "--qg-thresholds", "quantgate_thresholds")
    if not matrix_path.exists() and not config.getoption("--qg-matrix"):
        return  # a project that installs the plugin but has no matrix: stay out of the way
    try:
        matrix = load_matrix(matrix_path)
        if config.getoption("--qg-limit"):
            matrix = with_task_limits(matrix, config.getoption("--qg-limit"))
        thresholds = load_thresholds(thresholds_path)
        policy_path: Path | None = _resolve(config, "--qg-policy", "quantgate_policy")
        if policy_path is not None and not policy_path.exists() and not config.getoption("--qg-policy"):
            policy_path = None  # no policy file in this project: the built-in default
        policy = load_policy(policy_path) if policy_path is not None else DEFAULT_POLICY
        at_cadence(matrix, config.getoption("--qg-cadence"))  # a baseline later than its variants: usage error
        from quantgate.engines.vllm_server import user_engine_args_error

        env_args_error = user_engine_args_error()  # else each server start fails on it, as a test failure
        if env_args_error is not None:
            raise QuantgateError(env_args_error)
    except QuantgateError as exc:
        raise pytest.UsageError(str(exc)) from None
    results = (
        Path(config.getoption("--qg-results")).resolve()
        if config.getoption("--qg-results")
        else results_dir(create=False)  # made by the first result written: collecting alone leaves no folder
    )
    try:
        # each xdist worker its own device(s), before anything in it can touch CUDA (docs/multi-gpu.md)
        pin_xdist_worker(per_worker=max(m.gpus for m in matrix.models))
    except DeviceError as exc:
        raise pytest.UsageError(str(exc)) from None
    # progress lines (quantgate.progress) reach the terminal or CI log while tests run, past pytest's capture
    progress.use_stream(progress.PytestTerminal(config.pluginmanager.getplugin("capturemanager"), sys.stderr))
    config.stash[STASH] = QuantgateSession(
        matrix,
        thresholds,
        matrix_path,
        thresholds_path,
        results,
        config.getoption("--qg-accept"),
        policy=policy,
        policy_path=policy_path,
        cadence=config.getoption("--qg-cadence"),
        ran=None if config.getoption("collectonly") else 0,  # collecting only: nothing was meant to run
    )
    config.pluginmanager.register(_GateCollector(config.stash[STASH]), "quantgate-gates")


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
        # one retention gate per metric: the first metric's id is the task key (stable), others `task:label`
        metafunc.parametrize("qg_task", [key for t in m.tasks if t.gate for key in t.gate_keys])
    if "qg_regression_task" in metafunc.fixturenames:
        metafunc.parametrize("qg_regression_task", [t.key for t in m.tasks if t.regression])
    if "qg_model" in metafunc.fixturenames:
        metafunc.parametrize("qg_model", [model.name for model in m.models])


def _variant_of(item: pytest.Item) -> tuple[str, str] | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return callspec.params.get("qg_variant") or callspec.params.get("qg_any_variant")


def _deferred_item(item: pytest.Item, variants: set[tuple[str, str]], models: set[str]) -> bool:
    """Whether `item` is a test of a variant (or of a model, every variant of which is) in the deferred sets."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return _variant_of(item) in variants or callspec.params.get("qg_model") in models


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Deselect the tests of variants later than the run's cadence (quantgate.cadence); run each variant's tests
    together, baselines first, so each server starts at most once."""
    qs = _session(config)
    if qs is None:
        if any(getattr(getattr(it, "module", None), "__name__", "").startswith("quantgate.suite") for it in items):
            # the regression suite with no matrix would skip every test and pass, having gated nothing
            matrix = _resolve(config, "--qg-matrix", "quantgate_matrix")
            raise pytest.UsageError(
                f"the quantgate regression suite needs a matrix, and there is none at {matrix}: give "
                "--qg-matrix FILE, set quantgate_matrix in pytest.ini, or run `quantgate init` in this folder")
        return
    deferred = deferred_variants(qs.matrix, qs.cadence)
    if deferred:
        variants = {(d.model, d.variant) for d in deferred}
        kept_models = {m.name for m in qs.evaluated_matrix.models}
        models = {m.name for m in qs.matrix.models} - kept_models
        gone = [it for it in items if _deferred_item(it, variants, models)]
        if gone:
            config.hook.pytest_deselected(items=gone)
            items[:] = [it for it in items if not _deferred_item(it, variants, models)]
            pairs = {_variant_of(it) for it in gone} | {
                (d.model, d.variant) for it in gone for d in deferred if it.callspec.params.get("qg_model") == d.model}
            qs.deselected = [d.label for d in deferred if (d.model, d.variant) in pairs]
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
        _score_reference_before_stopping(qs, item)
        qs.run.stop_servers()


def _score_reference_before_stopping(qs: QuantgateSession, item: pytest.Item) -> None:
    """While a BF16 baseline's server is still up, score the distribution reference that a later distribution
    test of its model pairs with; without it, the first such test restarts the baseline's server and then its
    own variant's (two server starts, ~45 s each on 2 CPU cores). An error here is left to that test."""
    from quantgate.evaluation.distribution import distribution_result

    pair = _variant_of(item)
    if pair is None or qs.run is None or qs.run.matrix.distribution is None:
        return
    model, variant = pair
    vr = qs.run.variant(model, variant)
    if vr.variant.format != "bf16" or vr.server is None:
        return
    later = item.session.items[item.session.items.index(item) + 1:] if item in item.session.items else []
    if not any(_distribution_test_of(it, model) for it in later):
        return
    try:
        distribution_result(qs.run, model, variant)
    except QuantgateError:
        pass


def _distribution_test_of(item: pytest.Item, model: str) -> bool:
    pair = _variant_of(item)
    return getattr(item, "originalname", "") == "test_distribution_vs_bf16" and pair is not None and pair[0] == model


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    qs = _session(session.config)
    if qs is None or qs.run is None:
        return
    qs.run.close()
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["quantgate_events"] = qs.run.events.summary()


class _GateCollector:
    """Collects each judged gate (from the test's user properties, so xdist workers' gates arrive too) and
    each failure that is not a gate's, for the run's verdict."""

    def __init__(self, qs: QuantgateSession) -> None:
        self.qs = qs

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        gates = [Gate.from_json(v) for k, v in report.user_properties if k == GATE_PROPERTY]
        if report.when == "call":
            self.qs.gates.extend(gates)
            if self.qs.ran is not None:
                self.qs.ran += not report.skipped
        if report.failed and not gates:
            (self.qs.other_failures if report.when == "call" else self.qs.errors).append(report.nodeid)


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> tuple[str, str, str] | None:
    """A test that the policy fails on an INCONCLUSIVE gate is counted and printed as `inconclusive` (letter I),
    not `failed`: it found no evidence of loss. pytest's exit status still counts it as a failure."""
    if report.when != "call" or not report.failed:
        return None
    outcomes = [Gate.from_json(v).outcome for k, v in report.user_properties if k == GATE_PROPERTY]
    if outcomes and all(o is Outcome.INCONCLUSIVE for o in outcomes):
        return "inconclusive", "I", "INCONCLUSIVE"
    return None


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    qs = _session(config)
    if qs is None:
        return
    # only the variants whose tests this session deselected (a selftest session configures the demo matrix
    # too); an xdist controller collects nothing itself, and its workers deselect what the cadence leaves out
    controller = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
    deferred = [d for d in deferred_variants(qs.matrix, qs.cadence) if controller or d.label in qs.deselected]
    left_out = deferred_line(deferred, qs.cadence)
    if left_out is not None:
        terminalreporter.write_line(f"quantgate {left_out}")
    verdict = qs.verdict()
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED) and verdict.nothing_ran \
            and not config.stash.get(CALLER_PRINTS_VERDICT, False):
        # pytest itself exits 0 when every test skipped; say that no checkpoint was checked
        terminalreporter.write_line("quantgate: NOTHING RAN: every selected test was skipped, so no checkpoint was "
                                    "checked (`quantgate run` exits 3 here)", red=True)
    if qs.gates:
        terminalreporter.write_sep("-", "quantgate gates")
        lines = verdict.lines(qs.policy)
        for line in lines[:-1] if config.stash.get(CALLER_PRINTS_VERDICT, False) else lines:
            terminalreporter.write_line(line)
    if qs.run is None:
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


@pytest.fixture
def table_snapshot(snapshot, qg_run: Run, request: pytest.FixtureRequest):  # noqa: ANN201 - syrupy's fixture
    """syrupy's snapshot, storing score tables as JSON in the project's snapshot folder (ini
    ``quantgate_snapshots``, default tests/__snapshots__; never inside the installed package), one folder per
    hardware class or CPU tier (`sm90`, `cpu-avx2`), compared within noise (quantgate.report.snapshot)."""
    from quantgate.report.snapshot import per_hardware

    root = _resolve(request.config, "--qg-snapshots", "quantgate_snapshots")
    return snapshot.use_extension(per_hardware(qg_run.hw.keys[0], root))


@pytest.fixture
def qg_judge(qg_session: QuantgateSession, request: pytest.FixtureRequest) -> Callable[[str, str, Judgement], Gate]:
    """``judge(gate_name, subject, judgement)``: give the gate its tier from the policy, record it (JUnit
    properties: outcome, tier, level, floor, n, mdd, n_needed, disposition), print its message with the
    policy, and end the test as the policy says: FAIL fails it, INCONCLUSIVE fails it, xfails it (warn) or
    passes it with a QuantgateNote warning, NOT_GATED skips it (neither pass nor fail)."""

    def judge(name: str, subject: str, judgement: Judgement) -> Gate:
        tier = qg_session.policy.tier(name)
        control = qg_session.matrix.is_control(subject)
        gate = Gate(name, subject, tier, judgement.outcome, judgement.parameters, judgement.message(), control)
        disposition = qg_session.policy.disposition(gate.outcome, tier, qg_session.cadence, control=control)
        # What `record_property` does, without its warning under junit_family xunit2: JUnit XML writes
        # user properties in every family.
        props = request.node.user_properties
        props.append((GATE_PROPERTY, gate.as_json()))
        for key, value in {
            "outcome": gate.outcome.value, "tier": tier, "cadence": qg_session.cadence,
            "disposition": disposition, **gate.parameters.as_dict(),
        }.items():
            props.append((f"quantgate.{key}", value))
        policy_line = (
            f"policy   {name} is {tier}; at cadence {qg_session.cadence} {gate.outcome.label} -> {disposition}"
        )
        text = f"{gate.message}\n  {policy_line}"
        progress.line(f"gate {name} {subject}: {gate.outcome.label} -> {disposition}")
        print(text)
        apply_disposition(disposition, text)
        return gate

    return judge


def apply_disposition(disposition: str, text: str) -> None:
    """End the test as the policy says; the test's own word (failed, xfailed, skipped) follows the gate's."""
    first = text.splitlines()[0]
    if disposition == "fail":
        pytest.fail(text, pytrace=False)
    if disposition == "warn":
        pytest.xfail(f"{first} (policy: warn)")
    if disposition == "not-gated":
        pytest.skip(f"{first}")
    if disposition == "expected-fail":
        pytest.xfail(f"negative control caught, as expected: {first}")
    if disposition == "control-missed":
        pytest.fail(f"negative control NOT caught: the gates no longer see a deliberately damaged variant\n{text}",
                    pytrace=False)
    if disposition == "note":
        warnings.warn(QuantgateNote(f"{first} (policy: pass with note)"), stacklevel=2)

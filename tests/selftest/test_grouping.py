"""`pytest -n N` schedules per variant: every test of one variant carries that variant's xdist_group, so
`--dist loadgroup` (the default the plugin picks when -n is given without --dist) sends it to one worker."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from quantgate import plugin
from quantgate.scheduling import variant_scheduling

ROOT = Path(__file__).resolve().parents[2]
SUITE = '''
def test_retention(qg_variant, qg_task):
    pass

def test_kernel(qg_any_variant):
    pass

def test_table(qg_model):
    pass
'''


class _Items:
    def __init__(self) -> None:
        self.items: list[pytest.Item] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = list(session.items)


def test_collection_assigns_one_group_per_variant(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    got = _Items()
    code = pytest.main(
        [str(tmp_path), "--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "--qg-matrix", str(ROOT / "fixtures" / "gpu.yaml"),
         "--qg-thresholds", str(ROOT / "thresholds" / "retention.yaml")],
        plugins=[got],
    )
    assert code == 0
    groups: dict[str, set[str]] = {}
    for item in got.items:
        marks = [m.args[0] for m in item.iter_markers("xdist_group")]
        variant = plugin._variant_of(item)
        if variant is None:
            assert marks == [], f"{item.nodeid}: a test of no single variant needs no group"
            continue
        assert marks == ["/".join(variant)], item.nodeid
        groups.setdefault(marks[0], set()).add(item.name.split("[")[0])
    assert groups == {
        "smollm2-135m/bf16": {"test_kernel"},
        "smollm2-135m/fp8-modelopt": {"test_retention", "test_kernel"},
        "smollm2-135m/nvfp4-modelopt": {"test_retention", "test_kernel"},
        "smollm2-135m/nvfp4-emulated": {"test_retention", "test_kernel"},
    }
    # each variant's tests are contiguous (baselines first), so a worker's server for it starts once
    order = [plugin._variant_of(i) for i in got.items if plugin._variant_of(i)]
    runs = [v for k, v in enumerate(order) if k == 0 or order[k - 1] != v]
    assert len(runs) == len(set(runs)) and runs[0] == ("smollm2-135m", "bf16")


def _dist_after(argv_option: dict) -> str:
    option = SimpleNamespace(**{"numprocesses": None, "dist": "no", "distload": False, **argv_option})
    wrapper = plugin.pytest_cmdline_main(SimpleNamespace(option=option))
    next(wrapper)  # the part before pytest's (and xdist's) own pytest_cmdline_main
    return option.dist


@pytest.mark.parametrize(
    ("given", "dist"),
    [
        ({"numprocesses": 2}, "loadgroup"),  # -n 2
        ({"numprocesses": "auto"}, "loadgroup"),  # -n auto
        ({"numprocesses": 2, "dist": "load"}, "load"),  # the user's --dist wins
        ({"numprocesses": 2, "distload": True}, "no"),  # --dload: xdist makes it "load"
        ({"numprocesses": 0}, "no"),  # -n 0: no workers
        ({}, "no"),  # no xdist at all
    ],
)
def test_dist_defaults_to_loadgroup_when_n_is_given(given, dist):
    assert _dist_after(given) == dist


LABELS = ["smollm2-135m/bf16", "smollm2-135m/nvfp4", "smollm2-135m/nvfp4-modelopt", "smollm2-135m/fp8-modelopt"]


@pytest.mark.parametrize(
    ("nodeid", "scope"),
    [
        ("tests/test_accuracy.py::test_accuracy_retention[smollm2-135m/fp8-modelopt-hellaswag]",
         "quantgate:smollm2-135m/fp8-modelopt"),
        ("tests/test_accuracy.py::test_kernel_path[smollm2-135m/fp8-modelopt]", "quantgate:smollm2-135m/fp8-modelopt"),
        # the longest label wins; a label inside another parameter's id does not count
        ("t.py::test_x[smollm2-135m/nvfp4-modelopt-gsm8k]", "quantgate:smollm2-135m/nvfp4-modelopt"),
        ("t.py::test_x[smollm2-135m/nvfp4-gsm8k]", "quantgate:smollm2-135m/nvfp4"),
        ("t.py::test_x[gsm8k-smollm2-135m/bf16]", "quantgate:smollm2-135m/bf16"),
        # xdist's suffix from pytest < 9.2 does not confuse it
        ("t.py::test_x[smollm2-135m/bf16-hellaswag]@smollm2-135m/bf16", "quantgate:smollm2-135m/bf16"),
        # no variant: xdist's own rule (the group after @, else the test alone)
        ("tests/t.py::test_score_table[smollm2-135m]", "tests/t.py::test_score_table[smollm2-135m]"),
        ("t.py::test_y@mygroup", "mygroup"),
        ("t.py::test_z[smollm2-135m/bf16x]", "t.py::test_z[smollm2-135m/bf16x]"),
    ],
)
def test_scheduler_scopes_tests_by_variant(nodeid, scope):
    cls = variant_scheduling(LABELS)
    assert cls._split_scope(object.__new__(cls), nodeid) == scope


@pytest.mark.slow
def test_real_xdist_run_keeps_each_variant_on_one_worker(tmp_path):
    """`pytest -n 2` for real (two worker processes, ~20 s): each variant's tests ran in one worker."""
    (tmp_path / "test_suite.py").write_text(
        "import os\n"
        "def _log(v):\n"
        f"    with open({str(tmp_path / 'placement.txt')!r}, 'a') as fh:\n"
        "        fh.write(f\"{v[0]}/{v[1]} {os.environ['PYTEST_XDIST_WORKER']}\\n\")\n"
        + SUITE.replace("    pass", "    _log(locals().get('qg_variant') or locals().get('qg_any_variant') "
                                      "or ('-', '-'))")
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path), "-n", "2", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), "--qg-matrix", str(ROOT / "fixtures" / "gpu.yaml"),
         "--qg-thresholds", str(ROOT / "thresholds" / "retention.yaml")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    workers: dict[str, set[str]] = {}
    for line in (tmp_path / "placement.txt").read_text().splitlines():
        variant, worker = line.split()
        workers.setdefault(variant, set()).add(worker)
    workers.pop("-/-", None)
    assert len(workers) == 4 and all(len(w) == 1 for w in workers.values()), workers

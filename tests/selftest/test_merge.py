"""Shards that merge: results directories written by two runners (a CI matrix over variants), each holding real
ResultStore entries, merge by copying into one store that answers every query as a single store with all the
results does, and renders the same score table. A conflict (same key, different result) is refused, naming the
files, with nothing written."""

from pathlib import Path

import pytest

from quantgate import runner as runner_mod
from quantgate import verdicts
from quantgate.cli import main as cli_main
from quantgate.evaluation.provenance import versions
from quantgate.matrix import load_matrix, load_thresholds
from quantgate.merge import MergeError, merge_results
from tests.selftest.synthetic_store import stand_in_checkpoints

ROOT = Path(__file__).resolve().parents[2]
MATRIX = """
models:
  - name: m
    source: {kind: local, path: /nonexistent}
    variants:
      - {name: bf16, format: bf16}
      - {name: fp8, format: fp8, builder: llmcompressor, recipe: {scheme: FP8_DYNAMIC}}
      - {name: int8, format: int8, builder: llmcompressor, recipe: {scheme: W8A8}}
tasks:
  - {name: hellaswag, metric: acc_norm, limit: 40}
  - {name: gsm8k, metric: "exact_match,strict-match", limit: 40, gate: false}
"""
# per-item correctness of each variant, as a run of real lm-eval would store it (synthetic, fixed)
CORRECT = {"bf16": [1, 1, 0, 1] * 10, "fp8": [1, 1, 0, 0] * 10, "int8": [1, 0, 0, 1] * 10}


def _samples(variant: str, task: str) -> list[dict]:
    metric = "acc_norm" if task == "hellaswag" else "exact_match"
    rows = []
    for i, ok in enumerate(CORRECT[variant]):
        row = {"doc_id": i, metric: float(ok), "resps": [[f"{variant}-{i}"]], "filtered_resps": [f"{variant}-{i}"]}
        if task == "gsm8k":
            row["filter"] = "strict-match"
        rows.append(row)
    return rows


@pytest.fixture
def make_run(tmp_path, monkeypatch):
    """A reading Run over a results directory, its checkpoints stood in for (no build, no server)."""

    stand_in_checkpoints(tmp_path, monkeypatch)
    (tmp_path / "matrix.yaml").write_text(MATRIX)
    matrix = load_matrix(tmp_path / "matrix.yaml")
    thresholds = load_thresholds(ROOT / "thresholds" / "retention.yaml")

    def make(root: Path, reuse_only: bool = True) -> runner_mod.Run:
        return runner_mod.Run(matrix, thresholds, root, reuse_only=reuse_only)

    return make


def write_shard(make_run, root: Path, variants: list[str], flip: str | None = None) -> Path:
    """Store every task of `variants` under `root` as the runner keys them; `flip` changes that variant's
    first item (a run that disagrees with another under the same key)."""
    run = make_run(root, reuse_only=False)
    for name in variants:
        vr = run.variant("m", name)
        kernel = f"kernel-of-{name}"
        run.server_records.put(vr.server_key(), {"kernel_path": kernel, "log": f"{root}/_server_logs/{name}.log"})
        for task in run.matrix.tasks:
            samples = _samples(name, task.name)
            if name == flip:
                metric = next(k for k in samples[0] if k in ("acc_norm", "exact_match"))
                samples[0][metric] = 1.0 - samples[0][metric]
            mean = sum(s.get("acc_norm", s.get("exact_match")) for s in samples) / len(samples)
            context = {"versions": versions(), "finished_at": f"shard {root.name}"}  # run records differ
            run.store.put("m", name, task.name, vr.eval_key(task, kernel), context,
                          {task.metric_key: mean}, samples, None)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shards_merge_into_the_single_run_store(tmp_path, make_run):
    single = write_shard(make_run, tmp_path / "single", ["bf16", "fp8", "int8"])
    # each shard evaluated the baseline its retention needs; both hold the same result for it
    a = write_shard(make_run, tmp_path / "shard-a", ["bf16", "fp8"])
    b = write_shard(make_run, tmp_path / "shard-b", ["bf16", "int8"])
    merged = tmp_path / "merged"
    report = merge_results([a, b], merged)
    assert "m/bf16/hellaswag" in " ".join(report.identical) and "_servers" in " ".join(report.identical)
    # a: bf16 and fp8, 2 tasks each, and 2 server records; b adds int8's 3; b's bf16 (2 tasks, 1 record) is there
    assert (len(report.copied), len(report.identical)) == (9, 3)
    one, both = make_run(single), make_run(merged)
    for v in ("bf16", "fp8", "int8"):
        r1, r2 = one.variant("m", v).results(one.matrix.tasks), both.variant("m", v).results(both.matrix.tasks)
        for t in one.matrix.tasks:
            assert r2[t.name].provenance["key"] == r1[t.name].provenance["key"]
            assert r2[t.name].stored.aggregate == r1[t.name].stored.aggregate
            assert r2[t.name].stored.samples == r1[t.name].stored.samples
    t1 = verdicts.score_table(one, "m").render(stable=True)
    t2 = verdicts.score_table(both, "m").render(stable=True)
    assert t1 == t2 and "| fp8" in t1 and "| int8" in t1
    # the same entries, no more: the merged store is the single store (up to the run records inside)
    entries = {p.parent.relative_to(r) for r in (single,) for p in r.glob("*/*/*/*/provenance.json")}
    assert entries == {p.parent.relative_to(merged) for p in merged.glob("*/*/*/*/provenance.json")}


def test_merging_again_or_into_a_partial_destination_is_idempotent(tmp_path, make_run):
    a = write_shard(make_run, tmp_path / "a", ["bf16", "fp8"])
    merged = tmp_path / "merged"
    merge_results([a], merged)
    before = _files(merged)
    again = merge_results([a], merged)
    assert again.copied == [] and _files(merged) == before


def test_conflict_is_refused_naming_the_files_and_nothing_is_written(tmp_path, make_run):
    a = write_shard(make_run, tmp_path / "a", ["bf16", "fp8"])
    b = write_shard(make_run, tmp_path / "b", ["bf16", "int8"], flip="bf16")
    merged = tmp_path / "merged"
    with pytest.raises(MergeError) as err:
        merge_results([a, b], merged)
    msg = str(err.value)
    assert "nothing was written" in msg and "aggregate.json, samples.jsonl differ between" in msg
    assert "m/bf16/hellaswag/" in msg and str(a / "m" / "bf16") in msg and str(b / "m" / "bf16") in msg
    assert not merged.exists()
    # into an existing destination: the new int8 entries are not copied either
    merge_results([a], merged)
    before = _files(merged)
    with pytest.raises(MergeError, match="conflict"):
        merge_results([b], merged)
    assert _files(merged) == before


def test_server_records_that_name_another_kernel_conflict(tmp_path, make_run):
    a = write_shard(make_run, tmp_path / "a", ["bf16"])
    b = write_shard(make_run, tmp_path / "b", ["bf16"])
    rec = next((b / "_servers").glob("*.json"))
    rec.write_text(rec.read_text().replace("kernel-of-bf16", "another-kernel"))
    with pytest.raises(MergeError, match=r"_servers/.*\.json: kernel_path differ between"):
        merge_results([a, b], tmp_path / "merged")


def test_entries_not_keyed_by_their_provenance_are_refused(tmp_path, make_run):
    a = write_shard(make_run, tmp_path / "a", ["bf16"])
    entry = next(a.glob("m/bf16/hellaswag/*/"))
    entry.rename(entry.with_name("0123456789abcdef"))
    with pytest.raises(MergeError, match="not the digest of its provenance key"):
        merge_results([a], tmp_path / "merged")
    with pytest.raises(MergeError, match="no stored results here"):
        merge_results([tmp_path / "ckpt"], tmp_path / "merged")
    with pytest.raises(MergeError, match="not a directory"):
        merge_results([tmp_path / "missing"], tmp_path / "merged")


def test_cli_merge(tmp_path, make_run, capsys):
    a = write_shard(make_run, tmp_path / "a", ["bf16", "fp8"])
    b = write_shard(make_run, tmp_path / "b", ["bf16", "int8"], flip="bf16")
    assert cli_main(["merge", str(a), "--into", str(tmp_path / "m1")]) == 0
    assert "merged: 6 entr(ies) copied" in capsys.readouterr().out  # 2 variants x 2 tasks, 2 server records
    # refused: exit 3 like every quantgate error that stops a command (cli docstring)
    assert cli_main(["merge", str(a), str(b), "--into", str(tmp_path / "m2")]) == 3
    assert "quantgate: error: refusing to merge" in capsys.readouterr().err

"""Result store and checkpoint cache: atomic writes, exact-key reuse, nothing half-written survives a crash."""

import json
from pathlib import Path

import pytest

from quantgate.checkpoints import cache
from quantgate.checkpoints.obtain import validate_checkpoint_dir
from quantgate.errors import BuildError
from quantgate.evaluation.lmeval_runner import item_outcomes
from quantgate.evaluation.store import ResultStore, ServerRecords

KEY = {"checkpoint_sha256": "abc", "task": "hellaswag", "kernel_path": "k", "limit": 10}
SAMPLES = [
    {"doc_id": 1, "acc_norm": 0.0, "resps": [["x"]], "filter": "none"},
    {"doc_id": 0, "acc_norm": 1.0, "resps": [["y"]], "filter": "none"},
]


def test_put_get_roundtrip_and_key_must_match_exactly(tmp_path):
    store = ResultStore(tmp_path)
    store.put("m", "v", "hellaswag", KEY, {"versions": {}}, {"acc_norm,none": 0.5}, SAMPLES, None)
    hit = store.get("m", "v", "hellaswag", KEY)
    assert hit and hit.aggregate["acc_norm,none"] == 0.5 and len(hit.samples) == 2
    for field, other in [("checkpoint_sha256", "abd"), ("kernel_path", "other"), ("limit", 11)]:
        assert store.get("m", "v", "hellaswag", {**KEY, field: other}) is None, field


def test_variants_serving_the_same_bytes_share_one_result(tmp_path):
    store = ResultStore(tmp_path)
    store.put("m", "nvfp4-modelopt", "hellaswag", KEY, {}, {"acc_norm,none": 0.5}, SAMPLES, None)
    shared = store.find("m", "nvfp4-emulated", "hellaswag", KEY)
    assert shared and shared.path.parent.parent.name == "nvfp4-modelopt"
    assert store.get("m", "nvfp4-emulated", "hellaswag", KEY) is None  # found, not copied
    # Another key, another task or another model finds nothing.
    assert store.find("m", "nvfp4-emulated", "hellaswag", {**KEY, "checkpoint_sha256": "abd"}) is None
    assert store.find("m", "nvfp4-emulated", "gsm8k", KEY) is None
    assert store.find("other", "nvfp4-modelopt", "hellaswag", KEY) is None
    # A variant's own entry wins over a twin's.
    store.put("m", "nvfp4-emulated", "hellaswag", KEY, {}, {"acc_norm,none": 0.25}, SAMPLES, None)
    assert store.find("m", "nvfp4-emulated", "hellaswag", KEY).aggregate["acc_norm,none"] == 0.25


def test_crash_while_writing_leaves_no_entry(tmp_path):
    store = ResultStore(tmp_path)

    def bad_samples():
        yield SAMPLES[0]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.put("m", "v", "t", KEY, {}, {}, bad_samples(), None)
    assert store.get("m", "v", "t", KEY) is None
    assert not [p for p in (tmp_path / "m" / "v" / "t").iterdir() if p.is_dir()]


def test_server_records(tmp_path):
    rec = ServerRecords(tmp_path)
    assert rec.get({"a": 1}) is None
    rec.put({"a": 1}, {"kernel_path": "K"})
    assert rec.get({"a": 1})["kernel_path"] == "K"


def test_cache_entry_built_once_and_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path))
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "config.json").write_text("{}")

    first = cache.cached_entry("built", {"k": 1}, build)
    second = cache.cached_entry("built", {"k": 1}, build)
    assert first == second and len(calls) == 1
    assert json.loads((first / cache.MANIFEST).read_text())["checkpoint_sha256"]

    def crash(d: Path) -> None:
        (d / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached_entry("built", {"k": 2}, crash)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "built").iterdir() if p.is_dir()) == [
        first.name
    ]


def test_item_outcomes_sorted_by_doc_and_kinds():
    o = item_outcomes(SAMPLES, "acc_norm,none")
    assert o.ids == ("0", "1") and o.values.tolist() == [1.0, 0.0] and o.kind == "mean"
    inst = item_outcomes(
        [{"doc_id": 0, "inst_level_strict_acc": [True, False, True], "resps": [["a"]]}],
        "inst_level_strict_acc,none",
    )
    assert inst.kind == "weighted_mean" and inst.score() == pytest.approx(2 / 3)
    ppl = item_outcomes(
        [{"doc_id": 0, "word_perplexity": [-20.0, 10], "resps": [["a"]]}], "word_perplexity,none"
    )
    assert ppl.kind == "perplexity" and ppl.score() == pytest.approx(2.718281828**2, rel=1e-6)


def test_validate_checkpoint_dir_errors(tmp_path):
    with pytest.raises(BuildError, match="no config.json"):
        validate_checkpoint_dir(tmp_path, "m/v")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(BuildError, match="pickled"):
        validate_checkpoint_dir(tmp_path, "m/v")
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(BuildError, match="pickled"):  # refused even beside safetensors weights
        validate_checkpoint_dir(tmp_path, "m/v")
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(BuildError, match="no tokenizer"):
        validate_checkpoint_dir(tmp_path, "m/v")
    (tmp_path / "tokenizer.json").write_text("{}")
    validate_checkpoint_dir(tmp_path, "m/v")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BuildError, match="truncated|not a readable safetensors"):
        validate_checkpoint_dir(tmp_path, "m/v")


def test_reading_stored_results_only_never_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path))
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "config.json").write_text("{}")

    with cache.only_cached(), pytest.raises(cache.NotCachedError, match="nothing is built"):
        cache.cached_entry("built", {"k": 2}, build)
    assert calls == [] and not [p for p in (tmp_path / "checkpoints" / "built").iterdir() if p.is_dir()]
    built = cache.cached_entry("built", {"k": 2}, build)
    with cache.only_cached():
        assert cache.cached_entry("built", {"k": 2}, build) == built
    assert len(calls) == 1


def test_bits_per_byte_is_not_byte_perplexity():
    # Two documents: loglikelihood -100 nats over 50 bytes, -60 over 30: 160 nats / 80 bytes = 2 nats per byte.
    # bits_per_byte = 2 / ln 2 = 2.88539 bits; byte_perplexity = e**2 = 7.38906 (lm_eval/api/metrics.py).
    samples = [
        {"doc_id": 0, "bits_per_byte": [-100.0, 50], "byte_perplexity": [-100.0, 50], "resps": [["a"]]},
        {"doc_id": 1, "bits_per_byte": [-60.0, 30], "byte_perplexity": [-60.0, 30], "resps": [["b"]]},
    ]
    assert item_outcomes(samples, "bits_per_byte,none").score() == pytest.approx(2.8853900817779268, rel=1e-12)
    assert item_outcomes(samples, "byte_perplexity,none").score() == pytest.approx(7.38905609893065, rel=1e-12)
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    pairs = [(-100.0, 50), (-60.0, 30)]
    assert item_outcomes(samples, "bits_per_byte,none").score() == pytest.approx(bits_per_byte(pairs))
    assert item_outcomes(samples, "byte_perplexity,none").score() == pytest.approx(weighted_perplexity(pairs))
    # aligned() keeps the metric, so a subset still scores as bits per byte
    assert item_outcomes(samples, "bits_per_byte,none").aligned(("1",)).score() == pytest.approx(2 / 0.6931471805599453)

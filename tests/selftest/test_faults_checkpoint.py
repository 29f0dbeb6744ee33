"""Fault suite, checkpoints and files: each case injects one fault and checks that quantgate names its cause,
keeps nothing half-written, and loses no result that was already stored.

Cases: a truncated safetensors file, a missing shard, an index naming a tensor its shard lacks, a config/tensor
mismatch (compressed-tensors and modelopt), a missing tokenizer, pickled weights, a corrupted result file and a
corrupted cache entry, a full disk (ENOSPC) while writing a result, and malformed matrix, thresholds and
accepted-baseline files. All fast: tiny checkpoints written here, no server.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from quantgate import atomic
from quantgate import runner as runner_mod
from quantgate.checkpoints import cache
from quantgate.checkpoints.obtain import validate_checkpoint_dir
from quantgate.errors import BuildError, MatrixError, QuantgateError
from quantgate.evaluation import store as store_mod
from quantgate.evaluation.store import ResultStore, ServerRecords
from quantgate.matrix import load_matrix, load_thresholds
from quantgate.verdicts import read_accepted
from tests.selftest.test_emulation import make_bf16_checkpoint, make_quantized_checkpoint

ROOT = Path(__file__).resolve().parents[2]
KEY = {"checkpoint_sha256": "abc", "task": "hellaswag", "kernel_path": "k", "limit": 2}
SAMPLES = [
    {"doc_id": 0, "acc_norm": 1.0, "resps": [["y"]], "filter": "none"},
    {"doc_id": 1, "acc_norm": 0.0, "resps": [["x"]], "filter": "none"},
]


def _with_tokenizer(path: Path) -> Path:
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return _with_tokenizer(make_bf16_checkpoint(tmp_path_factory.mktemp("bf16")))


@pytest.fixture
def ckpt(tiny_base, tmp_path) -> Path:
    """A fresh copy of the valid tiny BF16 checkpoint to damage."""
    return Path(shutil.copytree(tiny_base, tmp_path / "ckpt"))


def _shard(ckpt: Path) -> Path:
    """Split model.safetensors into two shards with an index, as save_pretrained does for large models."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (ckpt / "model.safetensors").unlink()
    from safetensors.torch import save_file as save_torch

    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in halves.items():
        save_torch({k: tensors[k] for k in part}, str(ckpt / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ckpt


# ------------------------------------------------------------------------------------ checkpoint faults


def test_valid_checkpoints_pass(ckpt):
    validate_checkpoint_dir(ckpt, "m/bf16")
    validate_checkpoint_dir(_shard(ckpt), "m/bf16")


def test_truncated_safetensors_is_named(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(BuildError, match=r"model\.safetensors is not a readable safetensors file.*truncated"):
        validate_checkpoint_dir(ckpt, "m/v")


def test_corrupt_safetensors_header_is_named(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header starts at byte 8
    f.write_bytes(bytes(data))
    with pytest.raises(BuildError, match=r"m/v: .*model\.safetensors is not a readable safetensors file"):
        validate_checkpoint_dir(ckpt, "m/v")


def test_missing_shard_is_named(ckpt):
    _shard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BuildError, match=r"shard .*model-00002-of-00002\.safetensors named in .* is missing"):
        validate_checkpoint_dir(ckpt, "m/v")


def test_index_naming_a_tensor_its_shard_lacks_is_named(ckpt):
    _shard(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BuildError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight' to .*model-00001-of-00002"):
        validate_checkpoint_dir(ckpt, "m/v")


def test_missing_tokenizer_is_named(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(BuildError, match=r"m/v: .* has no tokenizer \(none of \['tokenizer\.json'"):
        validate_checkpoint_dir(ckpt, "m/v")


def test_pickled_weights_refused_unless_opted_in(ckpt):
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(BuildError, match=r"pickled weights \['pytorch_model\.bin'\].*allow_pickle: true"):
        validate_checkpoint_dir(ckpt, "m/v")
    validate_checkpoint_dir(ckpt, "m/v", allow_pickle=True)


def _quantized(tiny_base: Path, dest: Path, fmt: str) -> Path:
    make_quantized_checkpoint(tiny_base, dest, fmt)
    return _with_tokenizer(dest)


def _edit_config(path: Path, edit) -> None:  # noqa: ANN001
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def test_compressed_tensors_ignored_layer_stored_quantized_is_named(tiny_base, tmp_path):
    q = _quantized(tiny_base, tmp_path / "ct", "nvfp4_ct")
    validate_checkpoint_dir(q, "m/nvfp4-ct")
    _edit_config(q, lambda qc: qc["ignore"].append("re:.*layers\\.1\\.mlp\\.down_proj$"))
    with pytest.raises(BuildError, match=r"model\.layers\.1\.mlp\.down_proj: in the quantization config's ignore "
                                         r"list \('re:\.\*layers.*but stored quantized \(nvfp4_ct\)"):
        validate_checkpoint_dir(q, "m/nvfp4-ct")


def test_compressed_tensors_layer_stored_unquantized_but_not_ignored_is_named(tiny_base, tmp_path):
    q = _quantized(tiny_base, tmp_path / "ct", "nvfp4_ct")
    # A builder that skipped one layer: its weight is stored in BF16, the config still quantizes every Linear.
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_torch

    tensors = load_file(str(q / "model.safetensors"))
    layer = "model.layers.0.self_attn.k_proj"
    for role in ("weight_packed", "weight_scale", "weight_global_scale"):
        tensors.pop(f"{layer}.{role}")
    tensors[f"{layer}.weight"] = load_file(str(tiny_base / "model.safetensors"))[f"{layer}.weight"]
    save_torch(tensors, str(q / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BuildError, match=rf"{layer}: stored unquantized \(BF16\) but the quantization config "
                                         "does not ignore it"):
        validate_checkpoint_dir(q, "m/nvfp4-ct")
    _edit_config(q, lambda qc: qc["ignore"].append(layer))  # declaring it ignored makes the two agree
    validate_checkpoint_dir(q, "m/nvfp4-ct")


def test_modelopt_excluded_layer_stored_quantized_is_named(tiny_base, tmp_path):
    q = _quantized(tiny_base, tmp_path / "mo", "nvfp4")
    validate_checkpoint_dir(q, "m/nvfp4")
    # modelopt's own file: hf_quant_config.json exclude_modules (config.json carries no quantization_config)
    cfg = json.loads((q / "config.json").read_text())
    cfg.pop("quantization_config")
    (q / "config.json").write_text(json.dumps(cfg))
    hf = json.loads((q / "hf_quant_config.json").read_text())
    hf["quantization"]["exclude_modules"].append("*layers.0.mlp.gate_proj")
    (q / "hf_quant_config.json").write_text(json.dumps(hf))
    with pytest.raises(BuildError, match=r"model\.layers\.0\.mlp\.gate_proj: in the quantization config's ignore "
                                         r"list \('\*layers\.0\.mlp\.gate_proj'\) but stored quantized \(nvfp4\)"):
        validate_checkpoint_dir(q, "m/nvfp4")


def test_quantized_tensors_without_quantization_config_are_named(tiny_base, tmp_path):
    q = _quantized(tiny_base, tmp_path / "mo", "fp8")
    cfg = json.loads((q / "config.json").read_text())
    cfg.pop("quantization_config")
    (q / "config.json").write_text(json.dumps(cfg))
    (q / "hf_quant_config.json").unlink()
    with pytest.raises(BuildError, match=r"model\.layers\.0\.mlp\.down_proj: stored quantized \(fp8\) but "
                                         "config.json has no quantization_config"):
        validate_checkpoint_dir(q, "m/fp8")


# ---------------------------------------------------------------------------------- cache faults


def _build_into(source: Path, calls: list[Path]):  # noqa: ANN202
    def build(tmp: Path) -> None:
        calls.append(tmp)
        for f in source.iterdir():
            shutil.copy2(f, tmp / f.name)

    return build


def test_corrupted_cache_entry_is_named_and_rebuilt_and_others_kept(tiny_base, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def validate(path: Path) -> None:
        validate_checkpoint_dir(path, "m/bf16")

    entry = cache.cached_entry("built", {"k": 1}, _build_into(tiny_base, calls), validate)
    other = cache.cached_entry("built", {"k": 2}, _build_into(tiny_base, calls), validate)
    other_bytes = (other / "model.safetensors").read_bytes()
    assert len(calls) == 2
    # Damage each kind of file the entry holds; each is detected, named, and the entry built again.
    damages = {
        "model.safetensors": lambda f: f.write_bytes(f.read_bytes()[:-64]),
        "config.json": lambda f: f.write_text(f.read_text().replace("llama", "llamb")),
        cache.MANIFEST: lambda f: f.write_text("{not json"),
    }
    for name, damage in damages.items():
        damage(entry / name)
        with caplog.at_level(logging.WARNING, logger="quantgate"), cache.only_cached():
            with pytest.raises(cache.NotCachedError, match=rf"{entry} is corrupt .*{name.split('.')[0]}"):
                cache.cached_entry("built", {"k": 1}, _build_into(tiny_base, calls), validate)
        before = len(calls)
        with caplog.at_level(logging.WARNING, logger="quantgate"):
            again = cache.cached_entry("built", {"k": 1}, _build_into(tiny_base, calls), validate)
        assert again == entry and len(calls) == before + 1, name
        assert any(name.split(".")[0] in r.message and "building it again" in r.message for r in caplog.records)
        validate(again)
        caplog.clear()
    assert (other / "model.safetensors").read_bytes() == other_bytes  # the other entry is untouched
    assert cache.cached_entry("built", {"k": 2}, _build_into(tiny_base, calls), validate) == other
    assert not [p for p in (tmp_path / "cache" / "checkpoints" / "built").iterdir() if p.name.startswith(".")]


def test_build_that_fails_validation_leaves_no_entry(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))

    def build(tmp: Path) -> None:
        _build_into(tiny_base, [])(tmp)
        (tmp / "tokenizer.json").unlink()

    with pytest.raises(BuildError, match="no tokenizer"):
        cache.cached_entry("built", {"k": 3}, build, lambda p: validate_checkpoint_dir(p, "m/v"))
    assert not [p for p in (tmp_path / "cache" / "checkpoints" / "built").iterdir() if p.is_dir()]


# ---------------------------------------------------------------------------------- store faults


def test_corrupted_result_is_named_not_reused_and_others_kept(tmp_path, caplog):
    store = ResultStore(tmp_path)
    for task in ("hellaswag", "gsm8k", "ifeval"):
        store.put("m", "v", task, {**KEY, "task": task}, {}, {"acc_norm,none": 0.5}, SAMPLES, None)
    bad_json = store.entry_dir("m", "v", "hellaswag", {**KEY, "task": "hellaswag"})
    (bad_json / "aggregate.json").write_text('{"acc_norm,none": 0.')
    flipped = store.entry_dir("m", "v", "gsm8k", {**KEY, "task": "gsm8k"})
    text = (flipped / "samples.jsonl").read_text()
    (flipped / "samples.jsonl").write_text(text.replace('"acc_norm": 0.0', '"acc_norm": 1.0'))  # still JSON
    with caplog.at_level(logging.WARNING, logger="quantgate"):
        assert store.get("m", "v", "hellaswag", {**KEY, "task": "hellaswag"}) is None
        assert store.get("m", "v", "gsm8k", {**KEY, "task": "gsm8k"}) is None
    messages = " ".join(r.message for r in caplog.records)
    assert f"{bad_json}: aggregate.json is unreadable" in messages
    assert "samples.jsonl has sha256" in messages and str(flipped) in messages
    intact = store.get("m", "v", "ifeval", {**KEY, "task": "ifeval"})
    assert intact is not None and intact.samples == SAMPLES
    # Storing it again (what a run does when get() finds nothing) replaces the corrupt entry.
    store.put("m", "v", "gsm8k", {**KEY, "task": "gsm8k"}, {}, {"acc_norm,none": 0.5}, SAMPLES, None)
    assert store.get("m", "v", "gsm8k", {**KEY, "task": "gsm8k"}).samples == SAMPLES


class _FakeServer:
    """Stands in for a vLLM server in a run whose evaluation is injected: no process, an empty log."""

    completions_url = "http://127.0.0.1:1/v1/completions"
    log_path = None
    startup_seconds = 0.0
    api_key = None
    proc = SimpleNamespace(poll=lambda: None)

    def log_text(self) -> str:
        return ""

    def check_alive(self, when: str) -> None:
        pass  # no process: it cannot die

    def stop(self) -> None:
        pass


def test_run_reevaluates_only_the_corrupted_result(tmp_path, monkeypatch, caplog):
    evaluated: list[str] = []

    def fake_run_task(*, task, **_):  # noqa: ANN001, ANN003, ANN202
        evaluated.append(task.name)
        return {task.metric_key: 0.5}, [{**s, task.metric_key.split(",")[0]: s["acc_norm"]} for s in SAMPLES], {}

    monkeypatch.setattr(runner_mod, "run_task", fake_run_task)
    monkeypatch.setattr(runner_mod, "baseline_checkpoint", lambda model: runner_mod.Checkpoint(tmp_path, "sha", "x"))
    monkeypatch.setattr(runner_mod.VariantRun, "_ensure_server_once", lambda self: _FakeServer())
    matrix = load_matrix(ROOT / "fixtures" / "demo.yaml")
    thresholds = load_thresholds(ROOT / "thresholds" / "retention.yaml")
    tasks = matrix.tasks[:2]

    run = runner_mod.Run(matrix, thresholds, tmp_path / "results")
    first = run.variant("smollm2-135m", "bf16").results(tasks)
    assert evaluated == [t.name for t in tasks]
    key = first[tasks[0].name].provenance["key"]
    assert key["client"]["add_bos_token"] is False and len(key["scoring_code_sha256"]) == 64
    corrupt = first[tasks[0].name].stored.path
    (corrupt / "samples.jsonl").write_text("truncated {")

    rerun = runner_mod.Run(matrix, thresholds, tmp_path / "results")
    with caplog.at_level(logging.WARNING, logger="quantgate"):
        second = rerun.variant("smollm2-135m", "bf16").results(tasks)
    assert evaluated == [t.name for t in tasks] + [tasks[0].name]  # only the corrupt one again
    assert not second[tasks[0].name].reused and second[tasks[1].name].reused
    assert any(str(corrupt) in r.message and "samples.jsonl" in r.message for r in caplog.records)
    assert second[tasks[0].name].stored.samples  # replaced by a readable entry


def _enospc_file(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
    class Full:
        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            return False

        def write(self, _data):  # noqa: ANN001, ANN202
            raise OSError(errno.ENOSPC, "No space left on device")

    return Full()


def test_full_disk_while_storing_a_result_keeps_the_previous_one(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.put("m", "v", "hellaswag", KEY, {"run": 1}, {"acc_norm,none": 0.5}, SAMPLES, None)
    monkeypatch.setattr(store_mod, "open", _enospc_file, raising=False)
    with pytest.raises(atomic.WriteError, match=r"m/v/hellaswag .*No space left on device \(errno 28\)"):
        store.put("m", "v", "hellaswag", KEY, {"run": 2}, {"acc_norm,none": 0.9}, SAMPLES, None)
    monkeypatch.undo()
    kept = store.get("m", "v", "hellaswag", KEY)
    assert kept is not None and kept.provenance["run"] == 1 and kept.aggregate == {"acc_norm,none": 0.5}
    task_dir = tmp_path / "m" / "v" / "hellaswag"
    assert sorted(p.name for p in task_dir.iterdir() if p.is_dir()) == [kept.path.name]  # no partial entry


def test_full_disk_during_an_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch):
    records = ServerRecords(tmp_path)
    records.put({"a": 1}, {"kernel_path": "K1"})
    monkeypatch.setattr(atomic.os, "fdopen", _enospc_file)
    with pytest.raises(atomic.WriteError, match=r"could not write .*\.json: No space left on device"):
        records.put({"a": 1}, {"kernel_path": "K2"})
    monkeypatch.undo()
    assert records.get({"a": 1})["kernel_path"] == "K1"
    assert [p.name for p in (tmp_path / "_servers").iterdir()] == [f"{store_mod.key_digest({'a': 1})[:16]}.json"]


def test_atomic_writes_use_unique_temporary_names(tmp_path, monkeypatch):
    """Two writers of one path never share a temporary file (the xdist race of a fixed `.tmp` name)."""
    seen: list[str] = []
    real = atomic.tempfile.mkstemp

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        fd, name = real(*args, **kwargs)
        seen.append(name)
        return fd, name

    monkeypatch.setattr(atomic.tempfile, "mkstemp", spy)
    target = tmp_path / "accepted.json"
    atomic.atomic_write_json(target, {"n": 1})
    atomic.atomic_write_json(target, {"n": 2})
    assert len(set(seen)) == 2 and all(Path(s).parent == tmp_path for s in seen)
    assert json.loads(target.read_text()) == {"n": 2} and [p.name for p in tmp_path.iterdir()] == ["accepted.json"]


# ----------------------------------------------------------------------------- malformed input files


def test_malformed_matrix_names_file_and_key(tmp_path):
    text = (ROOT / "fixtures" / "demo.yaml").read_text().replace("max_model_len: 2048", "max_model_lenght: 2048")
    bad = tmp_path / "matrix.yaml"
    bad.write_text(text)
    with pytest.raises(MatrixError, match=r"(?s)matrix\.yaml.*models\.smollm2-135m\.max_model_lenght: unknown key"):
        load_matrix(bad)
    bad.write_text("models: [\n")
    with pytest.raises(MatrixError, match=r"matrix\.yaml: not valid YAML"):
        load_matrix(bad)


def test_malformed_thresholds_names_file_and_key(tmp_path):
    text = (ROOT / "thresholds" / "retention.yaml").read_text().replace("int8: 0.95", "int8: 1.5", 1)
    bad = tmp_path / "retention.yaml"
    bad.write_text(text)
    with pytest.raises(MatrixError, match=r"(?s)retention\.yaml.*retention\.floors.*floor for 'int8' is 1\.5"):
        load_thresholds(bad)


def test_malformed_accepted_baseline_names_file_and_key(tmp_path):
    f = tmp_path / "hellaswag.json"
    f.write_text('{"metric": "acc_norm,none", "items": {"0": 1.0')
    with pytest.raises(QuantgateError, match=rf"accepted baseline {f} is unreadable"):
        read_accepted(f)
    f.write_text(json.dumps({"metric": "acc_norm,none"}))
    with pytest.raises(QuantgateError, match=r"hellaswag\.json: key 'items' is missing"):
        read_accepted(f)
    f.write_text(json.dumps({"metric": "acc_norm,none", "items": {"0": "one"}}))
    with pytest.raises(QuantgateError, match=r"hellaswag\.json: items\['0'\] is not a number"):
        read_accepted(f)
    f.write_text(json.dumps({"metric": "acc_norm,none", "items": {"0": 1.0}}))
    assert read_accepted(f)["items"] == {"0": 1.0}

"""What a result is keyed on: exactly its own task's data files, the lm-eval client settings that can change a
measurement, and a digest of quantgate's scoring code; transport settings stay out."""

import shutil
from pathlib import Path

from quantgate.evaluation import lmeval_runner
from quantgate.evaluation.task_data import task_data_files, task_data_fingerprint
from quantgate.matrix import Generation

SHARED = Path("/work/shared/data")


def _data(tmp_path: Path) -> Path:
    """A data folder with one small file per task path (contents need not be real for hashing)."""
    root = tmp_path / "data"
    for task in ("qg_gsm8k", "qg_hellaswag", "qg_mmlu", "qg_ifeval", "qg_wikitext"):
        for rel in task_data_files(task, num_fewshot=5):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(rel)
    for folder in ("gsm8k", "hellaswag", "mmlu", "ifeval", "wikitext2"):
        (root / folder / "README.md").write_text("readme")
    return root


def test_each_task_is_keyed_on_its_own_files_only(tmp_path):
    root = _data(tmp_path)
    tasks = ("qg_gsm8k", "qg_hellaswag", "qg_mmlu", "qg_ifeval", "qg_wikitext")
    before = {t: task_data_fingerprint(root, t) for t in tasks}
    # A new dataset folder and edited READMEs change no task's key (the issue: math500 added to shared/data).
    (root / "math500").mkdir()
    (root / "math500" / "README.md").write_text("new")
    (root / "mmlu" / "README.md").write_text("edited")
    assert {t: task_data_fingerprint(root, t) for t in tasks} == before
    # A file one task reads changes that task's key and no other.
    (root / "gsm8k" / "train.jsonl").write_text("changed few-shot pool")
    after = {t: task_data_fingerprint(root, t) for t in tasks}
    assert [t for t in tasks if after[t] != before[t]] == ["qg_gsm8k"]
    # mmlu reads its dev CSVs only for few-shot examples.
    assert task_data_fingerprint(root, "qg_mmlu", 0)["files"] == 57
    assert task_data_fingerprint(root, "qg_mmlu", 5)["files"] == 114
    (root / "mmlu" / "dev" / "anatomy_dev.csv").write_text("changed")
    assert task_data_fingerprint(root, "qg_mmlu", 0) == before["qg_mmlu"]
    # A missing file is part of the key (the task then fails to load, naming it).
    (root / "ifeval" / "input_data.jsonl").unlink()
    assert task_data_fingerprint(root, "qg_ifeval") != before["qg_ifeval"]
    assert task_data_fingerprint(None, "qg_ifeval") is None


def test_shared_data_fingerprints_ignore_unrelated_folders(tmp_path):
    if not (SHARED / "gsm8k" / "test.jsonl").is_file():
        import pytest

        pytest.skip("no shared/data here")
    partial = tmp_path / "partial"
    for folder in ("gsm8k", "hellaswag", "ifeval"):
        shutil.copytree(SHARED / folder, partial / folder)
    for task in ("qg_gsm8k", "qg_hellaswag", "qg_ifeval"):
        assert task_data_fingerprint(partial, task) == task_data_fingerprint(SHARED, task), task


def test_client_settings_and_scoring_digest_are_keyed_transport_is_not():
    settings = lmeval_runner.client_settings(Generation())
    assert settings["add_bos_token"] is False and settings["tokenizer_backend"] == "huggingface"
    assert settings["tokenized_requests"] is True and settings["max_length"] == 2048
    assert not {"num_concurrent", "batch_size", "base_url", "max_retries", "timeout"} & set(settings)
    assert lmeval_runner.client_settings(Generation(concurrency=32, batch_size=4)) == settings
    # what lm-eval is actually given carries every keyed setting with the same value
    args = lmeval_runner.model_args("http://127.0.0.1:1/v1/completions", "m", Path("/ckpt"), Generation())
    assert all(args[k] == v for k, v in settings.items() if k != "model")
    digest = lmeval_runner.scoring_code_sha256()
    assert len(digest) == 64 and digest == lmeval_runner.scoring_code_sha256()


def test_scoring_digest_changes_with_the_scoring_code(monkeypatch):
    before = lmeval_runner.scoring_code_sha256()
    lmeval_runner.scoring_code_sha256.cache_clear()
    real = lmeval_runner.inspect.getsource
    monkeypatch.setattr(lmeval_runner.inspect, "getsource",
                        lambda obj: real(obj) + ("# changed" if obj is lmeval_runner.item_outcomes else ""))
    try:
        assert lmeval_runner.scoring_code_sha256() != before
    finally:
        lmeval_runner.scoring_code_sha256.cache_clear()

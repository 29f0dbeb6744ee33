"""What a result is keyed on: exactly its own task's data files, the lm-eval client settings that can change a
measurement, and a digest of quantgate's scoring code; transport settings stay out."""

import shutil
from pathlib import Path

from quantgate.evaluation import lmeval_runner
from quantgate.evaluation.task_data import task_data_files, task_data_fingerprint
from quantgate.matrix import Generation

SHARED = Path("/work/shared/data")


TASKS = ("gsm8k", "hellaswag", "mmlu", "ifeval", "wikitext")


def _data(tmp_path: Path) -> Path:
    """A data folder with one small file per path the tasks' mirrors read (contents need not be real for
    hashing), and every MMLU subject's test CSV."""
    from quantgate.evaluation.tasks.offline_data import MIRRORS, MMLU_SUBJECTS

    root = tmp_path / "data"
    rels = {rel for m in MIRRORS.values() for rel in m.needs}
    rels |= {f"mmlu/test/{s}_test.csv" for s in MMLU_SUBJECTS} | {f"mmlu/dev/{s}_dev.csv" for s in MMLU_SUBJECTS}
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    for folder in ("gsm8k", "hellaswag", "mmlu", "ifeval", "wikitext2"):
        (root / folder / "README.md").write_text("readme")
    return root


def test_each_task_is_keyed_on_its_own_files_only(tmp_path):
    root = _data(tmp_path)
    before = {t: task_data_fingerprint(root, t) for t in TASKS}
    assert all(before.values()), before
    # A new dataset folder and edited READMEs change no task's key (the issue: math500 added to shared/data).
    (root / "math500").mkdir(exist_ok=True)
    (root / "math500" / "README.md").write_text("new")
    (root / "mmlu" / "README.md").write_text("edited")
    assert {t: task_data_fingerprint(root, t) for t in TASKS} == before
    # A file one task reads changes that task's key and no other.
    (root / "gsm8k" / "train.jsonl").write_text("changed few-shot pool")
    after = {t: task_data_fingerprint(root, t) for t in TASKS}
    assert [t for t in TASKS if after[t] != before[t]] == ["gsm8k"]
    # mmlu reads every subject's CSVs (test and dev)
    assert before["mmlu"]["files"] == 2 * 57
    assert "mmlu/dev/anatomy_dev.csv" in task_data_files("mmlu", root)
    # A missing file is part of the key (the task then fails to load, naming it).
    (root / "ifeval" / "input_data.jsonl").unlink()
    assert task_data_fingerprint(root, "ifeval") != before["ifeval"]
    assert task_data_fingerprint(None, "ifeval") is None


def test_shared_data_fingerprints_ignore_unrelated_folders(tmp_path):
    if not (SHARED / "gsm8k" / "test.jsonl").is_file():
        import pytest

        pytest.skip("no shared/data here")
    partial = tmp_path / "partial"
    for folder in ("gsm8k", "hellaswag", "ifeval"):
        shutil.copytree(SHARED / folder, partial / folder)
    for task in ("gsm8k", "hellaswag", "ifeval"):
        assert task_data_fingerprint(partial, task) == task_data_fingerprint(SHARED, task), task


def test_client_settings_and_scoring_digest_are_keyed_transport_is_not():
    settings = lmeval_runner.client_settings(Generation())
    assert settings["add_bos_token"] is False and settings["tokenizer_backend"] == "huggingface"
    assert settings["tokenized_requests"] is True and settings["max_length"] is None
    assert lmeval_runner.client_settings(Generation(), max_length=4096)["max_length"] == 4096
    assert not {"num_concurrent", "batch_size", "base_url", "max_retries", "timeout"} & set(settings)
    assert lmeval_runner.client_settings(Generation(concurrency=32, batch_size=4)) == settings
    # what lm-eval is actually given carries every keyed setting with the same value
    args = lmeval_runner.model_args("http://127.0.0.1:1/v1/completions", "m", Path("/ckpt"), Generation())
    assert all(args[k] == v for k, v in settings.items() if k != "model" and v is not None)
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


def test_task_digest_carries_no_install_location(tmp_path):
    """The same lm-eval in two virtual environments gives the same task digest (found when a fresh clone's
    results never matched another clone's: hellaswag's `process_docs` carried the venv's absolute path)."""
    import json
    from pathlib import Path

    import lm_eval

    from quantgate.evaluation.task_registry import leaves, location_free

    root = "/venv-a/lib/python3.11/site-packages/lm_eval"
    text = json.dumps({"process_docs": f"{root}/tasks/hellaswag/utils.process_docs", "x": f"{root}/api/x"})
    out = location_free(text, root, f"{root}/tasks/hellaswag/hellaswag.yaml")
    assert "venv-a" not in out and "<task_dir>/utils.process_docs" in out and "<lm_eval>/api/x" in out

    real_root = str(Path(lm_eval.__file__).resolve().parent)
    for leaf in leaves("hellaswag"):
        text = json.dumps(leaf.config, sort_keys=True, default=str)
        assert real_root in text  # the control: lm-eval does put the location in
        assert real_root not in location_free(text, real_root, leaf.yaml_path)

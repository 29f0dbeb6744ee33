"""Which offline data files each quantgate task reads, and their fingerprint for result keys.

The layout is relative to $QUANTGATE_DATA_DIR (shared/data); the loaders in tasks/qg_utils.py read exactly
these files, so a result is keyed on the sha256 of its own task's files and on nothing else in the folder.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

GSM8K_TEST = "gsm8k/test.jsonl"
GSM8K_TRAIN = "gsm8k/train.jsonl"
HELLASWAG_VAL = "hellaswag/hellaswag_val_full.txt.bz2"
MMLU_DIR = "mmlu"
IFEVAL_INPUT = "ifeval/input_data.jsonl"
WIKITEXT2_TEST = "wikitext2/wiki.test.raw"

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


def task_data_files(lm_eval_task: str, num_fewshot: int = 0) -> tuple[str, ...]:
    """The data files (relative to the data folder) that the qg_* task reads.

    gsm8k reads its train split always (the loader builds it; lm-eval draws few-shot examples from it); mmlu
    reads the dev CSVs only for few-shot examples. Raises KeyError for a task quantgate does not ship.
    """
    mmlu = tuple(f"{MMLU_DIR}/test/{s}_test.csv" for s in MMLU_SUBJECTS)
    if num_fewshot:
        mmlu += tuple(f"{MMLU_DIR}/dev/{s}_dev.csv" for s in MMLU_SUBJECTS)
    return {
        "qg_gsm8k": (GSM8K_TEST, GSM8K_TRAIN),
        "qg_hellaswag": (HELLASWAG_VAL,),
        "qg_mmlu": mmlu,
        "qg_ifeval": (IFEVAL_INPUT,),
        "qg_wikitext": (WIKITEXT2_TEST,),
    }[lm_eval_task]


def task_data_fingerprint(data_dir: Path | None, lm_eval_task: str, num_fewshot: int = 0) -> dict[str, object] | None:
    """{"files": n, "sha256": digest} over the task's files: sha256 of the sorted "relative-path sha256" lines.

    A missing file enters as "missing" (loading the task then fails naming it). None without a data folder.
    """
    if data_dir is None:
        return None
    h = hashlib.sha256()
    files = sorted(task_data_files(lm_eval_task, num_fewshot))
    for rel in files:
        h.update(f"{rel} {_file_sha256(Path(data_dir) / rel)}\n".encode())
    return {"files": len(files), "sha256": h.hexdigest()}


def _file_sha256(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return _hash_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _hash_cached(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per (path, size, mtime) per process."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()

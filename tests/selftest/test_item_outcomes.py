"""Per-item outcomes from lm-eval's logged samples: derived metrics and group items (pure logic, no lm-eval run)."""

import numpy as np
import pytest

from quantgate.errors import EvaluationError
from quantgate.evaluation.lmeval_runner import item_outcomes


def _ifeval_samples():
    # prompt-level strict per item, and instruction-level strict as lm-eval logs it (one bool per instruction)
    rows = [
        (True, [True, True]),
        (False, [True, False, False]),
        (False, [False]),
        (True, [True, True, True, True]),
    ]
    return [
        {"doc_id": i, "filter": "none", "prompt_level_strict_acc": p, "inst_level_strict_acc": inst, "resps": [["x"]]}
        for i, (p, inst) in enumerate(rows)
    ]


def test_derived_mean_scores_the_mean_of_its_parts():
    samples = _ifeval_samples()
    prompt = item_outcomes(samples, "prompt_level_strict_acc,none")
    inst = item_outcomes(samples, "inst_level_strict_acc,none")
    both = item_outcomes(samples, "mean:prompt_level_strict_acc,none+inst_level_strict_acc,none")
    assert prompt.score() == 0.5 and inst.score() == 7 / 10  # ratio of sums: 7 of 10 instructions
    assert both.score() == pytest.approx((0.5 + 0.7) / 2)  # seed 000's IFEval column
    assert both.kind == "mean" and both.weights is None and both.ids == ("0", "1", "2", "3")
    # each item's value: (prompt + inst_i / mean instructions per prompt) / 2, so paired gates use every item
    np.testing.assert_allclose(both.values, [(1 + 2 / 2.5) / 2, (0 + 1 / 2.5) / 2, 0.0, (1 + 4 / 2.5) / 2])


def test_derived_mean_refuses_perplexities():
    samples = [{"doc_id": 0, "word_perplexity": [-3.0, 2], "bits_per_byte": [-3.0, 9]}]
    with pytest.raises(EvaluationError, match="perplexities"):
        item_outcomes(samples, "mean:word_perplexity,none+bits_per_byte,none")


def test_group_items_are_subtask_and_doc_id():
    samples = [
        {"task": "mmlu_b", "doc_id": 0, "acc": 1.0, "resps": [["A"]]},
        {"task": "mmlu_a", "doc_id": 1, "acc": 0.0, "resps": [["B"]]},
        {"task": "mmlu_a", "doc_id": 0, "acc": 1.0, "resps": [["C"]]},
    ]
    o = item_outcomes(samples, "acc,none")
    assert o.ids == ("mmlu_a/0", "mmlu_a/1", "mmlu_b/0")  # doc 0 of two subtasks are different items
    assert o.values.tolist() == [1.0, 0.0, 1.0] and o.answers["mmlu_b/0"] == "A"

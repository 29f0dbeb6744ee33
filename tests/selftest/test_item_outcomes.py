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


def test_lm_evals_request_payloads_carry_sampling_and_chat_template_kwargs():
    """What reaches vLLM: lm-eval's own payload builders, fed quantgate's gen_kwargs (no server needed)."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    from quantgate.evaluation.lmeval_runner import gen_kwargs
    from quantgate.matrix import Chat

    sampling = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": None, "presence_penalty": 1.5,
                "repetition_penalty": None, "max_gen_toks": 64, "seed": 5}
    chat = LocalChatCompletion(base_url="http://127.0.0.1:1/v1/chat/completions", model="m", tokenizer_backend=None)
    payload = chat._create_payload(
        [{"role": "user", "content": "hi"}], generate=True,
        gen_kwargs=gen_kwargs(sampling, Chat(endpoint="chat-completions",
                                             chat_template_kwargs={"enable_thinking": False})) | {"until": ["X"]},
        seed=5,
    )
    assert payload["chat_template_kwargs"] == {"enable_thinking": False}
    assert (payload["temperature"], payload["top_p"], payload["top_k"], payload["presence_penalty"]) == (
        0.7, 0.8, 20, 1.5)
    assert payload["max_tokens"] == 64 and payload["seed"] == 5 and "do_sample" not in payload
    plain = LocalCompletionsAPI(base_url="http://127.0.0.1:1/v1/completions", model="m", tokenizer_backend=None)
    payload = plain._create_payload("Q:", generate=True, gen_kwargs=gen_kwargs(sampling) | {"until": ["Q:"]}, seed=5)
    assert payload["top_k"] == 20 and payload["stop"] == ["Q:"] and "chat_template_kwargs" not in payload


def test_repeats_pool_each_item_over_its_k_samples():
    from quantgate.evaluation.lmeval_runner import mean_of_aggregates, outcomes_over_repeats

    # 3 items x 2 repeats of a mean metric, and of a ratio-of-sums metric (instructions per prompt)
    rows = {0: [(1.0, [True, True]), (0.0, [True, False])],
            1: [(0.0, [False]), (0.0, [False])],
            2: [(1.0, [True, False, True]), (1.0, [True, True, True])]}
    samples = [
        {"doc_id": d, "repeat": r, "exact_match": v, "inst_level_strict_acc": inst, "resps": [[f"d{d}r{r}"]]}
        for d, reps in rows.items() for r, (v, inst) in enumerate(reps)
    ]
    em = outcomes_over_repeats(samples, "exact_match,none")
    assert em.ids == ("0", "1", "2") and em.values.tolist() == [0.5, 0.0, 1.0]
    assert em.answers["0"] == "d0r0"  # the first repeat's answer is the one shown
    inst = outcomes_over_repeats(samples, "inst_level_strict_acc,none")
    # pooled ratio: (2+1 + 0+0 + 2+3) / (2+2 + 1+1 + 3+3) = 8/12, the mean of the two repeats' scores (5/6, 3/6)
    assert inst.score() == pytest.approx(8 / 12) == pytest.approx((5 / 6 + 3 / 6) / 2)
    assert inst.as_map()["2"] == pytest.approx(5 / 6)
    # without repeat tags: exactly item_outcomes
    plain = [s for s in samples if s["repeat"] == 0]
    assert outcomes_over_repeats(plain, "exact_match,none").values.tolist() == [1.0, 0.0, 1.0]
    # lm-eval's aggregates of the k runs: numbers averaged, the rest kept
    agg = mean_of_aggregates([{"exact_match,none": 2 / 3, "alias": "gsm8k"}, {"exact_match,none": 1 / 3,
                                                                             "alias": "gsm8k"}])
    assert agg == {"exact_match,none": pytest.approx(0.5), "alias": "gsm8k"}


def test_repeats_that_hold_different_items_are_refused():
    from quantgate.evaluation.lmeval_runner import outcomes_over_repeats

    samples = [{"doc_id": 0, "repeat": 0, "acc": 1.0}, {"doc_id": 1, "repeat": 1, "acc": 1.0}]
    with pytest.raises(EvaluationError, match="repeats .* do not hold the same items"):
        outcomes_over_repeats(samples, "acc,none")

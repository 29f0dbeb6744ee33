"""Reasoning stripping and response counters on recorded responses (vLLM 0.31's JSON shapes, written here),
and the recording lm-eval API models carrying them through lm-eval's own request code."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from lm_eval.models.api_models import JsonChatStr

from quantgate.evaluation import recording_api
from quantgate.evaluation.responses import (
    cut_at_stop,
    metric_filter,
    parse_choice,
    response_counters,
    split_reasoning,
)

# /v1/chat/completions choices as vLLM 0.31 returns them: with --reasoning-parser qwen3 the reasoning is in
# message.reasoning (older vLLM: reasoning_content); without a parser it is inline in content.
CHAT_WITH_PARSER = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "\n\nThe answer is 42.",
                             "reasoning": "6 times 7.\n\nQuestion: is it 42? Yes."}}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 31, "total_tokens": 51},
}
CHAT_WITH_OLD_FIELD = {
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "42", "reasoning_content": "think think"}}],
    "usage": {"completion_tokens": 9},
}
CHAT_INLINE = {
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant",
                             "content": "<think>\nFirst, 6*7.\n\nQuestion: check.\n</think>\n\nThe answer is 42."
                                        "\n\nQuestion: next one"}}],
    "usage": {"completion_tokens": 40},
}
CHAT_UNTERMINATED = {
    "choices": [{"index": 0, "finish_reason": "length",
                 "message": {"role": "assistant", "content": "<think>\nLet me think about 6*7. It is"}}],
    "usage": {"completion_tokens": 256},
}
CHAT_PARSER_CUT_IN_REASONING = {  # the parser's view of the same: all reasoning, content null
    "choices": [{"index": 0, "finish_reason": "length",
                 "message": {"role": "assistant", "content": None, "reasoning": "Let me think about 6*7. It is"}}],
    "usage": {"completion_tokens": 256},
}
COMPLETIONS_PLAIN = {  # /v1/completions, two prompts in one request: usage sums over both, token_ids per choice
    "choices": [{"index": 1, "text": " 7", "finish_reason": "stop", "token_ids": [22]},
                {"index": 0, "text": " The answer is 42.", "finish_reason": "length", "token_ids": [1, 2, 3, 4, 5]}],
    "usage": {"completion_tokens": 6},
}


def test_split_reasoning_cases():
    assert split_reasoning("The answer", "thoughts") == ("The answer", "thoughts")
    assert split_reasoning("<think>a\nb</think>\n\nAnswer: 3") == ("Answer: 3", "a\nb")
    # the chat template opened the tag in the prompt (DeepSeek-R1): only the end tag is generated
    assert split_reasoning("a b c</think>Answer") == ("Answer", "a b c")
    assert split_reasoning("  <think>cut at max_gen_toks") == ("", "cut at max_gen_toks")
    assert split_reasoning("no reasoning here") == ("no reasoning here", None)
    assert split_reasoning(None) == ("", None)
    assert split_reasoning("[R]x[/R] y", tags=("[R]", "[/R]")) == ("y", "x")


def test_cut_at_stop_applies_every_stop():
    assert cut_at_stop("42\n\nQuestion: x", ["Question:", "\n\n"]) == "42"
    assert cut_at_stop("42", None) == "42" and cut_at_stop("a<|im_end|>b", "<|im_end|>") == "a"


def test_reasoning_from_the_server_field_is_never_scored():
    r = parse_choice(CHAT_WITH_PARSER["choices"][0], CHAT_WITH_PARSER["usage"], reasoning=True,
                     stops=["Question:", "\n\n"])
    # the stop strings occur in the reasoning and must not cut it; the "\n\n" vLLM leaves before the answer
    # separates reasoning from answer and is dropped before the stop strings apply
    assert r.reasoning == "6 times 7.\n\nQuestion: is it 42? Yes."
    assert r.answer == "The answer is 42." and r.finish_reason == "stop" and r.output_tokens == 31
    old = parse_choice(CHAT_WITH_OLD_FIELD["choices"][0], CHAT_WITH_OLD_FIELD["usage"])
    assert (old.answer, old.reasoning, old.output_tokens) == ("42", "think think", 9)


def test_inline_reasoning_split_then_stops_cut_the_answer_only():
    r = parse_choice(CHAT_INLINE["choices"][0], CHAT_INLINE["usage"], reasoning=True, stops=["Question:", "\n\n"])
    assert r.answer == "The answer is 42."
    assert r.reasoning == "First, 6*7.\n\nQuestion: check."
    # without reasoning: true the text is scored as the server sent it (a non-thinking model's output)
    plain = parse_choice(CHAT_INLINE["choices"][0], CHAT_INLINE["usage"])
    assert plain.answer.startswith("<think>") and plain.reasoning is None


def test_unterminated_reasoning_cut_at_length_has_an_empty_answer():
    for resp in (CHAT_UNTERMINATED, CHAT_PARSER_CUT_IN_REASONING):
        r = parse_choice(resp["choices"][0], resp["usage"], reasoning=True, stops=["\n\n"])
        assert r.answer == "" and r.reasoning == "Let me think about 6*7. It is"
        assert r.finish_reason == "length" and r.output_tokens == 256


def test_tokens_per_choice_from_token_ids_not_summed_usage():
    choices = COMPLETIONS_PLAIN["choices"]
    got = [parse_choice(c, COMPLETIONS_PLAIN["usage"], len(choices)) for c in choices]
    assert [(g.answer, g.output_tokens) for g in got] == [(" 7", 1), (" The answer is 42.", 5)]
    no_ids = {k: v for k, v in choices[0].items() if k != "token_ids"}
    assert parse_choice(no_ids, COMPLETIONS_PLAIN["usage"], 2).output_tokens is None


def _sample(doc: int, answer: str, filtered: str, flt: str, response: dict | None) -> dict:
    return {"doc_id": doc, "filter": flt, "arguments": [[f"Q{doc}", {"until": ["\n\n"]}]], "resps": [[answer]],
            "filtered_resps": [filtered], "exact_match": 0.0,
            **({"responses": [response]} if response is not None else {})}


def test_counters_count_each_generation_once_and_use_the_metric_filter():
    rec = [{"finish_reason": "length", "output_tokens": 256, "reasoning": None, "answer": "x"},
           {"finish_reason": "stop", "output_tokens": 10, "reasoning": None, "answer": ""},
           {"finish_reason": "stop", "output_tokens": 30, "reasoning": None, "answer": "The answer is 4"},
           {"finish_reason": "stop", "output_tokens": 20, "reasoning": None, "answer": "#### 5"}]
    answers = ["x", "", "The answer is 4", "#### 5"]
    strict = ["[invalid]", "[invalid]", "[invalid]", "5"]
    flexible = ["x", "[invalid]", "4", "5"]
    samples = [_sample(i, a, f, flt, r)
               for flt, outs in (("strict-match", strict), ("flexible-extract", flexible))
               for i, (a, f, r) in enumerate(zip(answers, outs, rec, strict=True))]
    c = response_counters(samples, "strict-match")
    assert (c.n, c.length, c.empty, c.unparsed, c.mean_tokens) == (4, 0.25, 0.25, 0.75, 79.0)
    assert response_counters(samples, "flexible-extract").unparsed == 0.25
    assert c.text() == "len 25% · empty 25% · invalid 75% · 79 tok"
    # results stored before responses were recorded: what the samples hold is counted, the rest is unknown
    old = [{k: v for k, v in s.items() if k != "responses"} for s in samples]
    c_old = response_counters(old, "strict-match")
    assert math.isnan(c_old.length) and math.isnan(c_old.mean_tokens) and c_old.unparsed == 0.75
    assert c_old.text() == "len — · empty 25% · invalid 75% · — tok"
    assert c.as_json()["length"] == 0.25 and c_old.as_json()["length"] is None


def test_loglikelihood_tasks_have_no_counters():
    hellaswag = [{"doc_id": 0, "filter": "none", "resps": [[[-1.5, False]], [[-0.5, True]]],
                  "filtered_resps": [[-1.5, False], [-0.5, True]], "acc": 1.0}]
    assert response_counters(hellaswag) is None


def test_metric_filter():
    assert metric_filter("exact_match,strict-match") == "strict-match"
    assert metric_filter("mean:prompt_level_strict_acc,none+inst_level_strict_acc,none") == "none"


def test_attach_responses_matches_by_context_and_text():
    rec = recording_api.ResponseRecorder()
    r1 = parse_choice(CHAT_INLINE["choices"][0], CHAT_INLINE["usage"], reasoning=True, stops=["Question:"])
    rec.add(JsonChatStr('[{"role": "user", "content": "Q0"}]'), r1)
    samples = [
        # a stored chat sample's context is the JsonChatStr written as a one-element list
        {"doc_id": 0, "arguments": [[['[{"role": "user", "content": "Q0"}]'], {}]], "resps": [[r1.answer]]},
        {"doc_id": 1, "arguments": [["Q1", {}]], "resps": [["never recorded"]]},
    ]
    assert recording_api.attach_responses(samples, rec) == 1
    assert samples[0]["responses"][0]["reasoning"] == "First, 6*7.\n\nQuestion: check."
    assert samples[0]["responses"][0]["finish_reason"] == "stop" and samples[1]["responses"] == [None]


def test_attach_responses_leaves_loglikelihood_samples_alone():
    # a loglikelihood task generates nothing: its (logprob, is_greedy) responses are neither matched nor counted
    samples = [{"doc_id": 0, "arguments": [["ctx", " a"], ["ctx", " b"]], "resps": [[[-1.5, False]], [[-0.5, True]]]}]
    assert recording_api.attach_responses(samples, recording_api.ResponseRecorder()) == 0
    assert "responses" not in samples[0]


# ---------------------------------------------------------------- through lm-eval's own request code


class _Recorded(BaseHTTPRequestHandler):
    """Answers every chat request with the recorded inline-reasoning response; keeps the payloads it got."""

    payloads: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).payloads.append(body)
        if "prompt" in body:  # /v1/completions: one choice per prompt, in reverse order (index says which)
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            resp = {"choices": [{"index": i, "text": f" answer to {p}", "finish_reason": "stop",
                                 **({"token_ids": list(range(i + 2))} if body.get("return_token_ids") else {})}
                                for i, p in reversed(list(enumerate(prompts)))],
                    "usage": {"completion_tokens": 99}}
        else:
            prompt = body["messages"][-1]["content"]
            resp = CHAT_INLINE if prompt == "Q0" else CHAT_UNTERMINATED
        data = json.dumps(resp).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorded_server():
    _Recorded.payloads = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("concurrent", [1, 2], ids=["sequential", "concurrent"])
def test_chat_model_holds_back_stops_and_records_reasoning(recorded_server, concurrent):
    """lm-eval's generate_until, sequential and concurrent (asyncio) paths: the stop strings are not sent, the
    answer lm-eval scores has no reasoning and is cut at the stop strings, and each generation's finish_reason,
    tokens and reasoning reach the recorder keyed by its context."""
    from lm_eval.api.instance import Instance

    lm = recording_api.RecordingChatCompletion(
        base_url=recorded_server, model="m", num_concurrent=concurrent, max_retries=1, reasoning=True)
    contexts = [JsonChatStr(json.dumps([{"role": "user", "content": q}])) for q in ("Q0", "Q1")]
    requests = [Instance("generate_until", {}, (c, {"until": ["Question:", "\n\n"], "max_gen_toks": 256}), i)
                for i, c in enumerate(contexts)]
    with recording_api.recording() as rec:
        answers = lm.generate_until(requests)
    assert answers == ["The answer is 42.", ""]
    assert _Recorded.payloads and all("stop" not in p for p in _Recorded.payloads)
    got = {k: [r.as_json() for r in v] for k, v in rec.by_context.items()}
    assert got[contexts[0].prompt][0]["reasoning"] == "First, 6*7.\n\nQuestion: check."
    assert got[contexts[1].prompt][0] == {"answer": "", "reasoning": "Let me think about 6*7. It is",
                                          "finish_reason": "length", "output_tokens": 256}


def test_chat_model_without_reasoning_sends_stops_and_scores_the_text(recorded_server):
    from lm_eval.api.instance import Instance

    lm = recording_api.RecordingChatCompletion(base_url=recorded_server, model="m", num_concurrent=2, max_retries=1)
    ctx = JsonChatStr(json.dumps([{"role": "user", "content": "Q0"}]))
    with recording_api.recording() as rec:
        answers = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": ["Question:"]}), 0)])
    assert answers == [CHAT_INLINE["choices"][0]["message"]["content"]]  # as lm-eval's own class returns it
    assert _Recorded.payloads[0]["stop"] == ["Question:"]
    assert rec.by_context[ctx.prompt][0].finish_reason == "stop"


def test_completions_model_records_each_prompt_of_a_batched_request(recorded_server):
    """Two prompts in one /v1/completions request: answers and records follow each choice's index, and the
    tokens come from the token ids asked for (usage sums over the request)."""
    from lm_eval.api.instance import Instance

    url = recorded_server.replace("/chat/completions", "/completions")
    lm = recording_api.RecordingCompletionsAPI(base_url=url, model="m", tokenizer_backend=None,
                                               tokenized_requests=False, batch_size=2, max_retries=1)
    requests = [Instance("generate_until", {}, (q, {"until": ["\n"]}), i) for i, q in enumerate(["Q long", "Q1"])]
    with recording_api.recording() as rec:
        answers = lm.generate_until(requests)
    assert answers == [" answer to Q long", " answer to Q1"]
    assert _Recorded.payloads[0]["return_token_ids"] is True and _Recorded.payloads[0]["stop"] == ["\n"]
    assert rec.by_context["Q long"][0].output_tokens == 2 and rec.by_context["Q1"][0].output_tokens == 3

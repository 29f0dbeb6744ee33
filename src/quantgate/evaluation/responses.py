"""What the server answered, per request: reasoning split from the answer, and the response counters.

Plain functions over recorded OpenAI-compatible response choices (vLLM's /v1/completions and
/v1/chat/completions) and over lm-eval's per-item samples; the lm-eval model classes that record them are in
quantgate.evaluation.recording_api.

Reasoning (thinking models). Under `--reasoning-parser`, vLLM returns the reasoning in the message's
`reasoning` field (vLLM 0.31, vllm/entrypoints/openai/chat_completion/protocol.py `ChatMessage.reasoning`;
older vLLM and other servers call it `reasoning_content`) and the answer in `content`. Without a parser (and
always on /v1/completions) the reasoning is inline: `<think>...</think>answer`, or only `...</think>answer`
where the chat template opened the tag in the prompt (DeepSeek-R1). Scoring sees only the answer.

Stop strings. vLLM applies `stop` to the whole generated text, reasoning included (its detokenizer knows no
reasoning boundary), so a task's stop string such as "\\n\\n" or "Question:" would cut a thinking model in
the middle of its reasoning. With `reasoning: true` the stop strings are therefore not sent; they are applied
here to the answer after the reasoning is split off (`cut_at_stop`), as lm-eval does for its own
`think_end_token` (lm_eval/models/utils.py `postprocess_generated_text`). The cost: a model that keeps
writing after its answer runs to max_gen_toks, which the `length` counter shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# What lm-eval's GSM8K regex filters write when they find no answer (lm_eval/filters/extraction.py,
# RegexFilter.fallback).
UNPARSED = "[invalid]"
# What lm-eval writes for a null content (lm_eval/models/api_models.py LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER):
# a reasoning model whose answer never came. Counted as empty.
NONE_PLACEHOLDER = "LMEVAL_MODEL_NONE_ANSWER_PLACEHOLDER"


def split_reasoning(
    text: str | None,
    reasoning: str | None = None,
    tags: tuple[str, str] = ("<think>", "</think>"),
) -> tuple[str, str | None]:
    """(answer, reasoning) of one generated text.

    `reasoning` is the server's separate reasoning field, when it sent one: then `text` is the answer as is.
    Otherwise inline tags are split off: the answer is what follows the last end tag (leading whitespace
    dropped), the reasoning what precedes it (without its start tag). A text that opens the start tag and never
    closes it (cut at max_gen_toks while thinking) is all reasoning, with an empty answer. A text with no tags
    is all answer. Returns reasoning None when there was none.
    """
    text = text or ""
    if reasoning is not None:
        return text, reasoning
    start, end = tags
    if end in text:
        head, _, answer = text.rpartition(end)
        head = head.lstrip()
        return answer.lstrip(), head.removeprefix(start).strip()
    if text.lstrip().startswith(start):
        return "", text.lstrip().removeprefix(start).strip()
    return text, None


def cut_at_stop(answer: str, stops: Sequence[str] | str | None) -> str:
    """`answer` cut before the first occurrence of any stop string (what the server does with `stop`)."""
    if not stops:
        return answer
    for stop in [stops] if isinstance(stops, str) else stops:
        if stop:
            answer = answer.split(stop, 1)[0]
    return answer


def server_reasoning(choice: dict[str, Any]) -> str | None:
    """The reasoning a server returned beside the answer in one response choice, or None."""
    message = choice.get("message") or {}
    for field in ("reasoning", "reasoning_content"):
        for where in (message, choice):
            value = where.get(field)
            if isinstance(value, str):
                return value
    return None


def choice_text(choice: dict[str, Any]) -> str | None:
    """The generated text of one choice: `text` (completions) or `message.content` (chat); None for null."""
    if "message" in choice:
        return (choice.get("message") or {}).get("content")
    return choice.get("text")


def choice_tokens(choice: dict[str, Any], usage: dict[str, Any] | None, n_choices: int) -> int | None:
    """Output tokens of one choice: its `token_ids` when the server returned them, else the response's
    `usage.completion_tokens` when the response holds this choice alone (usage sums over choices), else None."""
    if isinstance(choice.get("token_ids"), list):
        return len(choice["token_ids"])
    if n_choices == 1 and usage and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"])
    return None


@dataclass(frozen=True)
class Response:
    """One generation as recorded: what was scored and what the server said about it."""

    answer: str  # what lm-eval scored: reasoning removed, stop strings applied
    reasoning: str | None
    finish_reason: str | None  # "stop" | "length" | ... as the server sent it
    output_tokens: int | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_choice(
    choice: dict[str, Any],
    usage: dict[str, Any] | None = None,
    n_choices: int = 1,
    *,
    reasoning: bool = False,
    stops: Sequence[str] | str | None = None,
    tags: tuple[str, str] = ("<think>", "</think>"),
) -> Response:
    """One response choice as a Response. The server's reasoning field is always split off (content is the
    answer); inline tags and client-side `stops` only with `reasoning` (a thinking model, Chat.reasoning)."""
    text = choice_text(choice)
    sep = server_reasoning(choice)
    if reasoning:
        answer, thought = split_reasoning(text, sep, tags)
        # the whitespace between reasoning and answer (vLLM's parser leaves "\n\n" at the start of content)
        # separates, it does not answer; left there, a "\n\n" stop string would empty every answer
        answer = cut_at_stop(answer.lstrip() if thought is not None else answer, stops)
    else:
        answer, thought = text or "", sep
    return Response(answer, thought, choice.get("finish_reason"), choice_tokens(choice, usage, n_choices))


@dataclass(frozen=True)
class ResponseCounters:
    """Shares of one result's responses (fractions of generations) and the mean output length.

    `length`: finish_reason "length", cut at max_gen_toks; `empty`: nothing to score after stripping;
    `unparsed`: the task's filter found no answer (GSM8K's "[invalid]"); `mean_tokens`: mean output tokens,
    reasoning included. A share is NaN when nothing recorded it (results stored before the recording model).
    """

    n: int
    length: float
    empty: float
    unparsed: float
    mean_tokens: float

    def text(self) -> str:
        def pct(x: float) -> str:
            return "—" if math.isnan(x) else f"{100 * x:.0f}%"

        tok = "—" if math.isnan(self.mean_tokens) else f"{self.mean_tokens:.0f}"
        return f"len {pct(self.length)} · empty {pct(self.empty)} · invalid {pct(self.unparsed)} · {tok} tok"

    def as_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _first(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


def first_response(sample: dict[str, Any]) -> Any:
    """The first response of a logged sample: a str for a generative task, a (logprob, is_greedy) pair for a
    loglikelihood one, None for a sample without responses."""
    return _first(sample.get("resps"))


def generation_texts(sample: dict[str, Any]) -> list[str]:
    """Every generation of one logged sample, in order: `resps` is one list per request, holding the request's
    generations (several with lm-eval's `repeats`)."""
    out: list[str] = []
    for per_request in sample.get("resps") or []:
        for r in per_request if isinstance(per_request, list) else [per_request]:
            out.append(str(_first(r)) if _first(r) is not None else "")
    return out


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else float("nan")


def response_counters(samples: list[dict[str, Any]], filter_name: str | None = None) -> ResponseCounters | None:
    """Counters over one result's per-item samples (lm-eval's logged samples, as stored), or None for a task
    that generates nothing (loglikelihood tasks: their responses are log-probabilities, not text).

    One lm-eval sample is logged per (item, filter) with the same responses; generations are counted once per
    item, from the rows of `filter_name` (default: the first filter seen), whose `filtered_resps` decide
    `unparsed` (a share of filtered answers, one per request). A sample's `responses`
    (quantgate.evaluation.recording_api.attach_responses), one per generation in `resps` order, carries
    finish_reason, output tokens and reasoning; without it those counters are NaN.
    """
    gen = [s for s in samples if isinstance(first_response(s), str)]
    if not gen:
        return None
    filter_name = filter_name if any(s.get("filter") == filter_name for s in gen) else gen[0].get("filter")
    rows = [s for s in gen if s.get("filter") == filter_name]
    answers: list[str] = []
    filtered: list[Any] = []
    recorded: list[dict[str, Any] | None] = []
    for s in rows:
        generations = generation_texts(s)
        answers += generations
        filtered += [_first(f) for f in s.get("filtered_resps") or []]
        records = s.get("responses")
        recorded += records if isinstance(records, list) and len(records) == len(generations) else \
            [None] * len(generations)
    n = len(answers)
    have = [r for r in recorded if r is not None]
    length = _mean(float(r.get("finish_reason") == "length") for r in have) if len(have) == n else float("nan")
    tokens = [r["output_tokens"] for r in have if isinstance(r.get("output_tokens"), int)]
    empty = sum(1 for a in answers if not a.strip() or a == NONE_PLACEHOLDER) / n
    unparsed = _mean(float(isinstance(f, str) and f.strip() == UNPARSED) for f in filtered)
    return ResponseCounters(n, length, empty, unparsed, _mean(tokens) if len(tokens) == n else float("nan"))


def metric_filter(metric_key: str) -> str:
    """The lm-eval filter of a metric key ('metric,filter'; a derived 'mean:a,f+b,g' gives its first part's)."""
    first = metric_key.removeprefix("mean:").split("+")[0]
    return first.partition(",")[2] or "none"

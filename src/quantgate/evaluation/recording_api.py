"""lm-eval API models that record what the server said about each generation, and split off reasoning.

lm-eval's `local-completions` / `local-chat-completions` keep only the generated text in their samples: the
response's `finish_reason`, its token count and a chat message's `reasoning` are dropped in
`parse_generations` (lm_eval/models/openai_completions.py). The two classes here are registered under their
own names (`quantgate-completions`, `quantgate-chat-completions`) and subclass those, changing nothing in what
is sent except, for a thinking model (`reasoning=True`), the `stop` field, which is applied to the answer on
the client instead (quantgate.evaluation.responses explains why). Their `parse_generations` returns what
lm-eval scores (the answer) and records one `Response` per generation in the active `recording()`, keyed by
the request's context string; `attach_responses` then adds them to lm-eval's logged samples as `responses`.

lm-eval calls `parse_generations` with the contexts on its sequential path but not on its concurrent one
(`TemplateAPI.amodel_call` passes only `outputs`), so the concurrent path's contexts and the stop strings of
the request travel in context variables, which asyncio copies into each request's task.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

from quantgate.evaluation.lmeval_overhead import BatchedTokenization
from quantgate.evaluation.responses import (
    NONE_PLACEHOLDER,
    Response,
    first_response,
    generation_texts,
    parse_choice,
)

COMPLETIONS = "quantgate-completions"
CHAT_COMPLETIONS = "quantgate-chat-completions"

_contexts: ContextVar[list[Any] | None] = ContextVar("quantgate_request_contexts", default=None)
_stops: ContextVar[list[str] | None] = ContextVar("quantgate_request_stops", default=None)


class ResponseRecorder:
    """Responses of one evaluation, by context string; filled from lm-eval's request tasks (hence the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_context: dict[str, list[Response]] = defaultdict(list)
        self.unkeyed = 0  # responses whose request context was not known (counted, never matched)

    def add(self, context: Any, response: Response) -> None:
        with self._lock:
            if context is None:
                self.unkeyed += 1
            else:
                self.by_context[context_key(context)].append(response)


_active: ResponseRecorder | None = None
_active_lock = threading.Lock()


@contextmanager
def recording() -> Iterator[ResponseRecorder]:
    """Record every generation the quantgate API models parse while the block runs (one evaluation at a time)."""
    global _active
    recorder = ResponseRecorder()
    with _active_lock:
        if _active is not None:
            raise RuntimeError("a response recording is already active in this process")
        _active = recorder
    try:
        yield recorder
    finally:
        with _active_lock:
            _active = None


def context_key(context: Any) -> str:
    """A request's context as a string: lm-eval's str prompt, a chat request's JSON (JsonChatStr.prompt), or a
    stored sample's serialized form of either (a JsonChatStr is written as a one-element list)."""
    if hasattr(context, "prompt"):
        return str(context.prompt)
    if isinstance(context, (list, tuple)) and len(context) == 1 and isinstance(context[0], str):
        return context[0]
    return str(context)


def attach_responses(samples: list[dict[str, Any]], recorder: ResponseRecorder) -> int:
    """Add `responses` (one Response as JSON per generation, in `resps` order, None where unmatched) to each
    generative sample, matching by context and generated text. Returns how many generations went unmatched."""
    unmatched = 0
    for sample in samples:
        # a loglikelihood task's responses are (logprob, is_greedy) pairs: nothing was generated or recorded
        if not isinstance(first_response(sample), str):
            continue
        generations = generation_texts(sample)
        if not generations:
            continue
        out: list[dict[str, Any] | None] = []
        for args, per_request in zip(sample.get("arguments") or [], sample.get("resps") or [], strict=False):
            context = args[0] if isinstance(args, (list, tuple)) and args else args
            candidates = list(recorder.by_context.get(context_key(context), []))
            texts = per_request if isinstance(per_request, list) else [per_request]
            for text in texts:
                hit = next((r for r in candidates if r.answer == text or (text == NONE_PLACEHOLDER and not r.answer)),
                           None)
                if hit is None:
                    unmatched += 1
                    out.append(None)
                else:
                    candidates.remove(hit)
                    out.append(hit.as_json())
        sample["responses"] = out
    return unmatched


class _Recording:
    """What both API models share, placed before lm-eval's class in their bases (so `super()` reaches it): the
    stop field held back for a thinking model, the request contexts kept for the concurrent path, and recorded
    parsing."""

    reasoning: bool
    think_tags: tuple[str, str]

    def __init__(self, *args: Any, reasoning: bool | str = False, think_start: str = "<think>",
                 think_end: str = "</think>", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # lm-eval passes model_args given as a string as strings; quantgate passes a dict, but accept both
        self.reasoning = reasoning is True or str(reasoning).lower() == "true"
        self.think_tags = (think_start, think_end)

    def _create_payload(self, messages: Any, generate: bool = False, gen_kwargs: dict | None = None,
                        seed: int = 1234, eos: Any = None, **kwargs: Any) -> dict:
        payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos,
                                          **kwargs)
        return self._hold_stops(payload, generate)

    async def amodel_call(self, session: Any, sem: Any, messages: Any, *, generate: bool = True,
                          cache_keys: list | None = None, **kwargs: Any) -> Any:
        _contexts.set([k[0] for k in cache_keys] if cache_keys else None)
        return await super().amodel_call(session, sem, messages, generate=generate, cache_keys=cache_keys, **kwargs)

    def parse_generations(self, outputs: Any, contexts: Any = None, **kwargs: Any) -> list[str | None]:
        return self._parse(outputs, contexts)

    def _hold_stops(self, payload: dict[str, Any], generate: bool) -> dict[str, Any]:
        if generate and self.reasoning:
            stop = payload.pop("stop", None)
            _stops.set([stop] if isinstance(stop, str) else list(stop or []))
        else:
            _stops.set(None)
        prompts = payload.get("prompt")
        # lm-eval hands a batch of text prompts as a tuple, a batch of token ids as a list of lists
        if generate and isinstance(prompts, (list, tuple)) and len(prompts) > 1 and not isinstance(prompts[0], int):
            # several prompts in one request: usage sums over them, so ask vLLM for each choice's token ids
            payload["return_token_ids"] = True
        return payload

    def _parse(self, outputs: Any, contexts: Any) -> list[str | None]:
        contexts = list(contexts) if contexts is not None else (_contexts.get() or [])
        stops = _stops.get()
        answers: list[str | None] = []
        for out in outputs if isinstance(outputs, list) else [outputs]:
            choices = sorted(out.get("choices") or [], key=lambda c: c.get("index", 0))
            for choice in choices:
                response = parse_choice(choice, out.get("usage"), len(choices), reasoning=self.reasoning,
                                        stops=stops, tags=self.think_tags)
                i = len(answers)
                raw = choice.get("text") if "message" not in choice else (choice.get("message") or {}).get("content")
                # a null content stays None, as lm-eval's own classes return it, unless reasoning was split off
                answers.append(None if raw is None and not self.reasoning else response.answer)
                if _active is not None:
                    _active.add(contexts[i] if i < len(contexts) else None, response)
        return answers


@register_model(COMPLETIONS)
class RecordingCompletionsAPI(_Recording, BatchedTokenization, LocalCompletionsAPI):
    """lm-eval's `local-completions`, recording finish_reason, output tokens and reasoning per generation; its
    strings are tokenized in batches, each once (quantgate.evaluation.lmeval_overhead)."""


@register_model(CHAT_COMPLETIONS)
class RecordingChatCompletion(_Recording, LocalChatCompletion):
    """lm-eval's `local-chat-completions`, recording as RecordingCompletionsAPI does; the server's `reasoning`
    field (vLLM --reasoning-parser) is recorded, never scored."""

"""lm-eval's per-request client work, removed where it repeats itself (issue 14: the GPU idles while it runs).

Measured with benchmarks/client_cost.py (quantgate's `run_task` against a stub server that answers at once,
so every second is the client's), lm-eval 0.4.13, the full hellaswag (10,042 items, 40,168 loglikelihood
requests): 24 s before the first request and 21 s after the last on 2 CPU cores. Three causes, each removed
here without changing a request or a score:

1. **Templates compiled per call.** `lm_eval.utils.apply_template` calls jinja2's `Environment.from_string`
   on every `doc_to_text` / `doc_to_target` / `doc_to_choice`: a fresh parse and Python `compile` per document
   (40,170 compiles, ~19 s, for hellaswag; ~18 s of gsm8k's six 400-item repeats). `templates_compiled_once`
   keeps one compiled `Template` per template string, from lm-eval's own `env` (same filters, same
   `StrictUndefined`), for the duration of an evaluation; rendering is unchanged.
2. **Strings tokenized one call at a time, and again per repeat.** `TemplateLM.loglikelihood` encodes every
   (context + continuation) and every context separately (80,336 tokenizer calls, ~12 s; hellaswag's four
   endings share one context), and a task run k times (`repeats`) tokenizes the same prompts k times.
   `BatchedTokenization` encodes the distinct strings in one batched call of the same tokenizer with the
   same arguments, then lets lm-eval's own `_encode_pair` run on them, so the token ids are the ones lm-eval
   would have made (tests/selftest/test_lmeval_overhead.py compares the requests).
3. **Image hashing over text samples.** After the last response, lm-eval's `evaluate` walks every logged
   sample through `hash_dict_images` (replacing bytes and PIL images by hashes) whenever the model class
   declares `MULTIMODAL`, which lm-eval's API base class does (~3.4 s for hellaswag). quantgate's API models
   send text or token ids only, so `text_samples_not_image_hashed` turns lm-eval's own switch for it
   (`LMEVAL_HASHMM`, lm_eval/defaults.py) off while an evaluation runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any


@contextmanager
def templates_compiled_once() -> Iterator[None]:
    """Within the block, lm-eval's `apply_template` compiles each distinct template string once (see above)."""
    import lm_eval.utils as lm_utils

    original = lm_utils.apply_template
    compiled: dict[str, Any] = {}

    def apply_template(template: str, doc: dict) -> str:
        t = compiled.get(template)
        if t is None:
            t = compiled[template] = lm_utils.env.from_string(template)
        return t.render(**doc)

    lm_utils.apply_template = apply_template
    try:
        yield
    finally:
        lm_utils.apply_template = original


@contextmanager
def text_samples_not_image_hashed() -> Iterator[None]:
    """Within the block, lm-eval's `evaluate` does not run `hash_dict_images` over the logged samples: quantgate's
    models send no images, so it would return the samples unchanged (see above)."""
    import lm_eval.evaluator as lm_evaluator

    original = lm_evaluator.LMEVAL_HASHMM
    lm_evaluator.LMEVAL_HASHMM = False
    try:
        yield
    finally:
        lm_evaluator.LMEVAL_HASHMM = original


# (id(tokenizer), add_special_tokens) -> (the tokenizer, held so that its id is not reused, {string: ids})
_token_ids: ContextVar[dict[tuple[int, bool], tuple[Any, dict[str, list[int]]]] | None] = ContextVar(
    "quantgate_token_ids", default=None)


@contextmanager
def token_ids_reused(memo: dict[Any, Any] | None = None) -> Iterator[None]:
    """Within the block, `BatchedTokenization` keeps every string's token ids per tokenizer (by identity, as
    lmeval_runner.tokenizers_reused shares one per identical files) and add-special-tokens flag. Pass the
    same `memo` (an empty dict at first) to several blocks to share it: the k repeats of a task tokenize
    their prompts once."""
    token = _token_ids.set({} if memo is None else memo)
    try:
        yield
    finally:
        _token_ids.reset(token)


class BatchedTokenization:
    """Mixin for lm-eval's TemplateAPI (place it before the lm-eval class): strings are tokenized in batches and
    each distinct string once.

    - `loglikelihood` encodes its distinct strings (every context + continuation, every context without its
      trailing spaces: what TemplateLM._encode_pair encodes) in one batched call, then runs lm-eval's own
      `loglikelihood`, whose `tok_encode` calls are answered from that batch;
    - `tok_encode` answers a str or a list of str from the strings already encoded with the same tokenizer and
      flag (all of them within `token_ids_reused`, else this call's batch) and encodes the rest in one call.

    Only calls with lm-eval's default arguments (no truncation, no left truncation) are answered so; any other
    call, tokenizer backend or model kind runs lm-eval's code unchanged. The ids are the tokenizer's own: a
    fast tokenizer encodes a batch string by string (tests/selftest/test_lmeval_overhead.py compares them).
    """

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if getattr(self, "tokenizer_backend", None) != "huggingface":
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)  # type: ignore[misc]
        strings: dict[str, None] = {}  # insertion-ordered set
        for req in requests:
            context, continuation = req.args
            if context == "":
                strings[continuation] = None
            else:
                strings[context + continuation] = None
                strings[context.rstrip()] = None
        with _batch_scope():
            self.tok_encode(list(strings))  # fills the memo in one batched call
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)  # type: ignore[misc]

    def tok_encode(self, string: Any, left_truncate_len: int | None = None, add_special_tokens: bool = False,
                   truncation: bool = False, **kwargs: Any) -> Any:
        # lm-eval's own tok_encode turns add_special_tokens=False into add_bos_token
        add = bool(add_special_tokens or self.add_bos_token)  # type: ignore[attr-defined]
        memo_all = _token_ids.get()
        texts = [string] if isinstance(string, str) else string
        plain = (memo_all is not None and left_truncate_len is None and not truncation and not kwargs
                 and getattr(self, "tokenizer_backend", None) == "huggingface"
                 and isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts))
        if not plain:
            return super().tok_encode(  # type: ignore[misc]
                string, left_truncate_len=left_truncate_len, add_special_tokens=add_special_tokens,
                truncation=truncation, **kwargs)
        tokenizer = self.tokenizer  # type: ignore[attr-defined]
        memo = memo_all.setdefault((id(tokenizer), add), (tokenizer, {}))[1]
        missing = list(dict.fromkeys(t for t in texts if t not in memo))
        if missing:
            ids = super().tok_encode(missing, add_special_tokens=add)  # type: ignore[misc]
            memo.update(zip(missing, ids, strict=True))
        out = [list(memo[t]) for t in texts]
        return out[0] if isinstance(string, str) else out


@contextmanager
def _batch_scope() -> Iterator[None]:
    """A memo for one loglikelihood call when no `token_ids_reused` block is active."""
    if _token_ids.get() is not None:
        yield
        return
    with token_ids_reused():
        yield

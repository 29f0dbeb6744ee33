"""quantgate.evaluation.lmeval_overhead: lm-eval's client work done once, with the same requests and renderings."""

from __future__ import annotations

from pathlib import Path

import jinja2
import lm_eval.evaluator as lm_evaluator
import lm_eval.utils as lm_utils
import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI

from quantgate.evaluation import lmeval_overhead
from quantgate.evaluation.recording_api import RecordingCompletionsAPI

CORPUS = [
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "A woman is outside with a bucket and a dog. The dog is running around trying to avoid a bath.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Question: How many clips did Natalia sell altogether in April and May?\nAnswer:",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real byte-level BPE tokenizer, trained here on a few sentences and saved as a Hugging Face fast
    tokenizer (what lm-eval's huggingface backend loads with AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(
        path)
    return path


def _model(cls: type, tokenizer_dir: Path, **kwargs: object) -> object:
    return cls(base_url="http://127.0.0.1:9/v1/completions", model="m", tokenizer=str(tokenizer_dir),
               tokenizer_backend="huggingface", tokenized_requests=True, max_length=2048, **kwargs)


def _requests(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


PAIRS = [
    ("A man is sitting on a roof.", " He starts pulling up roofing."),
    ("A man is sitting on a roof.", " The dog is running."),   # a shared context, as hellaswag's four endings
    ("A woman is outside with a bucket and a dog. ", "The dog is running around."),  # a trailing space moves
    ("Question: How many clips?\nAnswer:  ", "72"),           # two trailing spaces
    ("", "Natalia sold clips."),                               # an empty context: the prefix token
]


@pytest.mark.parametrize("add_bos", [False, True])
def test_loglikelihood_requests_are_lm_evals_own(tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                 add_bos: bool) -> None:
    seen: dict[str, list] = {}

    def capture(name: str):  # noqa: ANN202
        def _loglikelihood_tokens(self, requests, **kwargs):  # noqa: ANN001, ANN202, ARG001
            seen[name] = requests
            return [(0.0, True)] * len(requests)
        return _loglikelihood_tokens

    plain = _model(LocalCompletionsAPI, tokenizer_dir, add_bos_token=add_bos)
    ours = _model(RecordingCompletionsAPI, tokenizer_dir, add_bos_token=add_bos)
    monkeypatch.setattr(LocalCompletionsAPI, "_loglikelihood_tokens", capture("plain"))
    plain.loglikelihood(_requests(PAIRS), disable_tqdm=True)
    calls: list[int] = []
    original = type(ours.tokenizer).__call__

    def counting(tok, text, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(len(text) if isinstance(text, list) else 1)
        return original(tok, text, *args, **kwargs)

    monkeypatch.setattr(type(ours.tokenizer), "__call__", counting)
    monkeypatch.setattr(LocalCompletionsAPI, "_loglikelihood_tokens", capture("ours"))
    ours.loglikelihood(_requests(PAIRS), disable_tqdm=True)
    assert seen["ours"] == seen["plain"]
    # one batched call over the distinct strings: 4 distinct wholes, 3 distinct stripped contexts, 1 continuation
    assert calls == [8]


def test_prompts_tokenized_once_across_blocks_sharing_a_memo(tokenizer_dir: Path) -> None:
    plain = _model(LocalCompletionsAPI, tokenizer_dir)
    ours = _model(RecordingCompletionsAPI, tokenizer_dir)
    prompts = tuple(CORPUS)
    memo: dict = {}
    with lmeval_overhead.token_ids_reused(memo):
        first = ours.tok_encode(prompts, add_special_tokens=False)
    with lmeval_overhead.token_ids_reused(memo):
        again = ours.tok_encode(list(prompts[:2]) + ["an unseen prompt"], add_special_tokens=False)
    assert first == plain.tok_encode(prompts, add_special_tokens=False)
    assert again == plain.tok_encode(list(prompts[:2]) + ["an unseen prompt"], add_special_tokens=False)
    (_, by_text), = memo.values()
    assert set(by_text) == {*prompts, "an unseen prompt"}
    # outside a block, and with truncation, lm-eval's own tok_encode answers
    assert ours.tok_encode(CORPUS[0], left_truncate_len=3) == plain.tok_encode(CORPUS[0], left_truncate_len=3)
    assert ours.tok_encode(CORPUS[0]) == plain.tok_encode(CORPUS[0])


def test_templates_compiled_once_render_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    compiles: list[str] = []
    original = lm_utils.env.from_string

    def counting(source, *args, **kwargs):  # noqa: ANN001, ANN202
        compiles.append(source)
        return original(source, *args, **kwargs)

    monkeypatch.setattr(lm_utils.env, "from_string", counting)
    template = "{{question}}\nAnswer: {{answer | regex_replace('#### ', '')}}"
    docs = [{"question": f"Q{i}", "answer": f"#### {i}"} for i in range(5)]
    expected = [lm_utils.apply_template(template, d) for d in docs]
    assert len(compiles) == 5
    with lmeval_overhead.templates_compiled_once():
        got = [lm_utils.apply_template(template, d) for d in docs]
        with pytest.raises(jinja2.UndefinedError):  # lm-eval's StrictUndefined still applies
            lm_utils.apply_template("{{missing}}", {})
    assert got == expected and len(compiles) == 5 + 2
    assert lm_utils.apply_template is not None and lm_utils.apply_template.__module__ == "lm_eval.utils"


def test_image_hashing_switched_off_only_within_the_block() -> None:
    before = lm_evaluator.LMEVAL_HASHMM
    with lmeval_overhead.text_samples_not_image_hashed():
        assert lm_evaluator.LMEVAL_HASHMM is False
    assert lm_evaluator.LMEVAL_HASHMM == before

"""Serve-flag spelling as vLLM's FlexibleArgumentParser reads it (engines/serve_flags.py): pure functions."""

import pytest

from quantgate.engines.serve_flags import flag_name, owned_flag_overrides, repeated, setting_name


@pytest.mark.parametrize(("arg", "name"), [
    ("--max-num-seqs", "--max-num-seqs"),
    ("--max_num_seqs", "--max-num-seqs"),
    ("--max_num_seqs=8", "--max-num-seqs"),
    ("--api_server_count", "--api-server-count"),
    ("-asc", "--api-server-count"),
    ("-asc=2", "--api-server-count"),
    ("-tp", "--tensor-parallel-size"),
    ("--no-enable-prefix-caching", "--no-enable-prefix-caching"),
    ("8", None),
    ("-1", None),
    ("bfloat16", None),
])
def test_flag_name_follows_vllms_spellings(arg, name):
    assert flag_name(arg) == name


def test_a_negation_is_the_same_setting():
    assert setting_name("--no-enable-prefix-caching") == setting_name("--enable_prefix_caching") \
        == "--enable-prefix-caching"
    assert setting_name("4096") is None


def test_repeated_and_owned_compare_normalised_names():
    assert repeated(["--max-num-seqs", "8", "--max_num_seqs=16"]) == ["--max-num-seqs"]
    assert repeated(["--enable-chunked-prefill", "--no-enable-chunked-prefill", "--dtype", "half"]) \
        == ["--enable-chunked-prefill"]
    assert repeated(["--max-num-seqs", "8", "--max-num-batched-tokens", "8"]) == []
    assert owned_flag_overrides(["--dtype", "bfloat16", "--max_model_len=4096", "-asc", "2", "--enforce-eager"]) \
        == ["--max_model_len=4096", "-asc"]

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


def test_unknown_flags_in_vllms_spellings():
    from quantgate.engines.serve_flags import unknown_flags

    known = {"--max-num-batched-tokens", "--enable-chunked-prefill", "--no-enable-chunked-prefill",
             "--compilation-config", "-O", "-tp", "--tensor-parallel-size"}
    args = ["--max_num_batched_tokens=4096", "--no-enable-chunked-prefill", "--compilation-config.level", "3",
            "-O3", "-tp", "2", "-1", "--max-num-batchd-tokens", "8", "-x", "--no-such-flag=1"]
    assert unknown_flags(args, known) == ["--max-num-batchd-tokens", "-x", "--no-such-flag=1"]
    assert unknown_flags([], known) == []


def test_check_refuses_a_misspelt_serve_arg_against_the_installed_vllm(tmp_path, monkeypatch):
    """Real vLLM: its own `vllm serve` parser (imported once per process) knows the flags the fixtures use and
    not a misspelling; `quantgate check` names the flag and the close ones."""
    from quantgate.engines.serve_flags import vllm_serve_options
    from quantgate.matrix import load_matrix
    from quantgate.matrix_checks import check_matrix

    known = vllm_serve_options()
    assert known is not None and {"--max-num-batched-tokens", "--reasoning-parser", "--api-server-count",
                                  "--no-enable-chunked-prefill", "--kv-cache-dtype"} <= known
    monkeypatch.delenv("QUANTGATE_VLLM_ARGS", raising=False)
    matrix = tmp_path / "m.yaml"
    matrix.write_text("""
models:
  - name: m
    source: {kind: local, path: /nonexistent}
    serve_args: [--max-num-batchd-tokens, "4096"]
    variants:
      - {name: bf16, format: bf16, serve_args: [--kv_cache_dtype=fp8]}
tasks:
  - {name: hellaswag, metric: acc_norm}
""")
    report = check_matrix(load_matrix(matrix), matrix, None)
    flagged = [e for e in report.errors if "vllm serve" in e]
    assert len(flagged) == 1 and "models.m.serve_args: '--max-num-batchd-tokens'" in flagged[0]
    assert "did you mean '--max-num-batched-tokens'" in flagged[0]
    monkeypatch.setenv("QUANTGATE_VLLM_ARGS", "--enforce-eagr")
    assert any(e.startswith("QUANTGATE_VLLM_ARGS: '--enforce-eagr'") for e in
               check_matrix(load_matrix(matrix), matrix, None).errors)

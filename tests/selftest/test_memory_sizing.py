"""The server's memory, sized in bytes: figures of machines seen in this project, not of the one running the test.

- A 24 GiB machine whose only NUMA node reported 9.84 GiB with 7.17 available (issue 10): the old fixed
  `--gpu-memory-utilization 0.1` asked for 0.98 GiB, less than the 1.35 GiB the worker itself held, and vLLM
  refused to start. Sized from the model, the same node serves every sequence the evaluation sends.
- The same kind of machine with a 3.6 GiB node (seen at the start of a session, before memory was added).
- A 2 GiB node: too small for the server at all, and the error says so with numbers.
- An H200 (143 GiB) for the GPU check.
"""

from __future__ import annotations

import json

import pytest

from quantgate.engines.hardware import Hardware
from quantgate.engines.memory import (
    CPU_RUNTIME_OVERHEAD_BYTES,
    GIB,
    KV_HEADROOM,
    NodeMemory,
    check_explicit_kv_bytes,
    check_gpu_fraction,
    kv_bytes_per_token,
    plan_cpu_kv_cache,
    weights_bytes_in_memory,
)
from quantgate.engines.vllm_server import memory_args, numerics_args
from quantgate.errors import ServerError

# SmolLM2-135M-Instruct's config.json (the default model), the fields the sizing reads
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
           "torch_dtype": "bfloat16"}
# Qwen3-8B: 36 layers, 8 KV heads of 128 (explicit head_dim), BF16
QWEN3_8B = {"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "hidden_size": 4096, "torch_dtype": "bfloat16"}
SMOLLM2_BF16_BYTES = 269_060_000  # model.safetensors of the converted BF16 checkpoint, about 0.27 GB

AVX2 = Hardware("cpu", "EPYC", 2, cpu_isa="avx2")
H200 = Hardware("sm90", "NVIDIA H200", 1, "570", 143.8)

NODE_10G = NodeMemory(total_bytes=int(9.84 * GIB), available_bytes=int(7.17 * GIB), where="NUMA node 0")
NODE_3G6 = NodeMemory(total_bytes=int(3.59 * GIB), available_bytes=int(3.16 * GIB), where="NUMA node 0")
NODE_2G = NodeMemory(total_bytes=2 * GIB, available_bytes=int(1.7 * GIB), where="NUMA node 0")


def test_per_token_kv_bytes_follow_vllms_page_size():
    # 2 (K, V) x 30 layers x 3 KV heads x 64 (576 / 9) x 4 bytes (FP32 compute on AVX2)
    assert kv_bytes_per_token(SMOLLM2, "float32") == 2 * 30 * 3 * 64 * 4 == 46_080
    assert kv_bytes_per_token(SMOLLM2, "bfloat16") == 23_040
    # Qwen3-8B in BF16: 144 KiB per token, the figure vLLM's own logs give for it
    assert kv_bytes_per_token(QWEN3_8B, "bfloat16") == 147_456
    assert kv_bytes_per_token({"text_config": QWEN3_8B}, "fp8") == 73_728


def test_a_config_without_the_fields_names_the_missing_one():
    with pytest.raises(ServerError, match="'num_hidden_layers'"):
        kv_bytes_per_token({"hidden_size": 8}, "float32")
    with pytest.raises(ServerError, match="kv-cache dtype 'int3'"):
        kv_bytes_per_token(SMOLLM2, "int3")


def test_weights_widen_when_served_in_a_wider_dtype():
    assert weights_bytes_in_memory(SMOLLM2, 1000, "float32") == 2000
    assert weights_bytes_in_memory(SMOLLM2, 1000, "bfloat16") == 1000


def test_the_10_gib_node_of_a_24_gib_machine_holds_every_sequence_in_flight():
    per_token = kv_bytes_per_token(SMOLLM2, "float32")
    plan = plan_cpu_kv_cache(per_token_bytes=per_token, max_model_len=2048, sequences=16,
                             weights_bytes=weights_bytes_in_memory(SMOLLM2, SMOLLM2_BF16_BYTES, "float32"),
                             node=NODE_10G)
    assert plan.sequences == 16
    assert plan.kv_bytes == int(46_080 * 2048 * 16 * KV_HEADROOM)  # 1.76 GiB, whatever the node's size
    assert plan.footprint_bytes <= NODE_10G.available_bytes
    # what the old fixed fraction asked for there: 0.1 x 9.84 GiB, less than the 1.35 GiB the worker held
    assert 0.1 * NODE_10G.total_bytes < 1.35 * GIB
    assert "16 sequence(s) x 2048 tokens" in plan.describe() and "7.17 of 9.84 GiB" in plan.describe()


def test_a_small_node_gets_fewer_sequences_and_says_the_server_queues():
    plan = plan_cpu_kv_cache(per_token_bytes=46_080, max_model_len=2048, sequences=16,
                             weights_bytes=2 * SMOLLM2_BF16_BYTES, node=NODE_3G6)
    assert 1 <= plan.sequences < 16
    assert plan.footprint_bytes <= NODE_3G6.available_bytes
    assert "queues" in plan.describe()


def test_a_2_gib_node_is_refused_before_start_with_the_numbers_and_the_settings():
    with pytest.raises(ServerError) as err:
        plan_cpu_kv_cache(per_token_bytes=46_080, max_model_len=2048, sequences=16,
                          weights_bytes=2 * SMOLLM2_BF16_BYTES, node=NODE_2G)
    msg = str(err.value)
    assert "1.70 GiB available of 2.00 GiB" in msg
    assert f"runtime {CPU_RUNTIME_OVERHEAD_BYTES / GIB:.2f}" in msg
    assert "max_model_len" in msg and "QUANTGATE_KV_CACHE_BYTES" in msg


def test_an_explicit_size_is_checked_too():
    check_explicit_kv_bytes(GIB, NODE_10G)
    with pytest.raises(ServerError, match="more than NUMA node 0 has available"):
        check_explicit_kv_bytes(8 * GIB, NODE_10G)
    with pytest.raises(ServerError, match="positive"):
        check_explicit_kv_bytes(0, NODE_10G)


def test_a_large_gpu_is_checked_against_its_free_memory():
    device = NodeMemory(total_bytes=int(143.8 * GIB), available_bytes=int(140 * GIB), where="GPU 0")
    check_gpu_fraction(0.85, device)
    busy = NodeMemory(total_bytes=int(143.8 * GIB), available_bytes=int(100 * GIB), where="GPU 0")
    with pytest.raises(ServerError) as err:
        check_gpu_fraction(0.85, busy)
    assert "100.00 GiB free of 143.80" in str(err.value) and "at most 0.69 fits now" in str(err.value)
    with pytest.raises(ServerError, match=r"\(0, 1\]"):
        check_gpu_fraction(1.5, device)


def _checkpoint(tmp_path, config=SMOLLM2, size=SMOLLM2_BF16_BYTES // 1000):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * size)
    return tmp_path


def test_cpu_servers_get_kv_cache_bytes_not_a_fraction(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTGATE_KV_CACHE_BYTES", raising=False)
    args, note = memory_args(AVX2, _checkpoint(tmp_path), max_model_len=2048, sequences=16,
                             engine_args=["--dtype", "float32"], node=NODE_10G)
    assert args == ["--kv-cache-memory-bytes", str(int(46_080 * 2048 * 16 * KV_HEADROOM))]
    assert "--gpu-memory-utilization" not in args and "NUMA node 0" in note
    # an fp8 KV cache in the variant's serve args takes a quarter of FP32
    args8, _ = memory_args(AVX2, tmp_path, max_model_len=2048, sequences=16,
                           engine_args=["--dtype", "float32", "--kv-cache-dtype", "fp8"], node=NODE_10G)
    assert int(args8[1]) * 4 == int(args[1])
    monkeypatch.setenv("QUANTGATE_KV_CACHE_BYTES", str(GIB))
    assert memory_args(AVX2, tmp_path, max_model_len=2048, sequences=16, engine_args=[],
                       node=NODE_10G)[0] == ["--kv-cache-memory-bytes", str(GIB)]
    monkeypatch.setenv("QUANTGATE_KV_CACHE_BYTES", "lots")
    with pytest.raises(ServerError, match="'lots' is not a number"):
        memory_args(AVX2, tmp_path, max_model_len=2048, sequences=16, engine_args=[], node=NODE_10G)


def test_a_checkpoint_without_config_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTGATE_KV_CACHE_BYTES", raising=False)
    with pytest.raises(ServerError, match="config.json"):
        memory_args(AVX2, tmp_path, max_model_len=2048, sequences=1, engine_args=[], node=NODE_10G)


def test_gpu_servers_keep_a_fraction_of_the_device(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTGATE_GPU_MEMORY_UTILIZATION", raising=False)
    device = NodeMemory(total_bytes=int(143.8 * GIB), available_bytes=int(140 * GIB), where="GPU 0")
    args, _ = memory_args(H200, tmp_path, max_model_len=4096, sequences=64, engine_args=[], node=device)
    assert args == ["--gpu-memory-utilization", "0.85"]


def test_memory_sizes_stay_out_of_result_keys(monkeypatch):
    monkeypatch.delenv("QUANTGATE_VLLM_ARGS", raising=False)
    monkeypatch.delenv("QUANTGATE_DTYPE", raising=False)
    assert numerics_args(AVX2, ["--kv-cache-memory-bytes", "123", "--gpu-memory-utilization=0.5", "--seed", "1"]) \
        == ["--dtype", "float32", "--generation-config", "vllm", "--enforce-eager", "--seed", "1"]


def test_kv_cache_dtype_is_read_in_every_spelling_vllm_accepts(tmp_path, monkeypatch):
    """`--kv_cache_dtype fp8` and `--kv-cache-dtype=fp8` are the same flag to vLLM's parser: the sizing must
    read them too, or it sizes an fp8 cache as a BF16 one (4x too few sequences)."""
    monkeypatch.delenv("QUANTGATE_KV_CACHE_BYTES", raising=False)
    ckpt = _checkpoint(tmp_path)
    sized = {spelling: memory_args(AVX2, ckpt, max_model_len=2048, sequences=16, node=NODE_10G,
                                   engine_args=["--dtype", "float32", *spelling])[0][1]
             for spelling in (("--kv-cache-dtype", "fp8"), ("--kv_cache_dtype", "fp8"), ("--kv-cache-dtype=fp8",),
                              ("--kv_cache_dtype=fp8",))}
    assert len(set(sized.values())) == 1
    assert int(next(iter(sized.values()))) == int(46_080 // 4 * 2048 * 16 * KV_HEADROOM)


def test_cpu_sizing_leaves_room_for_every_api_server_process(tmp_path, monkeypatch):
    """With `api_server_count: 4`, vLLM runs four more processes that each load torch and vLLM; a KV cache sized
    as for one left vLLM 0.8 GiB short at start. Each extra API server process now takes CPU_API_SERVER_BYTES
    off the KV cache when the node is the limit."""
    from quantgate.engines.memory import CPU_API_SERVER_BYTES, cpu_runtime_overhead_bytes

    monkeypatch.delenv("QUANTGATE_KV_CACHE_BYTES", raising=False)
    assert cpu_runtime_overhead_bytes(None) == cpu_runtime_overhead_bytes(1) == CPU_RUNTIME_OVERHEAD_BYTES
    assert cpu_runtime_overhead_bytes(4) == CPU_RUNTIME_OVERHEAD_BYTES + 4 * CPU_API_SERVER_BYTES
    ckpt = _checkpoint(tmp_path)
    # 1,024 sequences in flight: more than the node holds, so the node's free memory sets the size
    one, four = (int(memory_args(AVX2, ckpt, max_model_len=2048, sequences=1024, engine_args=[], node=NODE_10G,
                                 api_server_count=n)[0][1]) for n in (1, 4))
    per_sequence = int(kv_bytes_per_token(SMOLLM2, "bfloat16") * 2048 * KV_HEADROOM)
    assert 0 < one - four <= 4 * CPU_API_SERVER_BYTES + per_sequence
    assert one - four >= 4 * CPU_API_SERVER_BYTES - per_sequence

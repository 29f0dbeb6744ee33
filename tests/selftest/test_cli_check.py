"""`quantgate check` and the CLI's help: what a new user runs first (issue 11, "Bad input").

Positional matrices, Hub ids checked by huggingface_hub's own rule and against the local cache, a last line that
says when critical gates are predicted to block the run, a policy block with the matrix's own gates, and help
texts that list only the options a command takes.
"""

import textwrap
from pathlib import Path

import pytest

from quantgate import cli
from quantgate.errors import MatrixError
from quantgate.matrix import load_matrix
from quantgate.policy import DEFAULT_POLICY, Policy
from tests.selftest.synthetic_store import make_run, write_store  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]

MATRIX = """
models:
  - name: m
    source: {{kind: local, path: {ckpt}}}
    variants:
      - {{name: bf16, format: bf16}}
      - {{name: q, format: int8, builder: llmcompressor, recipe: {{scheme: W8A8}}}}
tasks:
  - {{name: hellaswag, metric: acc_norm, limit: {limit}}}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A matrix over a local checkpoint folder, the shipped thresholds, and a policy that makes hellaswag
    critical; returns a function writing the matrix with a given hellaswag limit."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"hidden_size": 576, "intermediate_size": 1536}')
    th = tmp_path / "thresholds"
    th.mkdir()
    (th / "retention.yaml").write_text((ROOT / "thresholds" / "retention.yaml").read_text())
    policy = (ROOT / "thresholds" / "policy.yaml").read_text().replace("hellaswag: supporting", "hellaswag: critical")
    (th / "policy.yaml").write_text(policy)
    (tmp_path / "no-data").mkdir()
    monkeypatch.setenv("QUANTGATE_DATA_DIR", str(tmp_path / "no-data"))

    def matrix(limit: int, name: str = "m.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(MATRIX.format(ckpt=ckpt, limit=limit)))
        return path

    matrix.thresholds = th / "retention.yaml"  # type: ignore[attr-defined]
    return matrix


def test_check_takes_matrices_positionally_and_says_when_critical_gates_will_block(project, capsys):
    small, large = project(20, "small.yaml"), project(100000, "large.yaml")
    assert cli.main(["check", str(small), str(large), "--thresholds", str(project.thresholds)]) == 0
    out = capsys.readouterr().out
    small_out, large_out = out.split(f"{large}: 1 model(s)")[0], out.split(f"{small}: 1 model(s)")[1]
    # both matrices lack the distribution section the policy's kl and top1_agreement need: MISSING
    assert "warning: policy: critical kl: this matrix has no `distribution:` section" in small_out
    assert "warning: critical gate m/q retention[hellaswag]: the plan predicts INCONCLUSIVE at this n" in small_out
    assert (f"{small}: 1 model(s), 2 variant(s), 1 task(s): valid, but critical gates are predicted to block the "
            "run: 1 INCONCLUSIVE, 2 MISSING for every quantized variant") in out
    # 100000 items resolve the floor: only the MISSING gates remain
    assert "retention[hellaswag]: the plan predicts" not in large_out
    assert f"{large}: 1 model(s), 2 variant(s), 1 task(s): valid, but critical gates are predicted to block the " \
           "run: 2 MISSING for every quantized variant" in out
    # the policy block names the matrix's gates only (not the demo's ifeval, kl, ...)
    block = small_out.split("policy at cadence commit")[1].split("\nwarning")[0]
    assert "critical   FAIL -> fail, INCONCLUSIVE -> fail; hellaswag\n" in block
    assert "ifeval" not in block and "regression[gsm8k]" not in block
    assert "policy entries name gates not in this matrix, not listed" in block
    # the shipped thresholds' ifeval floor belongs to other matrices: a note, not a warning
    assert "note: thresholds: retention.task_floors.ifeval: no task of small.yaml" in small_out
    assert "warning: thresholds: retention.task_floors" not in out


def test_check_warns_of_a_task_floor_that_looks_like_a_typo(project, capsys):
    th = project.thresholds
    th.write_text(th.read_text().replace("task_floors:", "task_floors:\n    hellaswga: {fp8: 0.97}", 1))
    assert "hellaswga" in th.read_text()
    assert cli.main(["check", str(project(20)), "--thresholds", str(th)]) == 0
    assert ("warning: thresholds: retention.task_floors.hellaswga: no task of m.yaml has that id or name (unused "
            "here; did you mean 'hellaswag'?)") in capsys.readouterr().out


def test_check_says_plainly_valid_when_nothing_is_predicted_to_block(project, tmp_path, capsys):
    policy = tmp_path / "supporting.yaml"
    policy.write_text("tiers: {hellaswag: supporting}\non_inconclusive:\n  critical: {commit: fail, nightly: fail}\n"
                      "  supporting: {commit: warn, nightly: fail}\n  advisory: {commit: warn, nightly: warn}\n")
    path = project(20)
    args = ["check", "--matrix", str(path), "--thresholds", str(project.thresholds), "--qg-policy", str(policy)]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{path}: 1 model(s), 2 variant(s), 1 task(s): valid"


def test_check_exits_3_on_any_bad_matrix_and_still_checks_the_others(project, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(project(20).read_text().replace("limit: 20", "limt: 20"))
    good = project(20, "good.yaml")
    assert cli.main(["check", str(bad), str(good), "--thresholds", str(project.thresholds)]) == 3
    captured = capsys.readouterr()
    assert f"quantgate: error: {bad}: invalid matrix\n  tasks.hellaswag.limt: unknown key 'limt'" in captured.err
    assert f"{good}: 1 model(s)" in captured.out


def test_each_command_lists_only_the_options_it_takes():
    ap = cli.build_parser()
    commands = ap._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps subparsers here

    def options(name):
        return {s for a in commands[name]._actions for s in a.option_strings}  # noqa: SLF001

    assert "--tests" in options("run") and "--tests" in options("accept")
    assert not {"--tests", "--qg-policy"} & options("report")
    assert "--tests" not in options("check") | options("plan") | options("summary")
    # report and plan read or plan the variants of a cadence (quantgate.cadence; test_cadence.py)
    assert "--qg-cadence" in options("plan") & options("report")
    assert "--qg-limit" not in options("trend") | options("init") | options("data") | options("merge")
    # every command's --help opens with what it does; trend's cadence option is named as every other command's
    assert all(parser.description for parser in commands.values())
    assert "--qg-cadence" in options("trend")
    assert cli.build_parser().parse_args(["trend", "--cadence", "nightly"]).cadence == "nightly"  # the old name
    assert cli.build_parser().parse_args(["trend", "--qg-cadence", "nightly"]).cadence == "nightly"
    assert "--cadence" not in commands["trend"].format_help().replace("--qg-cadence", "")
    for name in ("report", "summary", "check", "plan"):  # they run no pytest: nothing is passed on to it
        limit = next(a for a in commands[name]._actions if "--qg-limit" in a.option_strings)  # noqa: SLF001
        assert "pytest" not in limit.help
    assert ap.parse_args(["check", "a.yaml", "b.yaml"]).matrices == ["a.yaml", "b.yaml"]
    assert "Every command takes --qg-limit" not in ap.description


def test_policy_block_lists_only_gates_of_the_matrix():
    policy = Policy.model_validate({**DEFAULT_POLICY.model_dump(), "tiers": {
        "kl": "critical", "hellaswag": "supporting", "regression[gsm8k]": "advisory"}})
    text = policy.describe("commit", {"retention[hellaswag]", "retention[AVG]"})
    assert "kl" not in text and "gsm8k" not in text and "INCONCLUSIVE -> warn; hellaswag" in text
    assert "(2 policy entries name gates not in this matrix, not listed)" in text
    assert "kl" in policy.describe("commit")  # without a matrix: every entry


@pytest.mark.parametrize(("hub_id", "expect"), [
    ("Qwen3-0.6B-Base", "models.m.source.id: id 'Qwen3-0.6B-Base' has no namespace: write the Hub model id as "
                        "namespace/name"),
    ("Qwen/Qwen3 0.6B", "models.m.source.id: id 'Qwen/Qwen3 0.6B' is not a Hub repo id: Repo id must use "
                        "alphanumeric chars"),
    ("a/b/c", "models.m.source.id: id 'a/b/c' is not a Hub repo id: Repo id must be in the form"),
])
def test_hub_ids_are_checked_with_huggingface_hubs_rule(tmp_path, hub_id, expect):
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(MATRIX.format(ckpt="x", limit=5)).replace(
        "{kind: local, path: x}", f"{{kind: hub, id: '{hub_id}', revision: {'a' * 40}}}"))
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    assert str(err.value).splitlines()[1].startswith(f"  {expect}"), str(err.value)


def test_check_warns_when_a_hub_base_is_not_cached_and_names_close_cached_ids(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from quantgate.matrix_checks import check_matrix

    cache = tmp_path / "hf"
    (cache / "models--Qwen--Qwen3-0.6B-Base").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(MATRIX.format(ckpt="x", limit=5)).replace(
        "{kind: local, path: x}", f"{{kind: hub, id: Qwen/Qwen3-0.6B-Bsae, revision: {'a' * 40}}}"))
    report = check_matrix(load_matrix(path), path, None)
    assert report.errors == []
    assert (f"{path}: models.m.source: Qwen/Qwen3-0.6B-Bsae@{'a' * 40}: not in the local Hugging Face cache "
            f"({cache}) (did you mean 'Qwen/Qwen3-0.6B-Base'?); the id is not checked against the Hub here"
            " (the run downloads it)") in report.warnings


def test_report_without_the_checkpoint_cache_names_what_is_missing_and_fails(tmp_path, make_run, monkeypatch,  # noqa: F811
                                                                              capsys):
    """Stored results are found by their checkpoint's sha256, which a reading run takes from the checkpoint
    cache: with an empty cache, `quantgate report` writes what it can and exits 3 naming the missing checkpoints
    (it used to list them as "no stored results" and exit 0)."""
    from quantgate import runner as runner_mod
    from quantgate.checkpoints import obtain

    results = write_store(make_run(tmp_path / "results", reuse_only=False))
    monkeypatch.setattr(runner_mod, "built_checkpoint", obtain.built_checkpoint)  # the real cache lookup
    (tmp_path / "empty-cache").mkdir()
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(ROOT)
    args = ["report", "--matrix", str(tmp_path / "matrix.yaml"), "--results", str(results)]
    assert cli.main([*args, "--out", str(tmp_path / "report")]) == 3
    captured = capsys.readouterr()
    assert (tmp_path / "report" / "report.md").is_file()  # what could be reported is written
    assert (f"quantgate: error: 2 variant(s) left out of the report: their checkpoints are not in the checkpoint "
            f"cache ({tmp_path / 'empty-cache'}, QUANTGATE_CACHE)") in captured.err
    assert "  m/fp8: no cached built checkpoint" in captured.err and "  m/int8: no cached" in captured.err
    assert cli.main([*args, "--no-figures"]) == 3


@pytest.mark.parametrize(("hardware", "tier"), [
    ({"hw_class": "cpu", "cpu_isa": "avx2"}, "cpu-avx2"),
    ({"hw_class": "sm90"}, None),
])
def test_score_table_shows_the_cpu_tier_its_snapshots_are_kept_by(tmp_path, make_run, hardware, tier):  # noqa: F811
    from quantgate import verdicts
    from quantgate.engines.hardware import Hardware

    run = make_run(tmp_path / "results", reuse_only=False)
    run.hw = Hardware(name="test machine", count=1, **hardware)
    write_store(run)
    text = verdicts.score_table(run, "m", partial=True).render()
    assert f"hardware class: {hardware['hw_class']}" in text  # compared context of committed snapshots: unchanged
    if tier is None:
        assert "CPU tier" not in text
    else:
        assert f"CPU tier: {tier} (snapshots, accepted baselines and expected kernels are kept per tier)" in text
    assert "serve args" not in text  # none in this matrix
    # a model's serve_args (in every result key) are shown in the legend, not in the snapshot's compared footer
    model = run.matrix.models[0]
    served = model.model_copy(update={"serve_args": ["--max-num-seqs", "8"]})
    run.matrix = run.matrix.model_copy(update={"models": [served]})
    table = verdicts.score_table(run, "m", partial=True)
    assert "- serve args: bf16: --max-num-seqs 8;" in table.render()
    assert all("max-num-seqs" not in v for v in table.footer.values())


def test_check_predicts_supporting_gates_that_block_at_nightly(project, capsys):
    # the shipped policy: hellaswag supporting, whose INCONCLUSIVE warns at commit and fails at nightly
    th = project.thresholds
    (th.parent / "policy.yaml").write_text((ROOT / "thresholds" / "policy.yaml").read_text())
    matrix = project(20)
    assert cli.main(["check", str(matrix), "--thresholds", str(th)]) == 0
    commit = capsys.readouterr().out
    assert "supporting gate" not in commit and "supporting gates are predicted to block" not in commit
    assert cli.main(["check", str(matrix), "--thresholds", str(th), "--qg-cadence", "nightly"]) == 0
    nightly = capsys.readouterr().out
    assert ("warning: supporting gate m/q retention[hellaswag]: the plan predicts INCONCLUSIVE at this n, which "
            "fails a run at cadence nightly") in nightly
    # retention[hellaswag] and retention[AVG]; the critical distribution gates are MISSING (no distribution:)
    assert ("valid, but critical and supporting gates are predicted to block the run: 2 INCONCLUSIVE, 2 MISSING"
            in nightly)


def test_check_says_what_a_code_task_lacks_offline_and_what_to_do(project, tmp_path, monkeypatch, capsys):
    """humaneval's scorer is evaluate's `code_eval`, loaded from the Hub when lm-eval builds the task. Offline
    and not in evaluate's module cache, evaluate says the module "doesn't exist on the Hugging Face Hub"
    (it does); the warning says what is missing, where it was looked for and how to get it."""
    from evaluate import config as evaluate_config

    modules = tmp_path / "no-modules"
    monkeypatch.setattr(evaluate_config, "HF_MODULES_CACHE", modules)  # an empty module cache
    monkeypatch.setattr(evaluate_config, "HF_EVALUATE_OFFLINE", True)  # the Hub is never asked
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    path = project(20)
    path.write_text(path.read_text().replace(
        "{name: hellaswag, metric: acc_norm, limit: 20}",
        "{name: humaneval_plus, metric: 'pass@1,create_test', allow_code_execution: true, limit: 20}"))
    cli.main(["check", str(path), "--thresholds", str(project.thresholds)])
    out = capsys.readouterr().out
    assert (f"warning: {path}: tasks.humaneval_plus: lm-eval cannot load humaneval_plus in this environment "
            "(humaneval_plus: its scorer, the Hugging Face `evaluate` module 'code_eval' (evaluate.load('code_eval') "
            f"when lm-eval builds the task), is not in evaluate's module cache ({modules / 'evaluate_modules'}, "
            "HF_MODULES_CACHE) and was not fetched from the Hub (unreachable from here, or HF_EVALUATE_OFFLINE set); "
            "where the Hub is reachable, `python -c \"import evaluate; evaluate.load('code_eval')\"` caches it, or "
            "copy that folder from a machine that has it; code_eval also runs model-written code only with "
            "HF_ALLOW_CODE_EVAL=1 set where the suite runs)") in out
    assert "doesn't exist on the Hugging Face Hub" not in out


def test_a_code_task_refused_for_want_of_hf_allow_code_eval_says_so():
    """code_eval's own refusal is a banner of several lines; the check says it in one, with what to set."""
    from quantgate.evaluation.lmeval_runner import _load_failure

    banner = ValueError("\n####\n!!!WARNING!!!\n...set the environment variable HF_ALLOW_CODE_EVAL=\"1\"...\n####")
    assert _load_failure(banner) == (
        "its scorer, the Hugging Face `evaluate` module 'code_eval', runs model-written code only with "
        "HF_ALLOW_CODE_EVAL=1 in the environment (lm-eval's confirm_run_unsafe_code, the task's allow_code_execution, "
        "does not set it); set it where the suite runs, in a sandbox")
    assert _load_failure(ImportError("no module named math_verify")) == "ImportError: no module named math_verify"


@pytest.mark.parametrize("case", ["example-checkpoint", "tp2-model", "any-other-path", "relative-path"])
def test_a_missing_local_checkpoint_names_the_script_that_makes_it(tmp_path, monkeypatch, case):
    """fixtures/cpu-tasks.yaml names a checkpoint that examples/external-checkpoints/prepare.py makes, and
    fixtures/gpu-tp2.yaml the model ci/make_tp2_model.py writes to /tmp/qg-tp2-model: when it is missing, the error
    says to run that script. Any other missing folder gets the plain error, which explains the working directory
    only for a relative path."""
    from quantgate import matrix_checks
    from quantgate.matrix_checks import check_matrix

    checkout = Path(matrix_checks.__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    folder = {"example-checkpoint": str(checkout / "external-checkpoints" / "no-such-checkpoint-of-the-selftests"),
              "tp2-model": "/tmp/qg-tp2-model/no-such-checkpoint-of-the-selftests",
              "any-other-path": str(tmp_path / "no-such-checkpoint"),
              "relative-path": "no-such-checkpoint"}[case]
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(f"""
        models:
          - name: m
            source: {{kind: local, path: {tmp_path}}}
            variants:
              - {{name: bf16, format: bf16}}
              - {{name: q, format: nvfp4, source: {{kind: local, path: {folder}}}}}
        tasks:
          - {{name: hellaswag, metric: acc_norm, limit: 20}}
        """))
    errors = [e for e in check_matrix(load_matrix(path), path, None).errors if "does not exist" in e]
    relative = (f"; a relative path is read from the working directory: {tmp_path / folder}"
                if case == "relative-path" else "")
    plain = (f"{path}: models.m.variants.q.source.path: {folder!r} does not exist (a checkpoint folder is "
             f"needed{relative})")
    hint = {"example-checkpoint": (f"; the project's examples/external-checkpoints/prepare.py makes it: run `python "
                                   f"examples/external-checkpoints/prepare.py` in {checkout}"),
            "tp2-model": (f"; the project's ci/make_tp2_model.py makes it: run `python ci/make_tp2_model.py --out "
                          f"/tmp/qg-tp2-model` in {checkout}")}.get(case, "")
    assert errors == [plain + hint]

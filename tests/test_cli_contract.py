"""The CLI contract (src/stagerl/cli.py): every user mistake, in every subcommand, ends with one
line ``stagerl: error: ...`` naming the field, file or option, exit code 2, no traceback, and
nothing left behind -- checked on a table of bad inputs run through the real CLI in a subprocess --
plus the behaviours around it: runs never mix, torn metrics lines, whole benchmarks, readable
output.

The table runs in one subprocess (this file is also the driver: ``python test_cli_contract.py``),
one ``stagerl.cli.main(argv)`` call per input with its own working folder and its own captured
stdout/stderr (file descriptors 1 and 2), so the contract is checked input by input while the
interpreter and torch start once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stagerl.rewards.base import RewardOutput, register_reward

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["run.out_dir=out", "run.steps=1", "sampling.prompts_per_step=2", "sampling.group_size=2",
         "log.eval_prompts=0", "log.tensorboard=false", "log.image_every=0", "model.path={tiny}"]
EVAL = ["--checkpoint", "{tiny}", "--prompts", "2", "--images-per-prompt", "1"]
SAMPLE = ["--checkpoint", "{tiny}", "--n", "1"]
STUDY = ["--out", "study", "--docs", "docs", "--model", "{tiny}", "--configs",
         str(ROOT / "configs" / "ablations"), "--rows", "stage", "--seeds", "1", "--steps", "1",
         "--eval-prompts", "2", "--eval-images", "1", "--curve-points", "0"]
# Cheap settings go first, so that an input the CLI failed to refuse ends quickly (and fails the
# test) instead of training or serving; the case's own arguments come after them and win.
PRETRAIN = ["--steps", "1", "--train-examples", "16", "--batch-size", "4", "--eval-prompts", "1",
            "--eval-images-per-prompt", "1", "--eval-cfg-scales", "2"]
PRETRAIN_REWARD = ["--steps", "1", "--renders", "8", "--samples", "4", "--eval-samples", "4",
                   "--eval-renders", "4", "--batch", "4", "--out", "out"]
BASE = {"train": TRAIN, "eval": EVAL, "sample": SAMPLE, "study": STUDY, "pretrain": PRETRAIN,
        "pretrain-reward": PRETRAIN_REWARD, "reward-server": ["--no-preload"]}

# (id, argv, text the error line must contain)
CASES: list[tuple[str, list[str], str]] = [
    # --- train: config values -------------------------------------------------------------------
    ("yaml_unclosed_list", ["train", "reward.names=[a,"], "'reward.names=[a,'"),
    ("betas_out_of_range", ["train", "optim.betas=[2,0.999]"], "optim.betas"),
    ("weight_nan", ["train", "reward.weights=[nan]"], "reward.weights"),
    ("weight_inf", ["train", "reward.weights=[.inf]"], "reward.weights"),
    ("entropy_coef_nan", ["train", "algo.entropy_coef=nan"], "algo.entropy_coef"),
    ("lr_inf", ["train", "optim.lr=inf"], "optim.lr"),
    ("beta_negative", ["train", "algo.beta=-1"], "algo.beta"),
    ("top_p_zero", ["train", "sampling.top_p=0"], "sampling.top_p"),
    ("top_k_one", ["train", "sampling.top_k=1"], "sampling.top_k"),
    ("top_p_above_one", ["train", "sampling.top_p=1.5"], "sampling.top_p"),
    ("temperature_zero", ["train", "sampling.temperature=0"], "sampling.temperature"),
    ("weights_count", ["train", "reward.weights=[1,2]"], "reward.weights"),
    ("weights_all_zero", ["train", "reward.weights=[0]"], "reward.weights"),
    ("names_empty", ["train", "reward.names=[]"], "reward.names"),
    ("seed_negative", ["train", "run.seed=-1"], "run.seed"),
    ("seed_huge", ["train", "run.seed=100000000000000000000"], "run.seed"),
    ("steps_zero", ["train", "run.steps=0"], "run.steps"),
    ("log_eval_suite_bogus", ["train", "log.eval_suite=bogus"], "log.eval_suite"),
    ("choice_bad", ["train", "algo.kl_estimator=k9"], "algo.kl_estimator"),
    ("precision_bad", ["train", "run.mixed_precision=fp8"], "run.mixed_precision"),
    ("fp16_on_cpu", ["train", "run.mixed_precision=fp16", "run.cpu=true"],
     "run.mixed_precision: fp16 needs a GPU (run.cpu=true)"),
    ("warmup_longer_than_run", ["train", "optim.warmup_steps=5", "run.steps=2"],
     "optim.warmup_steps: 5 warmup steps are more than the run's run.steps=2"),
    ("prompt_template_mangled", ["train", "model.kind=janus",
                                 'model.prompt_template="</User/>: {prompt}"'],
     "model.prompt_template: '</User/>' is not a Janus role tag"),
    ("preset_unknown", ["train", "algo.preset=nope"], "algo.preset"),
    ("gcpo_with_stage_weights", ["train", "algo.preset=gcpo", "algo.reweight=true"],
     "algo.token_select: gcpo (algo.preset=gcpo) selects its own tokens and cannot take STAGE's "
     "token weights (algo.reweight=true)"),
    ("gcpo_with_partner_set", ["train", "algo.preset=gcpo", "algo.partner_set=parity"],
     "STAGE's token weights (algo.partner_set=parity)"),
    ("adv_scale_bad", ["train", "algo.adv_scale=std"],
     "algo.adv_scale: expected one of group, batch, none, got 'std'"),
    ("ratio_sequence_with_stage_weights", ["train", "algo.ratio_level=sequence"],
     "algo.ratio_level: 'sequence' gives every token of a sequence one ratio, so per-token "
     "weights (algo.reweight)"),
    ("ratio_sequence_with_gcpo", ["train", "algo.preset=gcpo", "algo.ratio_level=sequence"],
     "per-token weights (algo.token_select=gcpo)"),
    ("unknown_key", ["train", "algo.betta=0.1"], "Did you mean 'algo.beta'"),
    ("unknown_section", ["train", "algoo.beta=0.1"], "Did you mean 'algo'"),
    ("section_given_value", ["train", "run=5"], "'run' is a section"),
    ("list_given_scalar", ["train", "reward.names=abc"], "reward.names: expected a list"),
    ("scalar_given_list", ["train", "optim.lr=[1,2]"], "optim.lr: expected a single value"),
    ("not_a_number", ["train", "algo.beta=abc"], "algo.beta: expected a number"),
    ("not_a_whole_number", ["train", "run.steps=1.5"], "run.steps: expected a whole number"),
    ("not_a_bool", ["train", "log.tensorboard=maybe"], "log.tensorboard"),
    ("kwargs_not_mapping", ["train", "reward.kwargs=5"], "reward.kwargs"),
    ("override_without_key", ["train", "=5"], "bad override"),
    ("group_size_too_big", ["train", "sampling.group_size=1000000"], "sampling.group_size"),
    ("log_eval_images_too_many", ["train", "log.eval_prompts=10", "log.eval_images_per_prompt="
                              "100000000"], "log.eval_images_per_prompt"),
    # --- train: config files and presets --------------------------------------------------------
    ("config_missing", ["train", "nope.yaml"], "config file not found"),
    ("preset_misspelt", ["train", "shapes_grpoo"], "shapes_grpo"),
    ("two_configs", ["train", "{fx}/value.yaml", "{fx}/value.yaml"], "unexpected argument"),
    ("yaml_syntax_line", ["train", "{fx}/syntax.yaml"], "syntax.yaml:4: not valid YAML"),
    ("yaml_value_line", ["train", "{fx}/value.yaml"], "value.yaml:3: algo.beta"),
    ("yaml_unknown_key_line", ["train", "{fx}/unknown.yaml"], "unknown.yaml:4: unknown config key"),
    ("yaml_type_line", ["train", "{fx}/type.yaml"], "type.yaml:2: run.steps"),
    ("yaml_not_mapping", ["train", "{fx}/list.yaml"], "mapping of sections"),
    ("yaml_binary", ["train", "{fx}/bin.yaml"], "bin.yaml: not a UTF-8"),
    ("yaml_empty", ["train", "{fx}/blank.yaml"], "blank.yaml: the file holds no settings"),
    # --- train: rewards, prompts, model, run folder ---------------------------------------------
    ("reward_unknown", ["train", "reward.names=[shapes_strictt]"], "shapes_strictt"),
    ("reward_kwargs_other_name", ["train", "reward.kwargs={shapes_strictt: {canvas: 32}}"],
     "reward.kwargs: 'shapes_strictt'"),
    ("reward_kwargs_unknown_arg", ["train", "reward.kwargs={shapes_strict: {canvass: 32}}"],
     "canvass"),
    ("reward_kwargs_nan", ["train", "reward.kwargs={shapes_strict: {canvas: .nan}}"],
     "reward.kwargs"),
    ("proxy_unknown", ["train", "reward.names=[shapes_detecter]"], "'shapes_detector'"),
    ("proxy_not_a_proxy", ["train", "reward.names=[shapes_detector]",
                           "reward.kwargs={shapes_detector: {weights: '{fx}/runs'}}"],
     "is not a proxy reward"),
    ("proxy_other_kind", ["train", "reward.names=[shapes_scorer]",
                          "reward.kwargs={shapes_scorer: {weights: 'builtin:shapes_detector'}}"],
     "holds a detector proxy"),
    ("proxy_other_world", ["train", "reward.names=[shapes_detector]",
                           "reward.kwargs={shapes_detector: {canvas: 48}}"],
     "another world spec (canvas: 32"),
    ("monitor_unknown", ["train", "reward.monitor=[shapes_strictt]"], "shapes_strictt"),
    ("pretrain_reward_unknown", ["pretrain-reward", "shapes_detecter"], "shapes_detecter"),
    ("pretrain_reward_width_zero", ["pretrain-reward", "shapes_detector", "--width", "0"],
     "--width"),
    ("pretrain_reward_no_data", ["pretrain-reward", "shapes_detector", "--renders", "0",
                                 "--samples", "0"], "renders/samples"),
    ("pretrain_reward_base_missing", ["pretrain-reward", "shapes_scorer", "--base-model",
                                      "/nonexistent/base"], "base_model"),
    ("study_proxy_unknown", ["study", "--proxy", "shapes_detecter"], "--proxy"),
    ("data_binary", ["train", "data.source={fx}/bin.txt"], "bin.txt: not UTF-8"),
    ("data_missing", ["train", "data.source=no/such/prompts.txt"], "no/such/prompts.txt"),
    ("data_split_unknown", ["train", "data.source=shapes:bogus"], "bogus"),
    ("data_malformed_line", ["train", "data.source={fx}/bad.jsonl"], "bad.jsonl:2"),
    ("data_geneval_line_without_include", ["train", "data.source={fx}/geneval_partial.jsonl"],
     "geneval_partial.jsonl:2: no 'include' field"),
    ("data_empty", ["train", "data.source={fx}/empty.txt"], "empty.txt: prompt file holds no"),
    ("data_no_known_word", ["train", "data.source={fx}/unread.txt"], "unread.txt:3"),
    ("model_missing", ["train", "model.path=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ("model_truncated", ["train", "model.path={fx}/trunc"], "trunc"),
    ("out_dir_proc", ["train", "run.out_dir=/proc/x"], "run.out_dir=/proc/x"),
    ("out_dir_is_file", ["train", "run.out_dir={fx}/afile"], "run.out_dir"),
    ("out_dir_under_file", ["train", "run.out_dir={fx}/afile/sub"], "run.out_dir"),
    ("name_escapes", ["train", "run.name=../../escape"], "run.name"),
    ("name_absolute", ["train", "run.name=/tmp/abs"], "run.name"),
    ("name_dot", ["train", "run.name=."], "run.name"),
    ("run_exists", ["train", "run.out_dir={fx}/runs", "run.name=done"], "already holds a run"),
    ("resume_finished", ["train", "--resume", "run.out_dir={fx}/runs", "run.name=finished"],
     "already finished step 1"),
    ("option_misspelt", ["train", "--resum"], "unrecognized arguments: --resum"),
    # --- eval -----------------------------------------------------------------------------------
    ("eval_prompts_zero", ["eval", "--prompts", "0"], "--prompts"),
    ("eval_images_zero", ["eval", "--images-per-prompt", "0"], "--images-per-prompt"),
    ("eval_cfg_negative", ["eval", "--cfg-scale", "-5"], "--cfg-scale"),
    ("eval_cfg_nan", ["eval", "--cfg-scale", "nan"], "--cfg-scale"),
    ("eval_seed_text", ["eval", "--seed", "abc"], "--seed"),
    ("eval_suite_bogus", ["eval", "--suite", "bogus"], "heldout"),
    ("eval_rewards_without_benchmark", ["eval", "--rewards", "nope"], "--rewards"),
    ("eval_benchmark_and_suite", ["eval", "--benchmark", "{fx}/geneval.jsonl", "--suite",
                                  "compositions"], "--suite"),
    ("eval_benchmark_binary", ["eval", "--benchmark", "{fx}/bin.txt"], "not UTF-8"),
    ("eval_benchmark_missing", ["eval", "--benchmark", "no/such.jsonl"], "no/such.jsonl"),
    ("eval_benchmark_malformed", ["eval", "--benchmark", "{fx}/bad.jsonl"], "bad.jsonl:2"),
    ("eval_benchmark_reward_unknown", ["eval", "--benchmark", "{fx}/geneval.jsonl", "--rewards",
                                       "nope"], "'nope'"),
    ("eval_benchmark_kwargs_misspelt", ["eval", "--benchmark", "{fx}/geneval.jsonl", "--set",
                                        "reward.kwargs={ocrr: {}}"], "'ocrr'"),
    ("eval_json_proc", ["eval", "--json", "/proc/x/out.json"], "--json=/proc/x/out.json"),
    ("eval_json_folder", ["eval", "--json", "{fx}/adir"], "--json"),
    ("eval_out_file", ["eval", "--out", "{fx}/afile"], "--out"),
    ("eval_out_proc", ["eval", "--out", "/proc/x"], "--out"),
    ("eval_checkpoint_missing", ["eval", "--checkpoint", "/no/such/model"], "--checkpoint"),
    ("eval_checkpoint_truncated", ["eval", "--checkpoint", "{fx}/trunc"], "trunc"),
    ("eval_checkpoint_not_a_model", ["eval", "--checkpoint", "{fx}/adir"], "adir"),
    ("eval_checkpoint_hub_id_shapes", ["eval", "--checkpoint", "someone/Janus-Pro-1B"],
     "--set model.kind=janus"),
    ("eval_geneval_shapes_reward", ["eval", "--benchmark", "geneval"], "--rewards geneval"),
    ("eval_geneval_rewards_shapes", ["eval", "--benchmark", "geneval", "--rewards",
                                     "shapes_partial"], "--rewards geneval"),
    ("eval_images_too_many", ["eval", "--images-per-prompt", "100000000"], "GiB"),
    ("eval_set_bad", ["eval", "--set", "algo.beta=abc"], "algo.beta"),
    ("eval_config_missing", ["eval", "--config", "nope.yaml"], "nope.yaml"),
    ("eval_option_misspelt", ["eval", "--prompt", "3"], "eval: unrecognized arguments"),
    # --- sample ---------------------------------------------------------------------------------
    ("sample_n_negative", ["sample", "a red circle", "--n", "-1"], "--n"),
    ("sample_n_zero", ["sample", "a red circle", "--n", "0"], "--n"),
    ("sample_n_too_many", ["sample", "a red circle", "--n", "100000000"], "GiB"),
    ("sample_cfg_negative", ["sample", "a red circle", "--cfg-scale", "-5"], "--cfg-scale"),
    ("sample_cfg_nan", ["sample", "a red circle", "--cfg-scale", "nan"], "--cfg-scale"),
    ("sample_cfg_inf", ["sample", "a red circle", "--cfg-scale", "inf"], "--cfg-scale"),
    ("sample_no_prompts", ["sample"], "give prompts"),
    ("sample_prompts_and_file", ["sample", "a red circle", "--file", "{fx}/prompts.txt"],
     "not both"),
    ("sample_empty_prompt", ["sample", " "], "prompt 1 is empty"),
    ("sample_prompt_no_known_word", ["sample", "一个红色的圆"], "'一个红色的圆' has no word"),
    ("sample_prompt_punctuation", ["sample", "a red circle", "!!! ???"], "prompt 2: '!!! ???'"),
    ("sample_file_no_known_word", ["sample", "--file", "{fx}/unread.txt"], "unread.txt:3"),
    ("sample_file_binary", ["sample", "--file", "{fx}/bin.txt"], "not UTF-8"),
    ("sample_file_missing", ["sample", "--file", "no/such.txt"], "no/such.txt"),
    ("sample_out_file", ["sample", "a red circle", "--out", "{fx}/afile"], "--out"),
    ("sample_out_proc", ["sample", "a red circle", "--out", "/proc/x"], "--out"),
    ("sample_truncated", ["sample", "a red circle", "--checkpoint", "{fx}/trunc"], "trunc"),
    ("sample_step_without_weights", ["sample", "a red circle", "--checkpoint",
                                     "{fx}/runs/noweights/checkpoints/step_000001"],
     "no model.safetensors"),
    # --- report, config, top level --------------------------------------------------------------
    ("report_missing", ["report", "no/such/run"], "no/such/run"),
    ("report_not_a_run", ["report", "{fx}/adir"], "no metrics.jsonl"),
    ("report_bad_middle_line", ["report", "{fx}/runs/corrupt"], "metrics.jsonl:2"),
    ("config_fields_junk", ["config", "--fields", "junk"], "--fields"),
    ("config_bad_override", ["config", "algo.beta=abc"], "algo.beta"),
    ("no_command", [], "COMMAND"),
    ("command_misspelt", ["trian"], "invalid choice: 'trian'"),
    ("pretrain_out_file", ["pretrain", "--out", "{fx}/afile"], "--out"),
    ("pretrain_lr_nan", ["pretrain", "--out", "p", "--lr", "nan"], "--lr"),
    ("pretrain_dropout_above_one", ["pretrain", "--out", "p", "--prompt-dropout", "2"],
     "--prompt-dropout"),
    ("pretrain_cfg_scale_negative", ["pretrain", "--out", "p", "--eval-cfg-scales", "2", "-1"],
     "--eval-cfg-scales"),
    # --- study ----------------------------------------------------------------------------------
    ("study_rows_unknown", ["study", "--rows", "nope"], "--rows"),
    ("study_seeds_zero", ["study", "--seeds", "0"], "--seeds"),
    ("study_conditions_unknown", ["study", "--conditions", "nope"], "--conditions"),
    ("study_condition_seeds", ["study", "--condition-seeds", "5"], "--condition-seeds"),
    ("study_out_file", ["study", "--out", "{fx}/afile"], "--out"),
    ("study_configs_missing", ["study", "--configs", "{fx}/adir"], "stage.yaml"),
    ("study_set_bad", ["study", "--set", "algo.beta=abc"], "algo.beta"),
    ("study_prefix_path", ["study", "--prefix", "a/b"], "--prefix"),
    ("study_model_missing", ["study", "--model", "/no/such/model"], "--model"),
    ("study_steps_zero", ["study", "--steps", "0"], "--steps"),
    # --- reward-server --------------------------------------------------------------------------
    ("server_port_overflow", ["reward-server", "--rewards", "shapes_strict", "--port", "99999"],
     "--port"),
    ("server_port_text", ["reward-server", "--rewards", "shapes_strict", "--port", "http"],
     "--port"),
    ("server_max_batch_zero", ["reward-server", "--rewards", "shapes_strict", "--max-batch", "0"],
     "--max-batch"),
    ("server_max_mb_nan", ["reward-server", "--rewards", "shapes_strict", "--max-request-mb",
                           "nan"], "--max-request-mb"),
    ("server_reward_unknown", ["reward-server", "--rewards", "nope"], "'nope'"),
    ("server_rewards_missing", ["reward-server"], "--rewards"),
    ("server_kwargs_bad_json", ["reward-server", "--rewards", "shapes_strict", "--reward-kwargs",
                                "{x"], "--reward-kwargs"),
    ("server_kwargs_unserved", ["reward-server", "--rewards", "shapes_strict", "--reward-kwargs",
                                '{"ocr": {}}'], "'ocr'"),
    ("server_kwargs_unknown_arg", ["reward-server", "--rewards", "shapes_strict",
                                   "--reward-kwargs", '{"shapes_strict": {"canvass": 1}}'],
     "canvass"),
    ("server_remote", ["reward-server", "--rewards", "remote"], "remote"),
    ("server_config_missing", ["reward-server", "--rewards", "shapes_strict", "--config",
                               "nope.yaml"], "nope.yaml"),
]


# --------------------------------------------------------------------------------------------------
# Fixtures: every file a case points at, built here


def _write_run(d: Path, step: int | None, metrics: str, model: Path | None = None,
               weights: bool = True) -> None:
    """A run folder: config.yaml, metrics.jsonl and, with ``step``, one complete checkpoint."""
    from stagerl.checkpoint import MARKER
    from stagerl.config import load_config, to_yaml

    d.mkdir(parents=True)
    yaml_text = to_yaml(load_config(None, [f"model.path={model or 'builtin:shapes'}"]))
    (d / "config.yaml").write_text(yaml_text)
    (d / "metrics.jsonl").write_text(metrics)
    if step is not None:
        ck = d / "checkpoints" / f"step_{step:06d}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"step": step}))
        (ck / "config.yaml").write_text(yaml_text)
        (ck / MARKER).write_text("ok\n")
        if weights:
            (ck / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())


def _build_fixtures(fx: Path, tiny: Path) -> None:
    fx.mkdir()
    (fx / "bin.txt").write_bytes(bytes(range(256)) * 8)
    (fx / "bin.yaml").write_bytes(bytes(range(128, 256)) * 8)
    (fx / "afile").write_text("not a folder\n")
    (fx / "adir").mkdir()
    (fx / "empty.txt").write_text("\n")
    (fx / "prompts.txt").write_text("a red circle\n")
    (fx / "unread.txt").write_text("a red circle\n\n!!! ???\n")
    (fx / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": oops}\n')
    (fx / "geneval.jsonl").write_text('{"prompt": "a photo of a red circle", "tag": "colors"}\n')
    (fx / "syntax.yaml").write_text("algo:\n  beta: 0.1\n  kl_estimator: [k3\nrun:\n  steps: 3\n")
    (fx / "value.yaml").write_text("# a comment\nalgo:\n  beta: -1\n")
    (fx / "unknown.yaml").write_text("algo:\n  beta: 0.1\nrun:\n  stepz: 3\n")
    (fx / "type.yaml").write_text("run:\n  steps: abc\n")
    (fx / "list.yaml").write_text("- a\n- b\n")
    (fx / "blank.yaml").write_text("# settings to come\n")
    (fx / "geneval_partial.jsonl").write_text(
        '{"prompt": "a red circle", "tag": "colors", "include": [{"class": "circle", "count": 1}]}'
        '\n{"prompt": "a blue square", "tag": "colors"}\n')
    trunc = fx / "trunc"
    trunc.mkdir()
    for f in tiny.iterdir():
        data = f.read_bytes()
        (trunc / f.name).write_bytes(data[:len(data) // 2] if f.name == "model.safetensors"
                                     else data)
    row = '{"step": 1, "reward/total/mean": 0.5}\n'
    _write_run(fx / "runs" / "done", None, row)
    _write_run(fx / "runs" / "finished", 1, row, tiny)
    _write_run(fx / "runs" / "noweights", 1, row, tiny, weights=False)
    _write_run(fx / "runs" / "corrupt", None, row + "{torn\n" + row)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------------
# The driver (runs in the subprocess)


def _run_case(argv: list[str], cwd: Path, scratch: Path) -> dict:
    """One ``main(argv)`` in ``cwd`` with fds 1 and 2 captured; a traceback is captured too."""
    import traceback

    from stagerl.cli import main

    saved = os.dup(1), os.dup(2)
    out, err = scratch / "out.txt", scratch / "err.txt"
    here = os.getcwd()
    with open(out, "w") as fo, open(err, "w") as fe:
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        try:
            os.chdir(cwd)
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
            traceback.print_exc()
            code = "traceback"
        finally:
            os.chdir(here)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    return {"code": code, "stdout": out.read_text(), "stderr": err.read_text()}


def _drive(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    root, scratch = Path(spec["root"]), Path(spec["scratch"])
    with open(result_path, "w") as fh:
        for case in spec["cases"]:
            cwd = root / "cases" / case["id"]
            cwd.mkdir(parents=True)
            before = _tree(root)
            t0 = time.perf_counter()
            res = _run_case(case["argv"], cwd, scratch)
            res.update(id=case["id"], seconds=time.perf_counter() - t0,
                       litter=sorted(set(_tree(root)) - set(before)),
                       lost=sorted(set(before) - set(_tree(root))))
            fh.write(json.dumps(res) + "\n")
            fh.flush()


# --------------------------------------------------------------------------------------------------
# The table test


def _argv(case_argv: list[str], fx: Path, tiny: Path) -> list[str]:
    command = case_argv[0] if case_argv else ""
    argv = case_argv[:1] + BASE.get(command, []) + case_argv[1:]
    return [a.replace("{fx}", str(fx)).replace("{tiny}", str(tiny)) for a in argv]


@pytest.fixture(scope="module")
def table_results(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("contract")
    fx = root / "fx"
    _build_fixtures(fx, Path(tiny_model_dir))
    scratch = tmp_path_factory.mktemp("scratch")
    spec = {"root": str(root), "scratch": str(scratch),
            "cases": [{"id": cid, "argv": _argv(argv, fx, Path(tiny_model_dir))}
                      for cid, argv, _ in CASES]}
    (scratch / "spec.json").write_text(json.dumps(spec))
    out = scratch / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, __file__, str(scratch / "spec.json"), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())} \
        if out.is_file() else {}
    assert proc.returncode == 0, (proc.stderr[-3000:], list(results)[-1:])
    return results


def test_the_table_is_large_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 60
    assert {c[1][0] for c in CASES if c[1]} >= {"train", "eval", "sample", "report", "config",
                                                 "study", "reward-server"}


@pytest.mark.parametrize("case_id,needle", [(c[0], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_no_litter(table_results, case_id, needle):
    res = table_results[case_id]
    err = res["stderr"]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert res["code"] == 2, (res["code"], err, res["stdout"][-500:])
    assert len(lines) == 1 and lines[0].startswith("stagerl: error: "), err
    assert needle in lines[0], lines[0]
    assert not res["litter"], res["litter"]
    assert not res["lost"], res["lost"]
    assert res["seconds"] < 30, res["seconds"]


# --------------------------------------------------------------------------------------------------
# Runs never mix; resume; torn metrics lines; intermediate checkpoints


@register_reward("contract_redness")
class _Redness:
    """Mean red-minus-green: continuous, so a group is never tied, for any canvas."""

    name = "contract_redness"

    def __call__(self, images, prompts, metadata):
        import numpy as np
        import torch

        vals = [float((np.asarray(im, dtype=np.float32)[..., 0] -
                       np.asarray(im, dtype=np.float32)[..., 1]).mean() / 255.0) for im in images]
        return RewardOutput(torch.tensor(vals), torch.ones(len(vals), dtype=torch.bool))


def _train_argv(out: Path, model: Path, *extra: str) -> list[str]:
    return ["train", f"run.out_dir={out}", "run.name=r", f"model.path={model}",
            "reward.names=[contract_redness]", "sampling.prompts_per_step=2",
            "sampling.group_size=2", "log.eval_prompts=0", "log.tensorboard=false",
            "log.image_every=0", "run.save_every=1", *extra]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_runs_never_mix_and_resume_continues_without_duplicates(tmp_path, tiny_model_dir,
                                                                 capsys):
    from stagerl.cli import main

    model, run = Path(tiny_model_dir), tmp_path / "r"
    assert main(_train_argv(tmp_path, model, "run.steps=2")) == 0
    assert _steps(run) == [1, 2]
    capsys.readouterr()
    assert main(_train_argv(tmp_path, model, "run.steps=2")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _steps(run) == [1, 2]  # untouched
    # Killed during step 3: its row was logged, the checkpoint not written, the last line torn.
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "reward/total/mean": 0.1}\n{"step": 4, "rew')
    assert main(["report", str(run)]) == 0  # the torn line is dropped, not a traceback
    assert main(_train_argv(tmp_path, model, "run.steps=3", "--resume")) == 0
    assert "resuming from step 2 of 3" in capsys.readouterr().out
    assert _steps(run) == [1, 2, 3]
    # An intermediate checkpoint samples like the final model it became.
    step3 = run / "checkpoints" / "step_000003"
    for name, ckpt in (("step", step3), ("final", run)):
        assert main(["sample", "a red circle", "--n", "2", "--checkpoint", str(ckpt), "--out",
                     str(tmp_path / name)]) == 0
    pngs = sorted((tmp_path / "step").rglob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        assert png.read_bytes() == (tmp_path / "final" / png.relative_to(tmp_path / "step")
                                    ).read_bytes()
    bench = tmp_path / "colors_val.txt"
    bench.write_text("a red circle\n")
    assert main(["eval", "--checkpoint", str(step3), "--benchmark", str(bench), "--rewards",
                 "contract_redness", "--images-per-prompt", "1"]) == 0
    # the shapes evaluator reads 32x32 images; this 16x16 model gets one line, not a traceback
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(step3), "--prompts", "1",
                 "--images-per-prompt", "1"]) == 2
    assert "the model draws 16x16 images" in capsys.readouterr().err


def test_report_and_resume_drop_a_torn_last_line(tmp_path):
    from stagerl.checkpoint import MARKER
    from stagerl.cli import main
    from stagerl.tracking import Tracker, read_metrics

    rows = "".join(json.dumps({"step": k, "reward/total/mean": 0.5 + 1e-6 * k}) + "\n"
                   for k in range(1, 5))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 5, "rew')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "reward.png").is_file()
    ck = tmp_path / "checkpoints" / "step_000002"  # resuming from step 2 logs 3.. again
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text('{"step": 2}')
    (ck / MARKER).write_text("ok\n")
    Tracker(tmp_path, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


# --------------------------------------------------------------------------------------------------
# Benchmarks are whole by default; an empty category says why


def test_benchmark_is_whole_by_default_and_an_empty_category_says_why(tmp_path, tiny_model_dir,
                                                                      capsys):
    from stagerl.cli import main

    bench = tmp_path / "count_val.txt"
    bench.write_text("a red circle\ntwo blue squares\na green triangle\n")
    base = ["eval", "--checkpoint", str(tiny_model_dir), "--benchmark", str(bench),
            "--images-per-prompt", "1", "--rewards", "shapes_strict"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "scoring 3 prompts (the whole file) x 1 images = 3 images" in out
    # a .txt prompt has no GenEval clauses, so the rule-based reward cannot score it
    assert "note: count: no score from reward 'shapes_strict': all 3 images were invalid" in out
    assert "GenEval" in out.split("note:")[1]
    assert main(base + ["--prompts", "2"]) == 0
    assert "scoring 2 prompts (at most 2 per file)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Readability: tables, plots, grids, help, presets, progress, vocabulary


def test_tables_never_cut_category_names():
    from stagerl.eval import format_table

    text = format_table({"a trained model name": {"single_object": 0.91, "color_attr": 0.2}})
    head, row = text.splitlines()
    assert "single_object" in head and "color_attr" in head
    assert row.startswith("a trained model name") and "0.910" in row


def test_plots_do_not_make_tiny_changes_look_steep():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stagerl.report import _honest_y_axis

    fig, ax = plt.subplots()
    ys = [0.5 + 1e-6 * k for k in range(20)]
    ax.plot(range(20), ys)
    _honest_y_axis(ax, ys)
    lo, hi = ax.get_ylim()
    assert hi - lo >= 1e-3 * 0.5 and lo <= min(ys) and hi >= max(ys)
    assert ax.yaxis.get_major_formatter().get_useOffset() is False
    plt.close(fig)


def test_grid_labels_show_the_whole_prompt():
    from PIL import Image

    from stagerl.tracking import image_grid

    img = Image.new("RGB", (32, 32), "white")
    long = "a red circle to the left of a blue square above two green triangles and a yellow one"
    short = image_grid([img, img], ["R=1.00 a red circle"] * 2, cols=2)
    full = image_grid([img, img], [f"R=1.00 {long}"] * 2, cols=2)
    assert full.height > short.height  # the label band grew to hold every wrapped line
    band = full.crop((0, 0, full.width // 2, full.height - 32 * 4))
    dark_rows = [y for y in range(band.height)
                 if min(band.getpixel((x, y))[0] for x in range(band.width)) < 128]
    assert dark_rows and dark_rows[-1] > short.height - 32 * 4  # text below the old band


def test_every_eval_and_sample_option_has_help_with_its_default():
    from stagerl.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("eval", "sample"):
        for action in sub.choices[command]._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in (action.help or ""), (command, action.dest)


def test_presets_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from stagerl.cli import find_config
    from stagerl.config import load_config

    monkeypatch.chdir(tmp_path)
    assert load_config(find_config("shapes_grpo")).algo.preset == "vanilla_grpo"
    assert load_config(find_config("ablations/wo_kl.yaml")).algo.preset == "wo_kl"


def test_eval_progress_counts_every_image():
    from conftest import make_tiny_policy

    from stagerl.data import PromptItem
    from stagerl.eval import generate_images
    from stagerl.policies.base import SamplingParams

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    items = [PromptItem(p, {}) for p in ("a red circle", "a blue square", "a green triangle")]
    generate_images(make_tiny_policy(), items, 2, SamplingParams(cfg_scale=2.0), 0,
                    chunk_prompts=2, progress=Bar)
    assert [(b.total, b.n, b.closed) for b in bars] == [(6, 6, True)]


def test_tiny_model_warns_once_about_words_it_does_not_know(caplog):
    from conftest import make_tiny_policy

    policy = make_tiny_policy()
    with caplog.at_level("WARNING", logger="stagerl.policies.tiny"):
        policy.encode_prompts(["a golden car", "a red circle"])
        policy.encode_prompts(["a golden car"])
    warned = [r.getMessage() for r in caplog.records if "vocabulary" in r.getMessage()]
    assert len(warned) == 1 and "'golden'" in warned[0] and "'car'" in warned[0]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    _drive(sys.argv[1], sys.argv[2])


def test_study_progress_is_a_bar_over_runs_on_a_terminal(monkeypatch):
    """`stagerl study` turns its "[k/N] run" messages into one bar with an ETA over the N runs."""
    from stagerl import cli

    class FakeBar:
        def __init__(self, total, **kw):
            self.total, self.n, self.postfix, self.lines = total, 0, "", []

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s):
            self.postfix = s

        def write(self, s):
            self.lines.append(s)

    made = []
    monkeypatch.setattr(cli, "_progress", lambda enabled=True: lambda **kw: made.append(
        FakeBar(**kw)) or made[-1])
    report = cli._study_progress()
    report("[1/3] stage-s0")
    report("[1/3] stage-s0 done")
    report("[2/3] stage-s1")
    report("planning: 3 runs")
    bar = made[0]
    assert len(made) == 1 and bar.total == 3 and bar.n == 1
    assert bar.postfix == "stage-s1" and bar.lines == ["planning: 3 runs"]


@pytest.mark.parametrize("folders", [(), ("tensorboard",), ("images",), ("tensorboard", "images")])
def test_train_summary_names_only_the_folders_the_run_has(tmp_path, capsys, folders):
    from types import SimpleNamespace

    from stagerl.cli import _print_train_result

    for name in folders:
        (tmp_path / name).mkdir()
    result = SimpleNamespace(eval_before=None, eval_after=None, steps=1, seconds=6.0, skipped=0,
                             run_dir=tmp_path)
    _print_train_result(result, [])
    out = capsys.readouterr().out
    assert ("tensorboard/" in out) == ("tensorboard" in folders), out
    assert ("image grids" in out) == ("images" in folders), out
    assert str(tmp_path / "metrics.jsonl") in out


def test_report_warns_once_about_a_step_logged_twice_and_plots_the_later_row(tmp_path, caplog):
    from stagerl.cli import main
    from stagerl.report import series
    from stagerl.tracking import read_metrics

    rows = [{"step": 1, "reward/total/mean": 0.1}, {"step": 2, "reward/total/mean": 0.2},
            {"step": 2, "eval/overall": 0.5},  # an evaluation row of a step: normal, no warning
            {"step": 1, "reward/total/mean": 0.9}, {"step": 2, "reward/total/mean": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        assert main(["report", str(tmp_path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "(1, 2)" in warnings[0] and "later row" in warnings[0], warnings
    assert series(read_metrics(tmp_path), "reward/total/mean") == ([1, 2], [0.9, 0.8])
    # one row per step and metric (the training row, then an evaluation row): no warning
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["report", str(tmp_path)]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]

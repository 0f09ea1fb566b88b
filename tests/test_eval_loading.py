"""``stagerl eval`` and ``stagerl sample`` load exactly what was trained.

A tiny random Janus (configs/janus_tiny_test.yaml: ``model.tiny_random: true``) is trained for two
steps, through the real CLI and in this process; then its run folder, its final/ model and its
step checkpoint are evaluated and sampled. The policy those commands build must hold the trained
weights (compared with the trained policy itself, which differs from the random start), whatever
the default model kind is and although the saved config says ``tiny_random``. Corrupt weights,
folders that are no model, rewards that cannot score a benchmark and prompts the shapes model
cannot read are one ``stagerl: error:`` line, exit 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stagerl.rewards.base import RewardOutput, register_reward

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "janus_tiny_test.yaml")
LM_PARAM = "model.model.language_model.layers.0.mlp.up_proj.weight"


@register_reward("eval_loading_brightness")
class _Brightness:
    """Mean pixel value: continuous, so groups are never tied and the update moves the weights."""

    name = "eval_loading_brightness"

    def __call__(self, images, prompts, metadata):
        vals = [float(np.asarray(im, dtype=np.float32).mean() / 255.0) for im in images]
        return RewardOutput(torch.tensor(vals), torch.ones(len(vals), dtype=torch.bool))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, the trained policy's weights, the random start's weights)."""
    import stagerl.trainer as trainer_mod
    from stagerl.cli import main

    out = tmp_path_factory.mktemp("eval_loading")
    seen: dict = {}
    real = trainer_mod.build_policy

    def spy(model_cfg, need_reference):
        pair = real(model_cfg, need_reference)
        seen["policy"] = pair.policy
        seen["init"] = {k: v.detach().clone() for k, v in pair.policy.state_dict().items()}
        return pair

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer_mod, "build_policy", spy)
    try:
        assert main(["train", CONFIG, f"run.out_dir={out}", "run.steps=2", "run.save_every=1",
                     "reward.names=[eval_loading_brightness]", "optim.lr=1e-2",
                     "log.image_every=0"]) == 0
    finally:
        mp.undo()
    state = {k: v.detach().clone() for k, v in seen["policy"].state_dict().items()}
    assert not torch.equal(state[LM_PARAM], seen["init"][LM_PARAM])  # training moved it
    return out / "janus-tiny-test", state, seen["init"]


def _built(monkeypatch) -> dict:
    """Capture the policy eval/sample build."""
    import stagerl.cli_eval as cli_eval

    got: dict = {}
    real = cli_eval._build_eval_policy

    def spy(cfg, weights):
        got["policy"] = real(cfg, weights)
        return got["policy"]

    monkeypatch.setattr(cli_eval, "_build_eval_policy", spy)
    return got


def _one_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("stagerl: error: "), lines
    return lines[0]


# The step folder: cli_eval._load_weights counts the tied lm_head.weight (shared with
# embed_tokens, so absent from the saved state dict) as missing; remove the mark once it does not.
@pytest.mark.parametrize("where", ["run", "final", "step"])
def test_sample_and_eval_load_the_trained_weights(trained, where, tmp_path, monkeypatch):
    from stagerl.cli import main

    run, state, init = trained
    ckpt = {"run": run, "final": run / "final",
            "step": run / "checkpoints" / "step_000002"}[where]
    got = _built(monkeypatch)
    assert main(["sample", "a red circle", "--n", "1", "--checkpoint", str(ckpt),
                 "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").rglob("*.png"))) == 1
    loaded = got["policy"].state_dict()
    assert type(got["policy"]).__name__ == "JanusPolicy"
    assert torch.equal(loaded[LM_PARAM], state[LM_PARAM])
    assert not torch.equal(loaded[LM_PARAM], init[LM_PARAM])
    if where == "run":  # eval goes through the same loader
        got.clear()
        assert main(["eval", "--checkpoint", str(ckpt), "--prompts", "1",
                     "--images-per-prompt", "1"]) == 0
        assert torch.equal(got["policy"].state_dict()[LM_PARAM], state[LM_PARAM])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_weights"])
def test_damaged_weights_are_one_line_naming_the_file(trained, damage, tmp_path, capsys):
    from stagerl.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained[0] / "final", run / "final")
    shutil.copy(trained[0] / "config.yaml", run / "config.yaml")
    weights = run / "final" / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) // 2])
    else:
        weights.unlink()
    capsys.readouterr()
    assert main(["sample", "a red circle", "--n", "1", "--checkpoint", str(run),
                 "--out", str(tmp_path / "s")]) == 2
    assert str(weights) in _one_error(capsys)
    assert not (tmp_path / "s").exists()
    assert main(["eval", "--checkpoint", str(run / "final"), "--prompts", "1",
                 "--images-per-prompt", "1"]) == 2
    assert str(weights) in _one_error(capsys)


def test_a_folder_that_is_no_model_and_a_missing_path(tmp_path, capsys):
    from stagerl.cli import main

    (tmp_path / "empty").mkdir()
    for ckpt in (tmp_path / "empty", tmp_path / "nonexistent" / "model"):
        assert main(["eval", "--checkpoint", str(ckpt), "--prompts", "1",
                     "--images-per-prompt", "1"]) == 2
        assert str(ckpt) in _one_error(capsys)


def test_the_folder_names_its_kind_whatever_the_default(tiny_model_dir, tmp_path, monkeypatch):
    """A shapes-model folder under a Janus config is loaded as the shapes model it is."""
    from stagerl.cli import main

    got = _built(monkeypatch)
    assert main(["sample", "a red circle", "--n", "1", "--config", CONFIG, "--checkpoint",
                 str(tiny_model_dir), "--out", str(tmp_path / "s")]) == 0
    assert type(got["policy"]).__name__ == "TinyPolicy"


def test_geneval_needs_a_reward_that_scores_it(trained, capsys):
    from stagerl.cli import main

    for argv in (["eval", "--benchmark", "geneval"],  # the shapes model's config: shapes_strict
                 ["eval", "--benchmark", "geneval", "--checkpoint", str(trained[0]),
                  "--set", "reward.names=[shapes_partial]"],  # janus_tiny_test.yaml's reward
                 ["eval", "--benchmark", "geneval", "--rewards", "shapes_partial"]):
        assert main(argv + ["--prompts", "1", "--images-per-prompt", "1"]) == 2
        assert "--rewards geneval" in _one_error(capsys)


@pytest.mark.parametrize("prompt", ["一个红色的圆", "!!! ???"])
def test_prompts_the_shapes_model_cannot_read_are_refused(prompt, tmp_path, capsys):
    from stagerl.cli import main

    assert main(["sample", prompt, "--n", "1", "--out", str(tmp_path / "s")]) == 2
    line = _one_error(capsys)
    assert repr(prompt) in line and "circle" in line  # the prompt, and the words it knows
    assert not (tmp_path / "s").exists()


def test_unreadable_training_prompts_are_refused_at_preflight(tmp_path, capsys):
    from stagerl.cli import main

    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "a red circle"}\n\n{"prompt": "一个红色的圆"}\n')
    assert main(["train", f"data.source={src}", f"run.out_dir={tmp_path / 'out'}",
                 "run.steps=1"]) == 2
    assert f"{src}:3" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_eval_file_warns_once_about_unreadable_prompts(tiny_model_dir):
    from stagerl.cli_eval import _warn_unreadable
    from stagerl.config import load_config
    from stagerl.data import PromptItem

    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    said: list[str] = []
    items = [PromptItem(p, {}) for p in ("a red circle", "一个红色的圆", "!!!")]
    _warn_unreadable("bench", items, cfg, said.append)
    assert len(said) == 1 and "2 of 3" in said[0]
    said.clear()
    _warn_unreadable("bench", items[:1], cfg, said.append)
    assert said == []


def test_a_step_folder_keeps_its_own_model_under_another_config(tiny_model_dir, tmp_path,
                                                                monkeypatch):
    """--config decides sampling and rewards; the step's weights fit the model its config.yaml
    builds (a shapes model here, under the Janus test config)."""
    from safetensors.torch import load_file, save_file

    from stagerl.checkpoint import MARKER
    from stagerl.cli import main
    from stagerl.config import load_config, to_yaml

    step = tmp_path / "run" / "checkpoints" / "step_000001"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text(to_yaml(load_config(None, [f"model.path={tiny_model_dir}"])))
    (step / "trainer_state.json").write_text('{"step": 1}')
    trained = {k: v + 0.01 for k, v in load_file(str(Path(tiny_model_dir) /
                                                      "model.safetensors")).items()}
    save_file(trained, str(step / "model.safetensors"))
    (step / MARKER).write_text("ok\n")
    got = _built(monkeypatch)
    assert main(["sample", "a red circle", "--n", "1", "--config", CONFIG, "--checkpoint",
                 str(step), "--out", str(tmp_path / "s")]) == 0
    assert type(got["policy"]).__name__ == "TinyPolicy"
    assert torch.equal(got["policy"].state_dict()["head.weight"], trained["head.weight"])

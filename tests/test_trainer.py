"""Trainer tier (docs/design.md §12): CPU smoke run, exact resume, skip-on-NaN, user errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import stagerl.trainer as trainer_mod
from stagerl.cli import main
from stagerl.config import load_config
from stagerl.errors import UserError
from stagerl.rewards.base import RewardOutput, register_reward


@register_reward("test_redness")
class Redness:
    """Mean red-minus-green of the image: continuous, so groups are never tied."""

    name = "test_redness"

    def __call__(self, images, prompts, metadata):
        vals = [float((np.asarray(im, dtype=np.float32)[..., 0] -
                       np.asarray(im, dtype=np.float32)[..., 1]).mean() / 255.0) for im in images]
        return RewardOutput(torch.tensor(vals), torch.ones(len(vals), dtype=torch.bool))


@register_reward("test_nan")
class NaNReward:
    name = "test_nan"

    def __call__(self, images, prompts, metadata):
        return RewardOutput(torch.full((len(images),), float("nan")),
                            torch.ones(len(images), dtype=torch.bool))


def _cfg(tmp_path, model_dir, *extra):
    return load_config(None, [
        f"model.path={model_dir}", "reward.names=[test_redness]", "sampling.prompts_per_step=2",
        "sampling.group_size=4", "run.steps=2", f"run.out_dir={tmp_path}", "run.name=r",
        "log.eval_prompts=0", "log.image_every=1", "log.tensorboard=false", "optim.lr=1e-2",
        "log.progress=false", *extra])


def _rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_two_steps_change_every_parameter_not_the_reference(tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    built = {}
    real_build = trainer_mod.build_policy

    def spy(model_cfg, need_reference):
        pair = real_build(model_cfg, need_reference)
        built["pair"] = pair
        built["init"] = {k: v.clone() for k, v in pair.policy.state_dict().items()}
        return pair

    monkeypatch.setattr(trainer_mod, "build_policy", spy)
    # the second teacher-forced pass on, so that the adapter's sample/teacher-forcing gap is logged
    cfg = _cfg(tmp_path, tiny_model_dir, "sampling.reuse_sample_stats=false")
    result = trainer_mod.train(cfg)
    rows = _rows(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["loss/total"]) and r["train/skipped"] == 0.0
        assert r["rollout/logprob_gap"] < 1e-4  # sampling vs teacher-forced log-probs (fp32)
        for key in ("policy/entropy", "ref/entropy", "policy/kl_k3", "algo/w_mean",
                    "algo/m_mean", "adv/std", "optim/grad_norm", "optim/lr", "perf/rollout_s",
                    "policy/clip_frac", "perf/reward_s", "perf/samples_per_s"):
            assert key in r, key
        # within-group diversity of the G = 4 samples (quality.within_prompt_diversity)
        assert 0 < r["rollout/diversity/code_distance"] <= 1
        assert 0 < r["rollout/diversity/distinct_frac"] <= 1
    trained = result.policy.state_dict()
    ref = built["pair"].reference.state_dict()
    for name, p in built["pair"].policy.named_parameters():
        assert p.requires_grad
        assert not torch.equal(trained[name], built["init"][name]), f"{name} did not change"
        assert torch.equal(ref[name], built["init"][name]), f"reference {name} changed"
    assert (result.run_dir / "config.yaml").is_file()
    assert any((result.run_dir / "images").glob("rollout_step*.png"))
    assert (result.run_dir / "final").is_dir()


def test_resume_after_interruption_is_exact(tmp_path, tiny_model_dir, monkeypatch):
    extra = ["run.steps=4", "run.save_every=2"]
    full = trainer_mod.train(_cfg(tmp_path / "a", tiny_model_dir, *extra))

    real_save = trainer_mod.save_checkpoint

    def save_then_die(accelerator, root, state, cfg_yaml, **kw):
        path = real_save(accelerator, root, state, cfg_yaml, **kw)
        if state.step == 2:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint
        return path

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(_cfg(tmp_path / "b", tiny_model_dir, *extra))
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real_save)
    # a half-written later checkpoint (no COMPLETE marker) must be ignored by resume
    (tmp_path / "b" / "r" / "checkpoints" / "step_000003").mkdir()
    resumed = trainer_mod.train(_cfg(tmp_path / "b", tiny_model_dir, *extra, "run.resume=true"))

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]

    a, b = strip(_rows(full.run_dir)), strip(_rows(resumed.run_dir))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    sa, sb = full.policy.state_dict(), resumed.policy.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_non_finite_reward_is_skipped_then_stops(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "reward.names=[test_nan]", "run.steps=5",
               "run.max_consecutive_skips=2")
    with pytest.raises(trainer_mod.TrainingStopped, match="consecutive"):
        trainer_mod.train(cfg)
    rows = _rows(tmp_path / "r")
    assert [r["train/skipped"] for r in rows] == [1.0, 1.0]


def _run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_user_errors_give_one_line_and_exit_2(tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"prompt": oops}\n')
    base = [f"run.out_dir={tmp_path}", "log.eval_prompts=0", f"model.path={tiny_model_dir}"]
    cases = [
        (["train", f"data.source={bad}", *base], f"{bad}:2: malformed JSON"),
        (["train", "reward.names=[shapes_strictt]", *base], "unknown reward 'shapes_strictt'"),
        (["train", *base, "model.path=/nonexistent/ckpt"], "/nonexistent/ckpt"),
        (["train", "algo.betta=0.1"], "Did you mean 'algo.beta'"),
        (["train", "algo.beta=abc"], "algo.beta"),
        (["train", "data.source=/no/such/prompts.txt", *base], "prompt file not found"),
        (["train", "configs/missing.yaml"], "config file not found"),
    ]
    for argv, needle in cases:
        code, err = _run_cli(capsys, *argv)
        assert code == 2, argv
        assert needle in err, (argv, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_config_presets_and_explicit_override():
    cfg = load_config(None, ["algo.preset=vanilla_grpo"])
    assert (cfg.algo.reweight, cfg.algo.kl_reweight, cfg.algo.entropy_reward) == (False, False,
                                                                                  "off")
    cfg = load_config(None, ["algo.preset=wo_kl", "algo.entropy_coef=0.2"])
    assert cfg.algo.beta == 0.0 and cfg.algo.entropy_reward == "max_only"
    assert cfg.algo.entropy_coef == 0.2
    cfg = load_config("configs/shapes_grpo.yaml", ["algo.beta=0.01"])
    assert cfg.algo.preset == "vanilla_grpo" and cfg.algo.beta == 0.01
    with pytest.raises(UserError, match="preset"):
        load_config(None, ["algo.preset=nope"])


@pytest.mark.parametrize("agg", ["group_weighted_mean", "batch_weighted_mean", "seq_mean"])
def test_grad_accum_one_and_four_give_the_same_gradient(tmp_path, tiny_model_dir, agg):
    """The trainer's micro-batch loss (algo.stage_loss on sliced whole-rollout coefficients) adds
    up to the full-batch loss: grad_accum 1 and 4 give the same gradient."""
    from stagerl.config import needs_reference
    from stagerl.data import build_source
    from stagerl.policies import build_policy
    from stagerl.rewards.base import RewardSet
    from stagerl.rollout import rollout

    cfg = _cfg(tmp_path, tiny_model_dir, f"algo.loss_agg={agg}")
    torch.manual_seed(0)
    pair = build_policy(cfg.model, need_reference=needs_reference(cfg))
    items = build_source(cfg.data.source, 0, True).batch(0, 2)
    ro = rollout(pair.policy, pair.reference, items, 0, RewardSet(["test_redness"], {}), cfg,
                 seed=0)
    assert float(ro.advantages.abs().max()) > 0.1 and float(ro.token_weights.std()) > 0.01

    def grads(n_chunks):
        pair.policy.zero_grad(set_to_none=True)
        total = 0.0
        for idx in torch.arange(len(ro)).tensor_split(n_chunks):
            loss, _ = trainer_mod.micro_batch_loss(pair.policy, ro, idx, cfg)
            loss.backward()
            total += float(loss.detach())
        return total, {n: p.grad.clone() for n, p in pair.policy.named_parameters()
                       if p.grad is not None}

    loss1, g1 = grads(1)
    loss4, g4 = grads(4)
    assert loss4 == pytest.approx(loss1, rel=1e-5, abs=1e-7)
    assert g1 and set(g1) == set(g4)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-4, atol=1e-7)


@register_reward("test_constant")
class ConstantReward:
    """The same score for every image: every group is tied, so no advantage is ever non-zero."""

    name = "test_constant"

    def __call__(self, images, prompts, metadata):
        return RewardOutput(torch.ones(len(images)), torch.ones(len(images), dtype=torch.bool))


@register_reward("test_invalid")
class InvalidReward:
    """Cannot score anything (as a detector reward on prompts it does not understand)."""

    name = "test_invalid"

    def __call__(self, images, prompts, metadata):
        return RewardOutput(torch.zeros(len(images)), torch.zeros(len(images), dtype=torch.bool))


@pytest.mark.parametrize("reward, phrase", [("test_constant", "every group was tied"),
                                            ("test_invalid", "every sample was invalid")])
def test_no_reward_signal_stops_with_the_reason(tmp_path, tiny_model_dir, reward, phrase):
    cfg = _cfg(tmp_path, tiny_model_dir, f"reward.names=[{reward}]", "run.steps=6",
               "algo.preset=vanilla_grpo", "run.max_no_signal_steps=3")
    with pytest.raises(trainer_mod.TrainingStopped, match=phrase) as err:
        trainer_mod.train(cfg)
    assert "stopped at step 3" in str(err.value)
    assert not (tmp_path / "r" / "final").exists()


def test_diverging_run_stops_and_writes_no_final_model(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "optim.lr=1e3", "optim.grad_clip=0", "run.steps=4")
    with pytest.raises(trainer_mod.TrainingStopped, match="diverged") as err:
        trainer_mod.train(cfg)
    assert "run.max_weight_growth" in str(err.value)
    assert not (tmp_path / "r" / "final").exists()
    assert not list((tmp_path / "r").glob("checkpoints/step_*"))


def test_wandb_run_gets_the_resolved_config(tmp_path, tiny_model_dir, monkeypatch):
    """log.wandb=true hands W&B the whole resolved config (a fake wandb module stands in)."""
    import sys
    import types

    seen = {}

    class FakeRun:
        def log(self, metrics, step):
            seen.setdefault("steps", []).append(step)

        def finish(self):
            seen["finished"] = True

    import importlib.machinery

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: seen.update(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _cfg(tmp_path, tiny_model_dir, "log.wandb=true", "log.wandb_project=p", "run.steps=1")
    trainer_mod.train(cfg)
    assert seen["project"] == "p" and seen["config"]["optim"]["lr"] == 1e-2
    assert seen["config"]["algo"]["loss_agg"] == "group_weighted_mean" and seen["steps"]


def test_logged_lr_is_the_lr_each_step_used(tmp_path, tiny_model_dir):
    # optim/lr of step k is the rate its update ran with, not the schedule's next value (which
    # is 0 after the last step of a linear schedule).
    cfg = _cfg(tmp_path, tiny_model_dir, "run.steps=3", "optim.schedule=linear",
               "optim.warmup_steps=0", "log.image_every=0")
    result = trainer_mod.train(cfg)
    logged = [r["optim/lr"] for r in _rows(result.run_dir)]
    schedule = trainer_mod.lr_lambda(cfg)
    assert logged == pytest.approx([cfg.optim.lr * schedule(k) for k in range(3)])
    assert logged[-1] > 0

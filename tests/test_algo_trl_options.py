"""TRL's GRPO options against numbers from TRL's own code (docs/algorithm.md §10).

tests/fixtures/trl_grpo_reference.json holds seeded inputs and what TRL 1.16.0's
``GRPOTrainer._compute_loss`` (loss and d loss / d ℓ) and its reward-scaling block computed on them,
for each loss_type × importance-ratio level × bias-corrected KL, with β = 0.04 and asymmetric clip
bounds ε_low = 0.2, ε_high = 0.28 (how they were produced: docs/algorithm.md §10). Only the numbers
are kept; TRL is not a dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stagerl.algo import group_advantages, importance_ratio, stage_loss

REF = json.loads((Path(__file__).parent / "fixtures" / "trl_grpo_reference.json").read_text())
T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
# TRL's loss_type -> our aggregation (full masks: every image has L tokens)
AGG = {"grpo": "seq_mean", "bnpo": "token_mean", "dr_grpo": "constant", "dapo": "token_mean"}


def test_fixture_is_trl_1_16():
    assert REF["trl_version"] == "1.16.0"


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_adv_scale_matches_trl_scale_rewards(scale):
    rewards = T(REF["reward_columns"]).sum(dim=1)  # TRL: weights 1, sum then normalise
    gi = torch.arange(REF["N"]) // REF["G"]
    ours = group_advantages(rewards, gi, eps=1e-4, scale=scale)
    torch.testing.assert_close(ours, T(REF["adv"][scale]), rtol=0, atol=1e-12)


def test_adv_scales_differ_on_these_inputs():
    # the three reference vectors are distinct, so a wrong denominator cannot pass the test above
    a = {k: T(v) for k, v in REF["adv"].items()}
    assert (a["group"] - a["batch"]).abs().max() > 0.1
    assert (a["batch"] - a["none"]).abs().max() > 0.01


def test_unknown_adv_scale_is_refused():
    with pytest.raises(ValueError, match="unknown advantage scale 'std'"):
        group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), scale="std")


def _case_id(c):
    return f"{c['loss_type']}-{c['level']}-{'biaskl' if c['bias_kl'] else 'kl'}"


@pytest.mark.parametrize("case", REF["loss_cases"], ids=_case_id)
def test_loss_and_gradient_match_trl(case):
    logp = T(REF["logp"]).requires_grad_(True)
    loss, _ = stage_loss(logp, T(REF["old_logp"]), T(REF["advantages"]),
                         ref_logp=T(REF["ref_logp"]), beta=case["beta"], kl_estimator="k3",
                         clip_eps_low=case["eps_low"], clip_eps_high=case["eps_high"],
                         agg=AGG[case["loss_type"]], constant_normalizer=float(REF["L"]),
                         ratio_level=case["level"], kl_bias_correction=case["bias_kl"])
    loss.backward()
    # stage_loss computes in fp32: agreement to fp32 rounding
    assert loss.item() == pytest.approx(case["loss"], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(logp.grad, T(case["grad"]), rtol=1e-5, atol=1e-7)


def test_the_options_change_the_reference_numbers():
    # each option moves TRL's loss on these inputs, so each parity test above checks something
    by = {(c["loss_type"], c["level"], c["bias_kl"]): c["loss"] for c in REF["loss_cases"]}
    assert abs(by[("grpo", "token", False)] - by[("grpo", "sequence", False)]) > 1e-3
    assert abs(by[("grpo", "token", False)] - by[("grpo", "token", True)]) > 1e-4


def test_sequence_ratio_is_one_value_per_row_and_the_exp_of_the_mean_log_ratio():
    logp, old = T(REF["logp"]), T(REF["old_logp"])
    rho = importance_ratio(logp, old, level="sequence")
    assert torch.equal(rho, rho[:, :1].expand_as(rho))
    torch.testing.assert_close(rho[:, 0], torch.exp((logp - old).mean(dim=1)).float(),
                               rtol=1e-6, atol=0)


def test_batch_scale_leaves_silenced_groups_out_of_the_std():
    rewards = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    gi = torch.tensor([0, 0, 0, 1, 1, 1])
    counted = torch.tensor([True, True, True, False, False, False])
    a = group_advantages(rewards, gi, eps=1e-4, scale="batch", counted=counted)
    torch.testing.assert_close(a[:3], (rewards[:3] - 1.0) / (1.0 + 1e-4))  # std of [0, 1, 2] = 1
    b = group_advantages(rewards, gi, eps=1e-4, scale="batch")
    assert not torch.allclose(a[:3], b[:3])  # the placeholders would shrink the std


def test_the_rollout_uses_adv_scale():
    from stagerl.config import load_config
    from stagerl.rollout import score_rollout

    n, length = 6, 16
    cols = T(REF["reward_columns"])
    gi = torch.arange(n) // 3
    emb = torch.nn.functional.normalize(torch.randn(n, length, 4), dim=-1)
    for scale in ("group", "batch", "none"):
        cfg = load_config(overrides=["algo.preset=vanilla_grpo", f"algo.adv_scale={scale}",
                                     "reward.drop_tied_columns=false"])
        sc = score_rollout(cols, torch.ones_like(cols, dtype=torch.bool), gi, emb,
                           torch.rand(n, length), None, cfg, ["a", "b"], [None] * n)
        torch.testing.assert_close(sc.advantages, T(REF["adv"][scale]).float())

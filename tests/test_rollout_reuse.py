"""The rollout takes old log-probs and entropies from the sampling pass (no second policy pass):
they are the teacher-forced values of the same scored distribution."""

from __future__ import annotations

import pytest
import torch

from stagerl.config import load_config, needs_reference
from stagerl.data import build_source
from stagerl.policies import build_policy
from stagerl.policies.base import SamplingParams
from stagerl.policies.janus import JanusPolicy
from stagerl.policies.janus_tiny import build_tiny_janus
from stagerl.rewards.base import RewardSet
from stagerl.rollout import rollout
from tests.conftest import make_tiny_policy


@pytest.mark.parametrize("adapter", ["tiny", "janus"])
@pytest.mark.parametrize("mode", ["cond", "cfg"])
def test_sampling_stats_equal_teacher_forced_stats(adapter, mode):
    if adapter == "tiny":
        policy = make_tiny_policy().eval()
    else:
        policy = JanusPolicy(*build_tiny_janus())
    inputs = policy.encode_prompts(["a red circle", "two blue squares above a green triangle"])
    params = SamplingParams(cfg_scale=3.0, temperature=0.9, top_k=7, logprob_mode=mode)
    out = policy.sample(inputs, params, noise=torch.rand(2, policy.num_image_tokens))
    with torch.no_grad():
        tf = policy(inputs, out.tokens, logprob_mode=mode, cfg_scale=3.0, temperature=0.9)
    torch.testing.assert_close(out.logprobs, tf.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, tf.entropy, rtol=0, atol=1e-5)
    assert float(out.entropy.mean()) > 0.1  # a real distribution, not a degenerate one


def test_rollout_with_and_without_the_second_pass_agree(tmp_path, tiny_model_dir):
    import test_trainer  # noqa: F401  (registers test_redness)

    base = [f"model.path={tiny_model_dir}", "reward.names=[test_redness]",
            "sampling.prompts_per_step=2", "sampling.group_size=4", "log.eval_prompts=0"]
    rollouts = []
    for reuse in (True, False):
        cfg = load_config(None, [*base, f"sampling.reuse_sample_stats={str(reuse).lower()}"])
        torch.manual_seed(0)
        pair = build_policy(cfg.model, need_reference=needs_reference(cfg))
        items = build_source(cfg.data.source, 0, True).batch(0, 2)
        rollouts.append(rollout(pair.policy, pair.reference, items, 0,
                                RewardSet(["test_redness"], {}), cfg, seed=3))
    fast, slow = rollouts
    assert torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.old_logprobs, slow.old_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.entropy, slow.entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.advantages, slow.advantages, rtol=0, atol=1e-5)
    assert "rollout/logprob_gap" in slow.metrics and "rollout/logprob_gap" not in fast.metrics
    assert slow.metrics["rollout/logprob_gap"] <= 1e-5

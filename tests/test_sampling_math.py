"""One sampling path: the guidance / truncation / scored-statistics math lives in
stagerl.policies.sampling and every adapter uses it (docs/algorithm.md §1)."""

from __future__ import annotations

import pytest
import torch

from stagerl.policies.base import SamplingParams
from stagerl.policies.janus import JanusPolicy
from stagerl.policies.janus_tiny import build_tiny_janus
from stagerl.policies.sampling import (behaviour_logits, guide, inverse_cdf, scored_logits,
                                       token_stats, truncate_logits)
from tests.conftest import make_tiny_policy

V = 32  # the tiny policy's codebook; the tiny Janus has more codes, drawn ids stay below V


def test_truncation_hand_cases():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(truncate_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # softmax mass [0.64, 0.24, 0.09, 0.03]: p = 0.7 keeps the first two
    assert torch.isinf(truncate_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    # any p keeps the most likely token (the adapters used to disagree at p = 0)
    for p in (0.0, 1e-9, 0.5):
        assert torch.isinf(truncate_logits(logits, 0, p)).tolist() == [[False, True, True, True]]
    ties = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert not torch.isinf(truncate_logits(ties, 2, 1.0))[0, :3].any()  # ties at k are kept


def test_guidance_and_scored_distributions():
    c, u = torch.randn(3, V), torch.randn(3, V)
    torch.testing.assert_close(guide(c, u, 1.0), c)
    torch.testing.assert_close(guide(c, u, 5.0), u + 5.0 * (c - u))
    torch.testing.assert_close(scored_logits(c, u, "cond", 5.0, 2.0), c / 2.0)
    torch.testing.assert_close(scored_logits(c, u, "cfg", 5.0, 2.0), (u + 5.0 * (c - u)) / 2.0)
    torch.testing.assert_close(behaviour_logits(c, None, 5.0, 1.0), c)
    lp, ent = token_stats(c, torch.zeros(3, dtype=torch.long))
    ref = torch.log_softmax(c, -1)
    torch.testing.assert_close(lp, ref[:, 0])
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
    # the scored distribution's unconditional branch carries no gradient
    c.requires_grad_(True)
    u.requires_grad_(True)
    scored_logits(c, u, "cfg", 3.0, 1.0).sum().backward()
    assert u.grad is None and c.grad is not None


def test_inverse_cdf_picks_the_bucket_of_u():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]])
    assert inverse_cdf(probs, torch.tensor([0.05, 0.99])).tolist() == [0, 1]
    assert inverse_cdf(probs, torch.tensor([0.31, 0.5])).tolist() == [2, 1]


class _FixedHead(torch.nn.Module):
    """Returns the same [B, V] logits for every position, whatever the hidden state."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.table[: h.shape[0]]


@pytest.mark.parametrize("params", [SamplingParams(cfg_scale=3.0, temperature=0.9),
                                    SamplingParams(cfg_scale=2.0, top_k=5, logprob_mode="cfg"),
                                    SamplingParams(cfg_scale=1.0, top_p=0.6)])
def test_both_adapters_draw_and_score_identically_on_identical_logits(params, monkeypatch):
    n = 3
    table = torch.randn(2 * n, V, generator=torch.Generator().manual_seed(1)) * 2
    tiny = make_tiny_policy()
    tiny.head = _FixedHead(table)
    model, processor = build_tiny_janus()
    janus = JanusPolicy(model, processor)
    monkeypatch.setattr(janus, "_head", lambda h: table[: h.shape[0]].float())
    length = tiny.num_image_tokens
    noise = torch.rand(n, janus.num_image_tokens, generator=torch.Generator().manual_seed(2))
    a = tiny.sample(tiny.encode_prompts(["a red circle"] * n), params, noise=noise[:, :length])
    b = janus.sample(janus.encode_prompts(["a red circle"] * n), params, noise=noise)
    assert torch.equal(a.tokens, b.tokens[:, :length])
    torch.testing.assert_close(a.logprobs, b.logprobs[:, :length], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.behaviour_logprobs, b.behaviour_logprobs[:, :length], rtol=0,
                               atol=1e-6)


def test_one_sampling_loop_for_rollouts_and_evaluation():
    """sample_tokens is the loop every caller uses: evaluation's chunk noise reproduces a sampler
    that steps a seeded generator itself, and the tokens do not depend on the micro-batching."""
    from stagerl.policies.sampling import chunk_noise, group_noise, sample_tokens

    policy = make_tiny_policy().eval()
    prompts = ["a red circle", "two blue squares", "a green triangle"] * 2
    params = SamplingParams(cfg_scale=2.0, top_k=5)
    n, length = len(prompts), policy.num_image_tokens
    inputs = policy.encode_prompts(prompts)
    own = policy.sample(inputs, params, generator=torch.Generator().manual_seed(7)).tokens
    _, toks, lps, ents = sample_tokens(policy, prompts, params, chunk_noise(7, n, length))
    assert torch.equal(toks, own)
    assert lps.shape == ents.shape == (n, length)
    noise = group_noise([1, 2, 3], 2, length)
    whole = sample_tokens(policy, prompts, params, noise)[1]
    assert torch.equal(sample_tokens(policy, prompts, params, noise, micro=4)[1], whole)
    assert not torch.equal(sample_tokens(policy, prompts, params, chunk_noise(8, n, length))[1],
                           own)  # the noise is what decides the draw

"""ρ, clipping, the loss aggregations, the KL term and their sum (docs/algorithm.md §5, §4)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stagerl.algo import LOSS_AGGREGATIONS, kl_divergence, kl_loss, policy_loss, stage_loss
from stagerl.errors import UserError


def ratio_one_batch():
    # N = 2, L = 2, ρ = 1 (ℓ^old = ℓ), A = [1, −3], w = [[1, 0], [0.5, 0.5]].
    # Σ w·A·ρ = 1·1 + 0·1 + 0.5·(−3) + 0.5·(−3) = −2.
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.125, 0.5]]))
    adv = torch.tensor([1.0, -3.0])
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    return logp, adv, w


@pytest.mark.parametrize("agg, expected", [
    ("group_weighted_mean", 2.0 / (2.0 + 1e-6)),  # one group (no index): −(−2) / (Σw + 1e-6)
    ("batch_weighted_mean", 2.0 / (2.0 + 1e-6)),  # −(−2) / (Σw = 2 + 1e-6)
    ("token_mean", 0.5),  # −(−2) / 4 tokens
    ("seq_mean", 0.5),  # seq 0: −(1)/2 = −0.5; seq 1: −(−3)/2 = 1.5; mean = 0.5
    ("constant", 0.5),  # −(−2) / (N·L = 2·2)
])
def test_aggregations_hand_example(agg, expected):
    logp, adv, w = ratio_one_batch()
    loss, _ = policy_loss(logp, logp.detach(), adv, w, agg=agg)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("agg, expected", [
    # mask drops token (1, 1): Σ w·A over real tokens = 1 − 1.5 = −0.5.
    ("group_weighted_mean", 0.5 / 1.500001),  # one group: Σw over real tokens = 1.5
    ("batch_weighted_mean", 0.5 / 1.500001),  # Σw over real tokens = 1.5
    ("token_mean", 0.5 / 3),  # 3 real tokens
    ("seq_mean", 0.5),  # seq 0: −1/2 = −0.5; seq 1: −(0.5·−3)/1 = 1.5; mean 0.5
    ("constant", 0.5 / 40),  # N·C = 2·20 with constant_normalizer = 20
])
def test_aggregations_with_mask(agg, expected):
    logp, adv, w = ratio_one_batch()
    logp = logp.clone()
    logp[1, 1] = float("-inf")  # a padded token's log-prob must not leak into the sum
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = policy_loss(logp, logp.detach(), adv, w, agg=agg, mask=mask,
                          constant_normalizer=20.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_registry_and_bad_name():
    assert set(LOSS_AGGREGATIONS) == {"group_weighted_mean", "batch_weighted_mean", "token_mean",
                                      "seq_mean", "constant"}
    logp, adv, _ = ratio_one_batch()
    with pytest.raises(UserError, match="token_mean"):
        policy_loss(logp, logp, adv, agg="sum")
    with pytest.raises(UserError, match="clip_eps_low"):
        policy_loss(logp, logp, adv, clip_eps_high=0.2)


def clip_batch():
    # N = 4, L = 1: A = [1, −1, 1, −1], ρ = [1.5, 0.5, 0.5, 1.5].
    old = torch.log(torch.full((4, 1), 0.2))
    logp = (old + torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]]))).requires_grad_(True)
    return logp, old, torch.tensor([1.0, -1.0, 1.0, -1.0])


def test_clipping_hand_example_asymmetric():
    # ε_low = 0.2, ε_high = 0.3 -> clip(ρ) = [1.3, 0.8, 0.8, 1.3].
    # surrogate = min(A·ρ, A·clip(ρ)):
    #   token 0: min(1.5, 1.3)   = 1.3  (clipped: no gradient)
    #   token 1: min(−0.5, −0.8) = −0.8 (clipped: no gradient)
    #   token 2: min(0.5, 0.8)   = 0.5  (unclipped)
    #   token 3: min(−1.5, −1.3) = −1.5 (unclipped)
    # token_mean loss = −(1.3 − 0.8 + 0.5 − 1.5)/4 = 0.125; clip_frac = 2/4.
    # d loss / dℓ = −A·ρ/4 on unclipped tokens: token 2 −0.125, token 3 +0.375.
    logp, old, adv = clip_batch()
    loss, metrics = policy_loss(logp, old, adv, clip_eps_low=0.2, clip_eps_high=0.3,
                                agg="token_mean")
    assert loss.item() == pytest.approx(0.125, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    assert metrics["ratio_max"] == pytest.approx(1.5, abs=1e-6)
    assert metrics["ratio_min"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [0.0], [-0.125], [0.375]]))
    assert all(isinstance(v, float) for v in metrics.values())


def test_clipping_symmetric_default():
    # ε_high defaults to ε_low = 0.2: token 0 becomes min(1.5, 1.2) = 1.2.
    # loss = −(1.2 − 0.8 + 0.5 − 1.5)/4 = 0.15.
    logp, old, adv = clip_batch()
    loss, _ = policy_loss(logp, old, adv, clip_eps_low=0.2, agg="token_mean")
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    unclipped, metrics = policy_loss(logp, old, adv, agg="token_mean")
    # no clipping: −(1.5 − 0.5 + 0.5 − 1.5)/4 = 0
    assert unclipped.item() == pytest.approx(0.0, abs=1e-6) and metrics["clip_frac"] == 0.0


def test_gradient_equals_minus_mean_advantage_times_score():
    # With ρ = 1 (one update per rollout), w = 1 and β = 0, ∇L = −mean_{i,t}(A_i ∇ℓ_{i,t}).
    # Reference: one autograd call per token on a tiny softmax policy, summed by hand.
    torch.manual_seed(0)
    n, length, vocab, feat = 3, 4, 5, 6
    x = torch.randn(n, length, feat)
    tokens = torch.randint(0, vocab, (n, length))
    weight = torch.randn(feat, vocab, requires_grad=True)
    adv = torch.tensor([1.5, -0.5, -1.0])

    def logprobs():
        lp = torch.log_softmax(x @ weight, dim=-1)
        return lp.gather(-1, tokens[..., None]).squeeze(-1)  # [N, L] ℓ

    expected = torch.zeros_like(weight)
    for i in range(n):
        for t in range(length):
            (grad,) = torch.autograd.grad(logprobs()[i, t], weight)
            expected -= adv[i] * grad / (n * length)
    for agg in sorted(LOSS_AGGREGATIONS):
        logp = logprobs()
        loss, _ = stage_loss(logp, logp.detach(), adv, beta=0.0, agg=agg)
        (grad,) = torch.autograd.grad(loss, weight)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_weights_are_constants():
    logp, adv, w = ratio_one_batch()
    logp = logp.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, logp.detach(), adv.requires_grad_(True), w)
    loss.backward()
    assert w.grad is None and adv.grad is None and logp.grad is not None


def test_kl_loss_hand_example():
    # KL = [[1, 2], [3, 4]], m = [[1, 0.5], [0.5, 1]], β = 0.1:
    #   Σ m·KL = 1 + 1 + 1.5 + 4 = 7.5; / 4 tokens = 1.875; × β = 0.1875.
    kl = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    loss, metrics = kl_loss(kl, m, beta=0.1)
    assert loss.item() == pytest.approx(0.1875)
    assert metrics["mean"] == pytest.approx(2.5)  # unweighted
    assert metrics["weighted_mean"] == pytest.approx(1.875)
    assert metrics["m_mean"] == pytest.approx(0.75)
    # plain KL (m = 1): 10/4 · 0.1 = 0.25; masked (drop the 4): 6/3 · 0.1 = 0.2
    assert kl_loss(kl, None, beta=0.1)[0].item() == pytest.approx(0.25)
    mask = torch.tensor([[True, True], [True, False]])
    assert kl_loss(kl, None, beta=0.1, mask=mask)[0].item() == pytest.approx(0.2)


def test_kl_loss_beta_zero_is_exact_zero_even_with_inf():
    loss, _ = kl_loss(torch.tensor([[float("inf"), 1.0]]), None, beta=0.0)
    assert loss.item() == 0.0


def test_stage_loss_sums_terms_and_namespaces_metrics():
    torch.manual_seed(1)
    logp = torch.randn(4, 6).clamp(max=-0.1).requires_grad_(True)
    ref = torch.randn(4, 6).clamp(max=-0.1)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    w = torch.rand(4, 6)
    m = 0.5 + 0.5 * torch.rand(4, 6)
    total, metrics = stage_loss(logp, logp.detach(), adv, ref_logp=ref, token_weights=w,
                                kl_weights=m, beta=0.03)
    pg, _ = policy_loss(logp, logp.detach(), adv, w)
    kl_term, _ = kl_loss(kl_divergence(logp, ref), m, beta=0.03)
    assert total.item() == pytest.approx((pg + kl_term).item(), rel=1e-6)
    assert metrics["loss/pg"] == pytest.approx(pg.item(), rel=1e-6)
    assert metrics["loss/kl"] == pytest.approx(kl_term.item(), rel=1e-6)
    for key in ("policy/clip_frac", "policy/ratio_mean", "kl/weighted_mean", "kl/max", "loss/total"):
        assert isinstance(metrics[key], float)
    # β = 0 with a reference: the KL is measured but not optimised.
    total0, metrics0 = stage_loss(logp, logp.detach(), adv, ref_logp=ref, beta=0.0)
    assert metrics0["loss/kl"] == 0.0 and metrics0["kl/weighted_mean"] > 0
    assert "kl/mean" not in metrics0  # the rollout's policy/kl_k3 is the one KL to the reference
    with pytest.raises(ValueError, match="ref_logp"):
        stage_loss(logp, logp.detach(), adv, beta=0.1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), length=st.integers(1, 20), seed=st.integers(0, 10_000),
       eps=st.floats(0.05, 0.5), agg=st.sampled_from(sorted(LOSS_AGGREGATIONS)))
def test_policy_loss_matches_loop_reference(n, length, seed, eps, agg):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, length, generator=gen, dtype=torch.float64) * 3
    logp = old + (torch.rand(n, length, generator=gen, dtype=torch.float64) - 0.5)
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.rand(n, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, length, generator=gen) < 0.8
    loss, metrics = policy_loss(logp, old, adv, w, clip_eps_low=eps, clip_eps_high=eps * 1.5,
                                agg=agg, mask=mask)
    total, wsum, tokens, clipped, seq_terms = 0.0, 0.0, 0, 0, []
    for i in range(n):
        seq_total, seq_tokens = 0.0, 0
        for t in range(length):
            if not mask[i, t]:
                continue
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            clipped_rho = min(max(rho, 1 - eps), 1 + eps * 1.5)
            surrogate = min(a * rho, a * clipped_rho)
            clipped += a * clipped_rho < a * rho
            total += -w[i, t].item() * surrogate
            seq_total += -w[i, t].item() * surrogate
            wsum += w[i, t].item()
            tokens += 1
            seq_tokens += 1
        if seq_tokens:
            seq_terms.append(seq_total / seq_tokens)
    expected = {"group_weighted_mean": total / (wsum + 1e-6),  # no group index: one group
                "batch_weighted_mean": total / (wsum + 1e-6), "token_mean": total / max(tokens, 1),
                "seq_mean": sum(seq_terms) / max(len(seq_terms), 1),
                "constant": total / (n * length)}[agg]
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert metrics["clip_frac"] == pytest.approx(clipped / max(tokens, 1), abs=1e-6)

"""How the policy loss is normalised (docs/algorithm.md §5) and the weight logic that feeds it (§4).

The authors ran one prompt per GPU, normalised each GPU's loss by its own Σw and let DDP average the
gradients: the objective is the mean over groups of per-group Σw-normalised losses. These tests pin
that objective, show it does not depend on how groups are spread over processes or micro-batches,
and check that the trainer's micro-batch loss is this same function.
"""

from __future__ import annotations

import pytest
import torch

from stagerl import algo
from stagerl.algo import LOSS_AGGREGATIONS, loss_coefficients, loss_weights, policy_loss
from stagerl.config import AlgoConfig
from stagerl.errors import UserError


def two_groups():
    # Group 0 = rows 0-1, group 1 = rows 2-3; L = 2, ρ = 1.
    #   group 0: A = [1, −1], w = [[1, 1], [0.5, 0.5]]: Σ w·A = 2 − 1 = 1, Σw = 3
    #   group 1: A = [2, −2], w = [[0, 0], [0, 1]]:     Σ w·A = −2,       Σw = 1
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.25], [0.5, 0.25], [0.5, 0.25]]))
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    w = torch.tensor([[1.0, 1.0], [0.5, 0.5], [0.0, 0.0], [0.0, 1.0]])
    gi = torch.tensor([0, 0, 1, 1])
    return logp, adv, w, gi


@pytest.mark.parametrize("agg, expected", [
    # mean over groups of −Σ_g wAρ / (Σ_g w + 1e-6): (−1/3 + 2/1) / 2
    ("group_weighted_mean", (-1 / (3 + 1e-6) + 2 / (1 + 1e-6)) / 2),
    # one Σw over the batch: −(1 − 2) / (4 + 1e-6)
    ("batch_weighted_mean", 1 / (4 + 1e-6)),
    ("token_mean", 1 / 8),  # −(−1) / 8 tokens
    # per sequence: −[2, −1, 0, −2] / 2 tokens, mean over 4 sequences = (−1 + 0.5 + 0 + 1) / 4
    ("seq_mean", 0.5 / 4),
    ("constant", 1 / 8),  # −(−1) / (N·L)
])
def test_two_group_hand_example(agg, expected):
    logp, adv, w, gi = two_groups()
    loss, _ = policy_loss(logp, logp.detach(), adv, w, agg=agg, group_index=gi)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_all_zero_group_dilutes_instead_of_dropping_out():
    # Group 1's weights are all 0: its loss is 0 / 1e-6 = 0, and it still counts in the mean, so
    # the step is half of group 0's alone (the authors' DDP average over GPUs did the same).
    logp, adv, w, gi = two_groups()
    w = w.clone()
    w[2:] = 0.0
    loss, _ = policy_loss(logp, logp.detach(), adv, w, agg="group_weighted_mean", group_index=gi)
    alone, _ = policy_loss(logp[:2], logp[:2].detach(), adv[:2], w[:2], agg="group_weighted_mean")
    assert loss.item() == pytest.approx(alone.item() / 2, rel=1e-6)
    batch, _ = policy_loss(logp, logp.detach(), adv, w, agg="batch_weighted_mean")
    assert batch.item() == pytest.approx(alone.item(), rel=1e-6)  # the old objective: drops out


def test_vanilla_group_mean_is_the_plain_token_mean_per_group():
    # w = 1 (vanilla GRPO): each group's token mean, then the mean over groups; with equal group
    # sizes that is the plain token mean of the batch, tied (A = 0) groups included.
    torch.manual_seed(0)
    logp = -torch.rand(12, 5, dtype=torch.float64)
    adv = torch.randn(12, dtype=torch.float64)
    adv[8:] = 0.0  # a tied group
    gi = torch.arange(3).repeat_interleave(4)
    loss, _ = policy_loss(logp, logp.detach(), adv, None, agg="group_weighted_mean", group_index=gi)
    plain = -(adv[:, None] * torch.ones_like(logp)).mean()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)  # fp32 coefficients


def _grad(loss_fn, weight):
    (g,) = torch.autograd.grad(loss_fn(), weight)
    return g


def _toy_policy(n, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 6, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 5, (n, length), generator=gen)
    weight = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def logp(rows):
        lp = torch.log_softmax(x[rows] @ weight, dim=-1)
        return lp.gather(-1, tokens[rows][..., None]).squeeze(-1)  # [n, L] ℓ

    return logp, weight


def test_one_process_equals_two_processes_under_group_weighted_mean():
    # 4 groups of 3. One process holds all; two processes hold 2 groups each, normalise locally
    # and DDP averages their gradients. The objective must not depend on that split.
    torch.manual_seed(3)
    n, length = 12, 7
    logp, weight = _toy_policy(n, length)
    gi = torch.arange(4).repeat_interleave(3)
    adv = torch.randn(n, dtype=torch.float64)
    w = torch.rand(n, length, dtype=torch.float64)
    w[3:6] = 0.0  # one all-zero group

    def loss(rows, agg):
        lp = logp(rows)
        return policy_loss(lp, lp.detach(), adv[rows], w[rows], agg=agg, group_index=gi[rows])[0]

    everything = torch.arange(n)
    halves = (torch.arange(6), torch.arange(6, 12))
    full = _grad(lambda: loss(everything, "group_weighted_mean"), weight)
    ddp = sum(_grad(lambda r=r: loss(r, "group_weighted_mean"), weight) for r in halves) / 2
    torch.testing.assert_close(ddp, full, rtol=1e-12, atol=1e-12)
    # The whole-batch Σw is a different objective: it changes with the split.
    full_b = _grad(lambda: loss(everything, "batch_weighted_mean"), weight)
    ddp_b = sum(_grad(lambda r=r: loss(r, "batch_weighted_mean"), weight) for r in halves) / 2
    assert not torch.allclose(ddp_b, full_b, rtol=1e-3)


@pytest.mark.parametrize("agg", sorted(LOSS_AGGREGATIONS))
def test_micro_batches_add_up_to_the_full_batch(agg):
    torch.manual_seed(4)
    n, length = 8, 5
    logp, weight = _toy_policy(n, length, seed=1)
    gi = torch.arange(2).repeat_interleave(4)
    adv = torch.randn(n, dtype=torch.float64)
    w = torch.rand(n, length, dtype=torch.float64)
    coef = loss_coefficients(w, agg=agg, group_index=gi)

    def loss(rows):
        lp = logp(rows)
        return policy_loss(lp, lp.detach(), adv[rows], coefficients=coef[rows])[0]

    full = _grad(lambda: loss(torch.arange(n)), weight)
    direct = _grad(lambda: policy_loss(logp(torch.arange(n)), logp(torch.arange(n)).detach(), adv,
                                       w, agg=agg, group_index=gi)[0], weight)
    micro = sum(_grad(lambda r=r: loss(r), weight) for r in torch.arange(n).tensor_split(4))
    torch.testing.assert_close(full, direct, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(micro, full, rtol=1e-6, atol=1e-7)


def test_every_aggregation_is_its_own_branch():
    # On this example every registered aggregation gives a different value, so a name routed to
    # another branch (or to a default) would be caught; an unknown name is an error.
    logp, adv, w, gi = two_groups()
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    values = {agg: round(policy_loss(logp, logp.detach(), adv, w, agg=agg, group_index=gi,
                                     mask=mask, constant_normalizer=3.0)[0].item(), 6)
              for agg in LOSS_AGGREGATIONS}
    assert len(set(values.values())) == len(values), values
    with pytest.raises(UserError, match="group_weighted_mean"):
        loss_coefficients(w, agg="weighted_token_mean")


def test_config_choices_come_from_the_registries():
    import dataclasses

    meta = {f.name: f.metadata for f in dataclasses.fields(AlgoConfig)}
    assert set(meta["loss_agg"]["choices"]) == set(LOSS_AGGREGATIONS)
    assert set(meta["kl_estimator"]["choices"]) == set(algo.KL_ESTIMATORS)
    assert set(meta["partner_set"]["choices"]) == set(algo.PARTNER_SETS)
    assert set(meta["entropy_reward"]["choices"]) == set(algo.ENTROPY_MODES)
    assert AlgoConfig().loss_agg == "group_weighted_mean"


def test_loss_weights_tied_invalid_and_reweight_off():
    c_bar = torch.tensor([[0.2, -0.6], [0.2, -0.6], [0.4, 0.0], [0.4, 0.0]])
    tied = torch.tensor([False, False, True, True])
    silenced = torch.tensor([True, True, False, False])
    w_from_c = (1 - c_bar) / 2
    m_from_c = 0.5 + 0.5 * (c_bar + 1).clamp(0, 1)
    # Reweighting off (vanilla, +Ent): w = 1 everywhere, tied and silenced groups included.
    w, m = loss_weights(c_bar, reweight=False, kl_reweight=False, group_tied=tied,
                        silenced=silenced)
    assert torch.equal(w, torch.ones_like(c_bar)) and torch.equal(m, torch.ones_like(c_bar))
    # Reweighting on: tied rule (w = 0, m = 1) on tied and silenced groups ...
    w, m = loss_weights(c_bar, reweight=True, kl_reweight=True, group_tied=tied, silenced=silenced)
    assert torch.equal(w, torch.zeros_like(w))
    assert torch.equal(m, torch.ones_like(m))
    # ... but the entropy reward gives tied groups a signal: only silenced groups keep the rule.
    w, m = loss_weights(c_bar, reweight=True, kl_reweight=True, group_tied=tied,
                        silenced=silenced, entropy_reward_on=True)
    torch.testing.assert_close(w[2:], w_from_c[2:])
    torch.testing.assert_close(m[2:], m_from_c[2:])
    assert torch.equal(w[:2], torch.zeros(2, 2))
    # No flags: plain formulas.
    w, m = loss_weights(c_bar, reweight=True, kl_reweight=False)
    torch.testing.assert_close(w, w_from_c)
    assert torch.equal(m, torch.ones_like(m))


def test_tied_group_entropy_advantages_match_fp64():
    # A fully tied group (R = 1 for all): the entropy bonus alone sets the advantages. Entropies
    # arrive in fp32 with gaps of ~1e-3 nats; the fp32 result must match an fp64 computation.
    torch.manual_seed(5)
    G = 8
    ref = (2.0 + torch.rand(G) * 1e-3).float()
    pol = (ref + torch.randn(G) * 1e-2).float()
    rewards = torch.ones(G)
    gi = torch.zeros(G, dtype=torch.long)

    def advantages(dtype):
        r, bonus = algo.entropy_reward(rewards.to(dtype), pol.to(dtype), ref.to(dtype), gi,
                                       mode="max_only", coef=0.4)
        return algo.group_advantages(r, gi)

    exact = advantages(torch.float64)
    assert exact.abs().max() > 0.1  # a full-size signal, not noise
    # 1 − e computed as d²/(1 + d²): exact to fp32 rounding even where e ≈ 1.
    d = ref.double() - pol.double()
    torch.testing.assert_close(algo.entropy_gap(pol, ref).double(), d * d / (1 + d * d),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(algo.entropy_gap(pol.double(), ref.double()), d * d / (1 + d * d),
                               rtol=1e-12, atol=0)
    # The trainer does its reward arithmetic in fp64 (rollout.score_rollout).
    torch.testing.assert_close(advantages(torch.float64).float(), exact.float(), rtol=0, atol=1e-6)

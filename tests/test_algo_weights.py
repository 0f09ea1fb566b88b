"""s_ij, P_i, c̄, w and m (docs/algorithm.md §4, §4): hand-worked cases, the authors' parity behaviour, the
batched einsum against a plain per-pair loop, and properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stagerl.algo import (SIGN_ZERO_TOL, apply_tied_rule, group_advantages, kl_weights,
                          mean_opposite_similarity, pairwise_similarity, token_weights)


def loop_c_bar(emb: torch.Tensor, adv: torch.Tensor, index: torch.Tensor,
               partner_set: str) -> torch.Tensor:
    """Reference in the shape of the authors' loop: for every i, for every j of its group, a
    per-pair cosine over the L positions, summed over the partners and divided by their count."""
    n, length, _ = emb.shape
    out = torch.zeros(n, length, dtype=torch.float64)
    for i in range(n):
        total = torch.zeros(length, dtype=torch.float64)
        count = 0
        for j in range(n):
            if index[j] != index[i]:
                continue
            a_i, a_j = adv[i].item(), adv[j].item()
            # |A| ≤ SIGN_ZERO_TOL counts as 0 under both partner sets.
            s_i = 0 if abs(a_i) <= SIGN_ZERO_TOL else (1 if a_i > 0 else -1)
            s_j = 0 if abs(a_j) <= SIGN_ZERO_TOL else (1 if a_j > 0 else -1)
            if partner_set == "fixed":
                partner = j != i and s_i * s_j < 0
            else:
                partner = s_i * s_j <= 0
            if not partner:
                continue
            count += 1
            if i != j:  # parity: s_ii is counted as 0 (in the count, not in the sum)
                total += F.cosine_similarity(emb[i].double(), emb[j].double(), dim=-1)
        out[i] = total / count if count else 0.0
    return out


def unit(*xy: float) -> list[float]:
    v = torch.tensor(xy)
    return (v / v.norm()).tolist()


# ---------------------------------------------------------------------------- hand-computed


def hand_group():
    # One group of 3, L = 2 positions, D = 2.
    # t = 0: q_0 = (1, 0), q_1 = (0, 1),  q_2 = (1, 0)      -> s_01 = 0,  s_02 = 1,   s_12 = 0
    # t = 1: q_0 = (1, 0), q_1 = (−1, 0), q_2 = (0.6, 0.8)  -> s_01 = −1, s_02 = 0.6, s_12 = −0.6
    emb = torch.tensor([[[1.0, 0.0], [1.0, 0.0]],
                        [[0.0, 1.0], [-1.0, 0.0]],
                        [[1.0, 0.0], [0.6, 0.8]]])
    return emb, torch.tensor([2, 2, 2])


def test_pairwise_similarity_hand_example():
    emb, index = hand_group()
    s, order = pairwise_similarity(emb, index)
    assert s.shape == (1, 3, 3, 2) and order.tolist() == [0, 1, 2]
    torch.testing.assert_close(s[0, :, :, 0], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    torch.testing.assert_close(s[0, :, :, 1], torch.tensor([[1.0, -1, 0.6], [-1, 1, -0.6],
                                                            [0.6, -0.6, 1]]))


def test_fixed_c_bar_w_m_hand_example():
    # A = [1, −0.5, −0.5]: P_0 = {1, 2}, P_1 = {0}, P_2 = {0}.
    # t = 0: c̄_0 = (0 + 1)/2 = 0.5, c̄_1 = s_10 = 0, c̄_2 = s_20 = 1.
    # t = 1: c̄_0 = (−1 + 0.6)/2 = −0.2, c̄_1 = −1, c̄_2 = 0.6.
    emb, index = hand_group()
    c_bar = mean_opposite_similarity(emb, torch.tensor([1.0, -0.5, -0.5]), index, "fixed")
    torch.testing.assert_close(c_bar, torch.tensor([[0.5, -0.2], [0.0, -1.0], [1.0, 0.6]]))
    # w = clamp((1 − c̄)/2, 0, 1): t0 [0.25, 0.5, 0], t1 [0.6, 1.0, 0.2].
    torch.testing.assert_close(token_weights(c_bar), torch.tensor([[0.25, 0.6], [0.5, 1.0],
                                                                   [0.0, 0.2]]))
    # m = 0.5 + 0.5·clamp(c̄ + 1, 0, 1): c̄ ≥ 0 -> 1; c̄ = −0.2 -> 0.9; c̄ = −1 -> 0.5.
    torch.testing.assert_close(kl_weights(c_bar), torch.tensor([[1.0, 0.9], [1.0, 0.5],
                                                                [1.0, 1.0]]))


def zero_member_group():
    # One group of 3, L = 1: q_0 = (1, 0), q_1 = (0.6, 0.8), q_2 = (0, 1); A = [1, 0, −1].
    # s_01 = 0.6, s_02 = 0, s_12 = 0.8.
    emb = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]], [[0.0, 1.0]]])
    return emb, torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0, 0, 0])


def test_parity_zero_advantage_member_and_self_inclusion():
    # parity: P_i = {j : A_i·A_j ≤ 0}.
    #   P_0 = {1, 2} (A_1 = 0 counts)           -> c̄_0 = (0.6 + 0)/2 = 0.3
    #   P_1 = {0, 1, 2} (A_1 = 0: i itself, s_11 counted as 0) -> (0.6 + 0 + 0.8)/3 = 0.46667
    #   P_2 = {0, 1}                            -> (0 + 0.8)/2 = 0.4
    emb, adv, index = zero_member_group()
    c_bar = mean_opposite_similarity(emb, adv, index, "parity")
    torch.testing.assert_close(c_bar, torch.tensor([[0.3], [1.4 / 3], [0.4]]))


def test_fixed_ignores_zero_advantage_members():
    # fixed: P_0 = {2} -> s_02 = 0; P_1 = {} -> 0; P_2 = {0} -> 0.
    emb, adv, index = zero_member_group()
    c_bar = mean_opposite_similarity(emb, adv, index, "fixed")
    torch.testing.assert_close(c_bar, torch.zeros(3, 1))
    # ... and with a different geometry, to show P_0 = {2} exactly: q_2 = (0.6, 0.8) -> s_02 = 0.6.
    emb2 = emb.clone()
    emb2[2, 0] = torch.tensor([0.6, 0.8])
    c_bar2 = mean_opposite_similarity(emb2, adv, index, "fixed")
    torch.testing.assert_close(c_bar2, torch.tensor([[0.6], [0.0], [0.6]]))


def test_all_tied_group_parity_vs_fixed_and_tied_rule():
    # A group whose rewards are all equal: group_advantages gives A = 0 exactly.
    # parity: every j is a partner of every i, s_ii = 0:
    #   c̄_i = (Σ_{j≠i} s_ij) / 3 -> with s_01 = 0.6, s_02 = 0, s_12 = 0.8:
    #   c̄ = [0.6/3, 1.4/3, 0.8/3].   fixed: every P_i is empty -> c̄ = 0.
    emb, _, index = zero_member_group()
    adv = group_advantages(torch.tensor([0.1, 0.1, 0.1]), index)
    assert (adv == 0).all()
    parity = mean_opposite_similarity(emb, adv, index, "parity")
    torch.testing.assert_close(parity, torch.tensor([[0.2], [1.4 / 3], [0.8 / 3]]))
    fixed = mean_opposite_similarity(emb, adv, index, "fixed")
    assert (fixed == 0).all()
    # Tied-group rule (docs/algorithm.md §4.6): entropy reward off -> c̄ = 1 -> w = 0 and m = 1, whatever c̄ was.
    tied = torch.tensor([True, True, True])
    for c_bar in (parity, fixed):
        assert (token_weights(c_bar, tied, entropy_reward_on=False) == 0).all()
        assert (kl_weights(c_bar, tied, entropy_reward_on=False) == 1).all()
    # With the entropy reward on, the tied group carries signal: no override.
    torch.testing.assert_close(token_weights(fixed, tied, entropy_reward_on=True),
                               torch.full((3, 1), 0.5))


def test_tied_rule_only_touches_tied_groups():
    c_bar = torch.tensor([[-1.0, 0.0], [-1.0, 0.5]])
    out = apply_tied_rule(c_bar, torch.tensor([False, True]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0], [1.0, 1.0]]))


def test_parity_empty_partner_set_gives_zero_not_nan():
    # All-positive advantages (not centred) leave P_i empty; the authors' 0/0 is NaN, ours is 0.
    emb, _, index = zero_member_group()
    c_bar = mean_opposite_similarity(emb, torch.tensor([1.0, 2.0, 3.0]), index, "parity")
    assert (c_bar == 0).all()


def test_sign_tolerance_under_both_partner_sets():
    # A residual |A| ≤ 1e-6 counts as 0 under fixed (not a partner of anyone) and under parity
    # (a partner of everyone, itself included): the same c̄ as an exact 0 (see above).
    emb, _, index = zero_member_group()
    adv = torch.tensor([1.0, 1e-8, -1.0])
    fixed = mean_opposite_similarity(emb, adv, index, "fixed")
    torch.testing.assert_close(fixed, torch.zeros(3, 1))
    parity = mean_opposite_similarity(emb, adv, index, "parity")
    torch.testing.assert_close(parity, torch.tensor([[0.3], [1.4 / 3], [0.4]]))
    # Just above the tolerance the sign counts: P_0 = {2} -> 0; P_1 = {2} -> 0.8; P_2 = {0, 1}.
    above = mean_opposite_similarity(emb, torch.tensor([1.0, 2 * SIGN_ZERO_TOL, -1.0]), index,
                                     "parity")
    torch.testing.assert_close(above, torch.tensor([[0.0], [0.8], [0.4]]))


@pytest.mark.parametrize("residual", [2e-16, -2e-16])
def test_parity_rounding_residual_gives_the_weights_of_an_exact_zero(residual):
    # A member at its group mean has A = 0 by construction, but the fp64 advantages of a group
    # whose entropy bonus does not cancel exactly leave it at ±2e-16. Its sign must not flip its
    # partner set, and with it c̄, w and m of the whole group (docs/algorithm.md §4.2).
    gen = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(4, 6, 3, generator=gen), dim=-1)
    index = torch.zeros(4, dtype=torch.long)
    exact = torch.tensor([1.2, 0.0, 0.0, -1.2])
    noisy = torch.tensor([1.2, residual, 0.0, -1.2])
    want = mean_opposite_similarity(emb, exact, index, "parity")
    got = mean_opposite_similarity(emb, noisy, index, "parity")
    assert torch.equal(got, want)
    assert torch.equal(token_weights(got), token_weights(want))
    assert torch.equal(kl_weights(got), kl_weights(want))


def test_unequal_groups_raise_clear_error():
    emb = torch.randn(5, 4, 2)
    with pytest.raises(ValueError, match="same size G"):
        mean_opposite_similarity(emb, torch.randn(5), torch.tensor([0, 0, 0, 1, 1]))


def test_output_is_detached_and_in_input_order():
    emb = torch.randn(6, 3, 2, requires_grad=True)
    index = torch.tensor([1, 0, 1, 0, 1, 0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5, 0.2])
    c_bar = mean_opposite_similarity(emb, adv, index)
    assert not c_bar.requires_grad
    torch.testing.assert_close(c_bar.double(), loop_c_bar(emb.detach(), adv, index, "fixed"))


# ---------------------------------------------------------------------------- loops and properties


def random_batch(num_groups: int, size: int, length: int, dim: int, seed: int, levels: int):
    gen = torch.Generator().manual_seed(seed)
    n = num_groups * size
    labels = torch.randperm(100, generator=gen)[:num_groups] * 3 + 11
    index = labels.repeat_interleave(size)[torch.randperm(n, generator=gen)]
    # Few codes so that identical tokens (s = 1) occur, like a real VQ codebook.
    codebook = F.normalize(torch.randn(5, dim, generator=gen), dim=-1)
    emb = codebook[torch.randint(0, 5, (n, length), generator=gen)]
    emb = emb + 0.3 * torch.randn(n, length, dim, generator=gen) * (torch.rand(n, length, 1,
                                                                               generator=gen) < 0.5)
    emb = F.normalize(emb, dim=-1)
    rewards = torch.randint(0, levels, (n,), generator=gen).float()  # ties, zeros, tied groups
    return emb, group_advantages(rewards, index), index


@settings(max_examples=25, deadline=None)
@given(num_groups=st.integers(1, 3), size=st.integers(2, 16), length=st.integers(1, 576),
       dim=st.integers(1, 8), seed=st.integers(0, 10_000), levels=st.integers(1, 4),
       partner_set=st.sampled_from(["fixed", "parity"]))
@example(num_groups=3, size=16, length=576, dim=8, seed=1, levels=3, partner_set="parity")
@example(num_groups=3, size=16, length=576, dim=8, seed=2, levels=2, partner_set="fixed")
def test_vectorised_matches_loop(num_groups, size, length, dim, seed, levels, partner_set):
    emb, adv, index = random_batch(num_groups, size, length, dim, seed, levels)
    got = mean_opposite_similarity(emb, adv, index, partner_set)
    assert got.shape == (emb.shape[0], length)
    torch.testing.assert_close(got.double(), loop_c_bar(emb, adv, index, partner_set),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(c=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=40))
def test_weights_lie_in_range(c):
    c_bar = torch.tensor(c)[None, :]
    w, m = token_weights(c_bar), kl_weights(c_bar)
    assert ((w >= 0) & (w <= 1)).all()
    assert ((m >= 0.5) & (m <= 1)).all()


@settings(max_examples=20, deadline=None)
@given(num_groups=st.integers(1, 3), size=st.integers(2, 16), length=st.integers(1, 64),
       dim=st.integers(1, 8), seed=st.integers(0, 10_000),
       partner_set=st.sampled_from(["fixed", "parity"]))
def test_weights_from_real_similarities_lie_in_range(num_groups, size, length, dim, seed, partner_set):
    emb, adv, index = random_batch(num_groups, size, length, dim, seed, levels=3)
    c_bar = mean_opposite_similarity(emb, adv, index, partner_set)
    assert ((c_bar >= -1 - 1e-6) & (c_bar <= 1 + 1e-6)).all()
    w = token_weights(c_bar)
    assert ((w >= 0) & (w <= 1)).all()


@settings(max_examples=25, deadline=None)
@given(num_groups=st.integers(1, 3), size=st.integers(2, 16), length=st.integers(1, 64),
       dim=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_token_identical_to_all_opposite_partners_gets_zero_weight(num_groups, size, length, dim,
                                                                   seed):
    emb, _, index = random_batch(num_groups, size, length, dim, seed, levels=1)
    gen = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(emb.shape[0], generator=gen)
    i = int(torch.randint(0, emb.shape[0], (1,), generator=gen))
    t = int(torch.randint(0, length, (1,), generator=gen))
    group = (index == index[i]).nonzero().flatten()
    partners = group[adv[group] * adv[i] < 0]
    if partners.numel() == 0:  # make sure i has at least one opposite-sign partner
        j = group[group != i][0]
        adv[j] = -adv[i]
        partners = j[None]
    v = F.normalize(torch.randn(dim, generator=gen), dim=0)
    emb[partners, t] = v
    emb[i, t] = v
    w = token_weights(mean_opposite_similarity(emb, adv, index, "fixed"))
    assert w[i, t].item() == pytest.approx(0.0, abs=1e-6)

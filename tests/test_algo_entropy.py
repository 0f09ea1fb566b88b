"""Entropy reward e_i, λ and the max_only / all / off modes (docs/algorithm.md §3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stagerl.algo import entropy_reward, entropy_score, group_advantages
from stagerl.errors import UserError


def two_interleaved_groups():
    # Group "a" (label 4) at positions 0, 2, 4, 6:  R = [1, 0, 1, 0.5]
    #   H̄ = [1, 2, 2, 1], H̄^ref = [1, 1, 1, 1] -> H̄^ref − H̄ = [0, −1, −1, 0]
    #   e = 1 / (1 + d²) = [1, 0.5, 0.5, 1].
    # Group "b" (label 9) at positions 1, 3, 5, 7: R = [0, 0, 0, 0] (fully tied)
    #   H̄ = [1, 3, 1, 1], H̄^ref = [2, 1, 1, 1] -> d = [1, −2, 0, 0] -> e = [0.5, 0.2, 1, 1].
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0])
    ent = torch.tensor([1.0, 1.0, 2.0, 3.0, 2.0, 1.0, 1.0, 1.0])
    ref = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    index = torch.tensor([4, 9, 4, 9, 4, 9, 4, 9])
    return rewards, ent, ref, index


def test_entropy_score_hand_example():
    # e = 1 / (1 + (H̄^ref − H̄)²): d = 0 -> 1, d = 1 -> 0.5, d = 3 -> 0.1.
    e = entropy_score(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(e, torch.tensor([1.0, 0.5, 0.1]))


def test_max_only_hand_example():
    # Group a: max R = 1 at positions 0 and 4 (e = 1 and 0.5); mean of kept e = 0.75;
    #   bonus = 0.4·(1 − 0.75) = +0.1 and 0.4·(0.5 − 0.75) = −0.1; others get 0.
    # Group b: all tied at 0, so all are max samples; mean e = (0.5 + 0.2 + 1 + 1)/4 = 0.675;
    #   bonus = 0.4·(e − 0.675) = [−0.07, −0.19, 0.13, 0.13].
    rewards, ent, ref, index = two_interleaved_groups()
    new, bonus = entropy_reward(rewards, ent, ref, index, mode="max_only", coef=0.4)
    expected_bonus = torch.tensor([0.1, -0.07, 0.0, -0.19, -0.1, 0.13, 0.0, 0.13])
    torch.testing.assert_close(bonus, expected_bonus)
    torch.testing.assert_close(new, rewards + expected_bonus)
    assert (bonus[[2, 6]] == 0).all()  # non-max samples: exactly no bonus


def test_all_hand_example():
    # Group a: mean e = (1 + 0.5 + 0.5 + 1)/4 = 0.75 -> bonus = 0.4·(e − 0.75)
    #   = [0.1, −0.1, −0.1, 0.1] at positions 0, 2, 4, 6.
    # Group b: identical to max_only (every sample was a max sample).
    rewards, ent, ref, index = two_interleaved_groups()
    new, bonus = entropy_reward(rewards, ent, ref, index, mode="all", coef=0.4)
    expected_bonus = torch.tensor([0.1, -0.07, -0.1, -0.19, -0.1, 0.13, 0.1, 0.13])
    torch.testing.assert_close(bonus, expected_bonus)
    torch.testing.assert_close(new, rewards + expected_bonus)


def test_off_and_bad_mode():
    rewards, ent, ref, index = two_interleaved_groups()
    new, bonus = entropy_reward(rewards, ent, ref, index, mode="off")
    assert torch.equal(new, rewards) and (bonus == 0).all()
    with pytest.raises(UserError, match="max_only"):
        entropy_reward(rewards, ent, ref, index, mode="maxonly")


def test_tied_group_bonus_becomes_full_size_advantage():
    # docs/algorithm.md §3: in a fully tied group the tiny bonus, once normalised, is a full advantage.
    rewards, ent, ref, index = two_interleaved_groups()
    new, _ = entropy_reward(rewards, ent, ref, index)
    adv = group_advantages(new, index)
    tied = adv[index == 9]
    assert tied.abs().max() > 0.5
    assert tied.argmax().item() in (2, 3)  # the samples whose entropy matches the reference


def test_no_gradient_flows_through_rewards():
    # Rewards and advantages are constants (docs/algorithm.md §2), even from inputs with gradient.
    rewards, ent, ref, index = two_interleaved_groups()
    ent = ent.clone().requires_grad_(True)
    ref = ref.clone().requires_grad_(True)
    new, bonus = entropy_reward(rewards.requires_grad_(True), ent, ref, index)
    assert not new.requires_grad and not bonus.requires_grad


@settings(max_examples=40, deadline=None)
@given(num_groups=st.integers(1, 4), size=st.integers(2, 16), seed=st.integers(0, 10_000),
       mode=st.sampled_from(["max_only", "all"]), coef=st.floats(0.0, 2.0))
def test_matches_loop_reference(num_groups, size, seed, mode, coef):
    gen = torch.Generator().manual_seed(seed)
    n = num_groups * size
    index = torch.arange(num_groups).repeat_interleave(size) * 13 + 5
    index = index[torch.randperm(n, generator=gen)]
    rewards = torch.randint(0, 3, (n,), generator=gen).double()
    ent = torch.rand(n, generator=gen, dtype=torch.float64) * 5
    ref = torch.rand(n, generator=gen, dtype=torch.float64) * 5
    new, bonus = entropy_reward(rewards, ent, ref, index, mode=mode, coef=coef)
    for i in range(n):
        members = [j for j in range(n) if index[j] == index[i]]
        best = max(rewards[j].item() for j in members)
        kept = [j for j in members if mode == "all" or rewards[j].item() == best]
        e = {j: 1.0 / (1.0 + (ref[j].item() - ent[j].item()) ** 2) for j in members}
        mean_kept = sum(e[j] for j in kept) / len(kept)
        want = coef * (e[i] - mean_kept) if i in kept else 0.0
        assert bonus[i].item() == pytest.approx(want, abs=1e-12)
        assert new[i].item() == pytest.approx(rewards[i].item() + want, abs=1e-12)

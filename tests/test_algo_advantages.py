"""R_i, the tied-column drop and A_i (docs/algorithm.md §2): hand-worked numbers, loop references, properties."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stagerl.algo import combine_rewards, group_advantages

SETTINGS = settings(max_examples=40, deadline=None)


def shuffled_groups(num_groups: int, size: int, seed: int) -> torch.Tensor:
    """[P*G] arbitrary (non-contiguous, unsorted) labels, interleaved in a random order."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randperm(1000, generator=gen)[:num_groups] * 7 - 300
    index = labels.repeat_interleave(size)
    return index[torch.randperm(index.numel(), generator=gen)]


def loop_advantages(rewards: list[float], group_index: list[int], eps: float) -> list[float]:
    """Reference: per group, (R - mean) / (unbiased std + eps), with plain Python statistics."""
    out = [0.0] * len(rewards)
    for label in set(group_index):
        members = [i for i, g in enumerate(group_index) if g == label]
        values = [rewards[i] for i in members]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        for i in members:
            out[i] = (rewards[i] - mean) / (std + eps)
    return out


# ---------------------------------------------------------------------------- hand-computed


def test_advantage_hand_example():
    # Group "7": R = [1, 0, 0, 1] -> mean 0.5; deviations ±0.5; unbiased var = 4·0.25/3 = 1/3,
    # std = 0.57735; A = ±0.5 / (0.57735 + 1e-4) = ±0.86588.
    # Group "-2": R = [2, 4] -> mean 3, unbiased std = sqrt(2) = 1.41421;
    # A = ∓1 / (1.41421 + 1e-4) = ∓0.70706. Groups are interleaved on purpose.
    rewards = torch.tensor([1.0, 2.0, 0.0, 0.0, 4.0, 1.0])
    index = torch.tensor([7, -2, 7, 7, -2, 7])
    a = 0.5 / (3 ** -0.5 + 1e-4)
    b = 1.0 / (2 ** 0.5 + 1e-4)
    expected = torch.tensor([a, -b, -a, -a, b, a])
    torch.testing.assert_close(group_advantages(rewards, index), expected)


def test_tied_drop_hand_example():
    # Two groups of 3, K = 2 columns.
    # group 0: column 0 = [1, 0, 1] varies -> kept; column 1 = [0.5, 0.5, 0.5] tied -> dropped.
    #          R = column 0 = [1, 0, 1].
    # group 1: column 0 = [1, 1, 1] tied; column 1 = [0.2, 0.2, 0.2] tied -> both dropped,
    #          R = 0 and the group is tied (no signal).
    rewards = torch.tensor([[1.0, 0.5], [1.0, 0.2], [0.0, 0.5], [1.0, 0.2], [1.0, 0.5],
                            [1.0, 0.2]])
    index = torch.tensor([0, 1, 0, 1, 0, 1])
    out = combine_rewards(rewards, index)
    torch.testing.assert_close(out.total, torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
    assert out.kept.tolist() == [[True, False], [False, False]] * 3
    assert out.group_tied.tolist() == [False, True] * 3


def test_weighted_combination_hand_example():
    # One group of 2, weights w = [2, -0.5]: both columns vary, so both are kept.
    # R_0 = 2·1 + (-0.5)·4 = 0;  R_1 = 2·3 + (-0.5)·2 = 5.
    rewards = torch.tensor([[1.0, 4.0], [3.0, 2.0]])
    out = combine_rewards(rewards, torch.tensor([0, 0]), weights=torch.tensor([2.0, -0.5]))
    torch.testing.assert_close(out.total, torch.tensor([0.0, 5.0]))
    assert not out.group_tied.any()


def test_no_drop_keeps_tied_columns():
    # drop_tied=False is the plain sum: [1+0.5, 0+0.5] and no group counts as tied.
    rewards = torch.tensor([[1.0, 0.5], [0.0, 0.5]])
    out = combine_rewards(rewards, torch.tensor([3, 3]), drop_tied=False)
    torch.testing.assert_close(out.total, torch.tensor([1.5, 0.5]))
    assert out.kept.all() and not out.group_tied.any()


def test_tied_std_threshold():
    # Column spread 1e-7 (std ~7e-8) is "tied" at the default 1e-6 but kept at tied_std = 1e-8.
    rewards = torch.tensor([[1.0], [1.0 + 1e-7]], dtype=torch.float64)
    index = torch.tensor([0, 0])
    assert combine_rewards(rewards, index).group_tied.all()
    assert not combine_rewards(rewards, index, tied_std=1e-8).group_tied.any()


def test_nan_column_is_not_silently_dropped():
    rewards = torch.tensor([[float("nan"), 1.0], [0.0, 0.0]])
    out = combine_rewards(rewards, torch.tensor([0, 0]))
    assert torch.isnan(out.total[0])


def test_outputs_are_detached():
    rewards = torch.rand(4, 2, requires_grad=True)
    index = torch.tensor([0, 0, 1, 1])
    assert not combine_rewards(rewards, index).total.requires_grad
    assert not group_advantages(rewards.sum(1), index).requires_grad


def test_tied_group_advantage_is_exactly_zero():
    # 0.1 is not representable; a naive mean of seven copies leaves an ulp-level residual that
    # (std + eps) turns into a visible advantage. Ours must be exactly 0 (parity's sign tests
    # depend on it).
    rewards = torch.tensor([0.1] * 7 + [0.3, 0.7, 0.3, 0.7, 0.3, 0.7, 0.3])
    index = torch.tensor([0] * 7 + [1] * 7)
    adv = group_advantages(rewards, index)
    assert (adv[:7] == 0).all()
    assert (adv[7:] != 0).all()


# ---------------------------------------------------------------------------- loops and properties


@SETTINGS
@given(num_groups=st.integers(1, 5), size=st.integers(2, 16), seed=st.integers(0, 10_000),
       levels=st.integers(1, 4))
def test_advantages_match_loop_reference(num_groups, size, seed, levels):
    gen = torch.Generator().manual_seed(seed)
    index = shuffled_groups(num_groups, size, seed)
    # Few reward levels -> ties and fully tied groups appear often.
    rewards = torch.randint(0, levels, (index.numel(),), generator=gen).double() * 0.37
    expected = loop_advantages(rewards.tolist(), index.tolist(), 1e-4)
    torch.testing.assert_close(group_advantages(rewards, index),
                               torch.tensor(expected, dtype=torch.float64))


@SETTINGS
@given(num_groups=st.integers(1, 4), size=st.integers(2, 16), k=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_combine_matches_loop_reference(num_groups, size, k, seed):
    gen = torch.Generator().manual_seed(seed)
    index = shuffled_groups(num_groups, size, seed)
    rewards = torch.randint(0, 2, (index.numel(), k), generator=gen).double()
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    out = combine_rewards(rewards, index, weights)
    for i in range(index.numel()):
        members = (index == index[i]).nonzero().flatten().tolist()
        total, any_kept = 0.0, False
        for col in range(k):
            column = [rewards[j, col].item() for j in members]
            keep = statistics.stdev(column) > 1e-6
            assert out.kept[i, col].item() == keep
            if keep:
                total += weights[col].item() * rewards[i, col].item()
                any_kept = True
        assert out.total[i].item() == pytest.approx(total, abs=1e-12)
        assert out.group_tied[i].item() == (not any_kept)


@SETTINGS
@given(num_groups=st.integers(1, 4), size=st.integers(2, 16), seed=st.integers(0, 10_000),
       scale=st.floats(0.01, 100.0), shift=st.floats(-100.0, 100.0))
def test_advantages_invariant_to_positive_affine_change(num_groups, size, seed, scale, shift):
    gen = torch.Generator().manual_seed(seed)
    index = shuffled_groups(num_groups, size, seed)
    rewards = torch.randint(0, 3, (index.numel(),), generator=gen).double()
    # eps ~ 0 so that the invariance is exact up to rounding (eps itself breaks scale invariance).
    base = group_advantages(rewards, index, eps=1e-12)
    moved = group_advantages(rewards * scale + shift, index, eps=1e-12)
    torch.testing.assert_close(moved, base, rtol=1e-7, atol=1e-7)


@SETTINGS
@given(size=st.integers(1, 16), value=st.floats(-1e3, 1e3, allow_subnormal=False),
       seed=st.integers(0, 10_000))
def test_zero_variance_group_gives_zero_advantage(size, value, seed):
    gen = torch.Generator().manual_seed(seed)
    other = torch.rand(5, generator=gen)
    rewards = torch.cat([torch.full((size,), value), other])
    index = torch.cat([torch.zeros(size, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    perm = torch.randperm(rewards.numel(), generator=gen)
    adv = group_advantages(rewards[perm], index[perm])
    assert (adv[index[perm] == 0] == 0).all()


def test_integer_rewards_are_accepted():
    # Rule-based rewards often arrive as ints: [[1], [0]] -> R = [1, 0], A = ±0.5/(0.7071 + 1e-4).
    out = combine_rewards(torch.tensor([[1], [0]]), torch.tensor([0, 0]))
    torch.testing.assert_close(out.total, torch.tensor([1.0, 0.0]))
    adv = group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]) * 0.5 / (2 ** -0.5 + 1e-4))

"""Entropy reward e_i, which holds the policy's entropy near the reference's (docs/algorithm.md §3).

1. H̄_i = mean_t H_{i,t} and H̄^ref_i = mean_t H^ref_{i,t} on the sampled sequence o_i (the caller
   averages; this module takes the [N] means);
2. e_i = 1 / (1 + (H̄^ref_i − H̄_i)²), so e_i = 1 when the two entropies match;
3. mode ``max_only`` (the authors'): only samples whose R_i equals the group maximum keep e_i, and
   R_i ← R_i + λ·(e_i − mean of the kept e_j) for those samples only, λ = 0.4;
4. mode ``all``: the same formula over every sample of the group; mode ``off``: no bonus;
5. ``tied="drop"`` (not the authors'; docs/algorithm.md §3): a group whose R is tied (group std
   <= ``tied_std``) gets no bonus, so its advantages stay exactly 0; ``"keep"`` (the authors') gives
   it the bonus like any other group.

Why it stabilises (docs/algorithm.md §3): in a fully tied group every sample is a "max" sample and the
group std is ~0, so after normalisation the tiny bonus becomes a full-size advantage that pulls the
policy toward reference-like entropy.

Everything is detached: rewards and advantages are constants (docs/algorithm.md §2, last bullet).
The authors' code agrees: its per-token entropies carry gradient, but it forms the bonus with
gradients switched off, so nothing reaches the advantages through it (docs/algorithm.md §9).
"""

from __future__ import annotations

import torch
from torch import Tensor

from stagerl.algo._groups import as_float, group_centered_std, group_max, group_sum, groups_of
from stagerl.errors import UserError

ENTROPY_MODES = ("off", "max_only", "all")
#: What a group tied on R gets (docs/algorithm.md §3): the bonus ("keep", the authors') or none.
ENTROPY_TIED = ("keep", "drop")


def entropy_gap(entropy_mean: Tensor, ref_entropy_mean: Tensor) -> Tensor:
    """1 − e_i = d² / (1 + d²) with d = H̄^ref_i − H̄_i  [N], in [0, 1).

    Why this form: e_i is within ~1e-4 of 1 in practice, and 1 − 1/(1 + d²) in fp32 keeps only a
    few significant digits of the gap. In a tied group the bonus differences are then divided by
    a tiny std (docs/algorithm.md §3), so those lost digits became advantage errors of ~1e-4.
    d²/(1 + d²) keeps full relative precision.
    """
    # At least fp32; fp64 stays fp64.
    dtype = torch.promote_types(torch.promote_types(entropy_mean.dtype, ref_entropy_mean.dtype),
                                torch.float32)
    diff = ref_entropy_mean.detach().to(dtype) - entropy_mean.detach().to(dtype)
    d2 = diff * diff
    return d2 / (1.0 + d2)


def entropy_score(entropy_mean: Tensor, ref_entropy_mean: Tensor) -> Tensor:
    """e_i = 1 / (1 + (H̄^ref_i − H̄_i)²)  [N], in (0, 1] (docs/algorithm.md §3)."""
    return 1.0 - entropy_gap(entropy_mean, ref_entropy_mean)


def entropy_reward(rewards: Tensor, entropy_mean: Tensor, ref_entropy_mean: Tensor,
                   group_index: Tensor, mode: str = "max_only",
                   coef: float = 0.4, tied: str = "keep",
                   tied_std: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Add the entropy bonus to the combined rewards R_i (docs/algorithm.md §3).

    Args:
        rewards: [N] combined rewards R_i.
        entropy_mean: [N] H̄_i, the policy's mean per-token entropy on sample i.
        ref_entropy_mean: [N] H̄^ref_i, the reference's, on the same tokens.
        group_index: [N] group label of each sample.
        mode: "off", "max_only" (authors) or "all".
        coef: λ (authors: 0.4).
        tied: "keep" (authors): a group whose R_i are all equal gets the bonus too, and after
            normalisation by its tiny std that bonus is its whole advantage; "drop": such a group
            gets no bonus (R' = R there, so its advantages are exactly 0).
        tied_std: a group is tied when the unbiased std of its R_i is <= this (authors: 1e-6,
            the tie threshold of ``combine_rewards``).

    Returns:
        (R' [N], bonus [N]) with R' = R + bonus; both detached. ``bonus`` is exactly 0 where no
        bonus was added (mode off, a non-max sample under max_only, a tied group under drop).
    """
    if tied not in ENTROPY_TIED:
        raise UserError(f"unknown algo.entropy_tied {tied!r}; choose from "
                        f"{', '.join(ENTROPY_TIED)}")
    if mode not in ENTROPY_MODES:
        raise UserError(f"unknown entropy reward mode {mode!r}; choose from "
                        f"{', '.join(ENTROPY_MODES)}")
    rewards = as_float(rewards)
    n = rewards.numel()
    for name, t in (("entropy_mean", entropy_mean), ("ref_entropy_mean", ref_entropy_mean)):
        if t.shape != rewards.shape:
            raise ValueError(f"{name} must be [N] = [{n}] like rewards, got {tuple(t.shape)}")
    if mode == "off":
        return rewards, torch.zeros_like(rewards)
    g = groups_of(group_index, n)
    u = entropy_gap(entropy_mean, ref_entropy_mean).to(rewards.dtype)  # [N] 1 − e_i
    if mode == "max_only":
        # Exact equality is safe: the group max is one of the members' own values. Ties at the
        # max all keep their e_i (a fully tied group keeps every sample).
        kept = rewards == group_max(rewards, g)[g.inverse]  # [N] bool
    else:
        kept = torch.ones_like(rewards, dtype=torch.bool)
    kept_f = kept.to(rewards.dtype)
    # e_i − mean_kept(e) = mean_kept(1 − e) − (1 − e_i), computed on the precise gaps u = 1 − e.
    # Every group has >= 1 kept sample (its max), so no 0/0.
    u_kept_mean = group_sum(u * kept_f, g) / group_sum(kept_f, g).clamp(min=1)  # [P]
    bonus = torch.where(kept, coef * (u_kept_mean[g.inverse] - u), torch.zeros_like(u))
    if tied == "drop":
        # std is exactly 0 for a constant group (group_centered_std); a NaN std is not "tied",
        # so a NaN reward still surfaces instead of being silenced here.
        _, std = group_centered_std(rewards, g)
        bonus = torch.where(std <= tied_std, torch.zeros_like(bonus), bonus)
    return rewards + bonus, bonus

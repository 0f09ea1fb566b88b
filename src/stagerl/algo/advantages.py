"""Combined rewards R_i and group-normalised advantages A_i (docs/algorithm.md §2).

- R_i = Σ_k w_k · r_{k,i}, over the reward columns k kept for sample i's group;
- a column whose values are identical within a group (std ≤ 1e-6) is dropped for that group before
  summing (the authors' ``mask_pos_neg`` in their GenEval/OCR runs);
- A_i = (R_i − mean_g R) / (std_g R + ε), unbiased std, ε = 1e-4, per prompt group g;
  ``scale`` (TRL's ``scale_rewards``, docs/algorithm.md §10) swaps the denominator: "group" (above),
  "batch" (std_B R + ε, one unbiased std over the whole batch) or "none" (no division, Dr. GRPO).

Rewards and advantages are constants: every output here is detached (docs/algorithm.md §2, last bullet).

Shapes: N samples, K reward columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stagerl.algo._groups import as_float, group_centered_std, groups_of


@dataclass
class CombinedRewards:
    """The combined reward and which columns contributed to it."""

    total: Tensor  # [N] R_i = Σ over kept columns k of w_k · r_{k,i}
    kept: Tensor  # [N, K] bool, column k kept for sample i's group
    group_tied: Tensor  # [N] bool, True where every column of i's group was dropped (no signal)


def combine_rewards(rewards: Tensor, group_index: Tensor, weights: Tensor | None = None,
                    drop_tied: bool = True, tied_std: float = 1e-6) -> CombinedRewards:
    """R_i = Σ_k w_k r_{k,i} with tied columns dropped per group (docs/algorithm.md §2).

    Args:
        rewards: [N, K] reward columns r_{k,i} (a [N] tensor is read as K = 1).
        group_index: [N] int64 group label of each sample (any labels, any order, interleaved).
        weights: [K] column weights w_k; None = all 1 (the authors' plain sum).
        drop_tied: drop a column for a group when its unbiased std within the group is
            ≤ ``tied_std``. With ``drop_tied=False`` nothing is dropped and ``group_tied`` is all
            False: the tied-group rule of docs/algorithm.md §4.6 only exists together with the drop.
        tied_std: the tie threshold (authors: 1e-6).

    A single-member group has std 0, so its columns count as tied.
    """
    rewards = as_float(rewards)
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [N, K], got shape {tuple(rewards.shape)}")
    n, k = rewards.shape
    g = groups_of(group_index, n)
    if weights is None:
        weights = rewards.new_ones(k)
    weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device).detach()
    if weights.shape != (k,):
        raise ValueError(f"weights must be [K] = [{k}], got shape {tuple(weights.shape)}")
    if drop_tied:
        _, std = group_centered_std(rewards, g)  # [N, K], exactly 0 for a constant column
        # ~(std <= t), not (std > t): a NaN column stays kept, so the NaN surfaces in R_i
        # instead of being silently dropped as "tied".
        kept = ~(std <= tied_std)
    else:
        kept = torch.ones_like(rewards, dtype=torch.bool)
    # torch.where, not a product with the mask: a dropped NaN column must not poison R_i.
    total = torch.where(kept, rewards * weights, torch.zeros_like(rewards)).sum(dim=1)
    group_tied = ~kept.any(dim=1) if k > 0 else torch.ones(n, dtype=torch.bool,
                                                             device=rewards.device)
    return CombinedRewards(total=total, kept=kept, group_tied=group_tied)


#: Denominators of the advantage (TRL's ``scale_rewards`` values; docs/algorithm.md §10).
ADV_SCALES = ("group", "batch", "none")


def group_advantages(rewards: Tensor, group_index: Tensor, eps: float = 1e-4,
                     scale: str = "group", counted: Tensor | None = None) -> Tensor:
    """A_i = (R_i − mean_g R) / (std_g R + ε), unbiased std, per group (docs/algorithm.md §2).

    Args:
        rewards: [N] combined rewards R_i (entropy bonus already added where used).
        group_index: [N] group label of each sample, any labels and order.
        eps: ε in the denominator (authors: 1e-4).
        scale: "group" (the above), "batch" (divide by the unbiased std of R over all N samples,
            + ε) or "none" (R_i − mean_g R, no division: Dr. GRPO, arXiv 2503.20783). The idea
            and the names are TRL's ``GRPOConfig.scale_rewards`` (docs/algorithm.md §10).
        counted: [N] bool, the samples the "batch" std is taken over (None = all); the trainer
            leaves out the groups it silenced, whose rewards are placeholders.

    Returns:
        [N] advantages A_i, detached. A group whose rewards are all equal gets A = 0 *exactly*
        (see ``group_centered_std``), which the exact sign tests of the ``parity`` weights rely on.
    """
    rewards = as_float(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if scale not in ADV_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose from {', '.join(ADV_SCALES)}")
    g = groups_of(group_index, rewards.numel())
    centred, std = group_centered_std(rewards, g)
    if scale == "none":
        return centred
    if scale == "batch":
        # one std over the batch; a batch of one sample has none (0), as in TRL
        pool = rewards if counted is None else rewards[counted.to(rewards.device)]
        std = pool.std().expand_as(rewards) if pool.numel() > 1 else torch.zeros_like(rewards)
    return centred / (std + eps)

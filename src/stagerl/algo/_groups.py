"""Per-group reductions over an explicit group index (docs/algorithm.md §2: "use an explicit group index").

The authors' code normalised over the whole per-GPU batch, which is only right with one prompt per
GPU. Every group statistic here is computed per label of ``group_index`` instead, so a batch may hold
any number of prompts, in any order, with groups interleaved.

Shapes: N = samples in the batch, P = number of groups, G = samples per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Groups:
    """A dense relabelling of an arbitrary ``group_index``."""

    inverse: Tensor  # [N] int64 dense group id in [0, P) of each sample
    counts: Tensor  # [P] int64 members per group

    @property
    def num_groups(self) -> int:
        return int(self.counts.numel())


def groups_of(group_index: Tensor, n: int | None = None) -> Groups:
    """Dense ids for any labels (``torch.unique`` sorts them; their order does not matter)."""
    if group_index.dim() != 1:
        raise ValueError(f"group_index must be [N], got shape {tuple(group_index.shape)}")
    if n is not None and group_index.numel() != n:
        raise ValueError(f"group_index has {group_index.numel()} entries, expected N = {n}")
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    return Groups(inverse=inverse, counts=counts)


def as_float(x: Tensor) -> Tensor:
    """Detached, and floating point (integer rewards would break the -inf fill and the means)."""
    x = x.detach()
    return x if x.is_floating_point() else x.float()


def _expand(index: Tensor, like: Tensor) -> Tensor:
    """Broadcast a [N] index to ``like``'s shape [N, ...] (scatter_reduce needs equal shapes)."""
    return index.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def group_sum(x: Tensor, g: Groups) -> Tensor:
    """[N, ...] -> [P, ...] sum over each group's members."""
    out = x.new_zeros((g.num_groups, *x.shape[1:]))
    return out.index_add_(0, g.inverse, x)


def group_max(x: Tensor, g: Groups) -> Tensor:
    """[N, ...] -> [P, ...] max over each group's members (an exact member value)."""
    out = x.new_full((g.num_groups, *x.shape[1:]), float("-inf"))
    return out.scatter_reduce_(0, _expand(g.inverse, x), x, reduce="amax", include_self=True)


def group_centered_std(x: Tensor, g: Groups) -> tuple[Tensor, Tensor]:
    """Centred values x - mean_g(x) [N, ...] and the unbiased group std [N, ...].

    Why shift by the group max first: (x - max) is exactly 0 for every member of a constant group,
    so a tied group gets a centred value, std and advantage of *exactly* 0 instead of rounding noise
    (an ulp-level residual divided by (std + eps) can reach ~1e-3). The shift also avoids the
    cancellation of large offsets. A group of one member has std 0 (no unbiased estimate exists).
    """
    shifted = x - group_max(x, g)[g.inverse]
    count = g.counts.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    centred = shifted - (group_sum(shifted, g) / count)[g.inverse]
    var = group_sum(centred * centred, g) / (count - 1).clamp(min=1)
    return centred, var.sqrt()[g.inverse]


def to_grouped(x: Tensor, g: Groups) -> tuple[Tensor, Tensor]:
    """[N, ...] -> ([P, G, ...], order [N]); ``order`` sorts samples by group (stable).

    All groups must have the same size G (GRPO samples G images per prompt); the batched einsum of
    docs/algorithm.md §4.1 needs a dense [P, G, ...] layout.
    """
    sizes = g.counts.unique()
    if sizes.numel() != 1:
        raise ValueError("all groups must have the same size G for the batched similarity; got "
                         f"sizes {sorted(set(g.counts.tolist()))} (check group_index)")
    size = int(sizes.item())
    order = torch.argsort(g.inverse, stable=True)
    return x[order].reshape(g.num_groups, size, *x.shape[1:]), order


def from_grouped(x: Tensor, order: Tensor) -> Tensor:
    """Inverse of :func:`to_grouped`: [P, G, ...] -> [N, ...] in the caller's sample order."""
    flat = x.reshape(-1, *x.shape[2:])
    out = torch.empty_like(flat)
    out[order] = flat
    return out

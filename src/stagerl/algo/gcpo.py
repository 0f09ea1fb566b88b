"""GCPO's critical-token selection and dynamic advantage weight as pure functions (docs/algorithm.md §11).

GCPO (Zhang et al., "Group Critical-token Policy Optimization for Autoregressive Image Generation",
arXiv 2509.22485) trains on about 30 % of the image tokens, the union of three sets of ⌊f·L⌋
tokens each (f = 0.1 in the authors' code), per sample i:

- causal: the first ⌊f·L⌋ positions (early tokens condition everything after them);
- entropy gradient: the ⌊f·L⌋ positions with the largest spatial gradient magnitude of the
  (causally 5-neighbour-smoothed) entropy map, searched in positions [⌊0.1·L⌋, ⌊0.1·L⌋ + ⌊0.8·L⌋);
- diversity: among the positions not chosen above, the ⌊f·L⌋ with the lowest mean pairwise cosine
  similarity of the group's code vectors at that position.

The selected tokens' advantage is scaled by the dynamic weight
κ_{i,t} = (1/t) Σ_{s ≤ t} exp(clip(ℓ_{i,s} − ℓ^ref_{i,s}, −c, c)), c = 0.5.

Everything here is written from our reading of the authors' trainer and paper (no code copied;
docs/algorithm.md §11 lists where the two disagree). The outputs plug into the per-token coefficient
interface STAGE uses: token weights w (the 0/1 selection, through ``algo.loss_agg``), κ multiplied
into the loss coefficients c, and KL weights m (:func:`gcpo_weights`). Every output is detached.

Shapes: N sequences, L = side² image tokens in raster order, D code dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stagerl.algo._groups import as_float, group_sum, groups_of

#: The entropy-gradient search window [start, start + length) as fractions of L (authors' code).
ENTROPY_WINDOW = (0.1, 0.8)


def _side(length: int) -> int:
    side = int(round(length ** 0.5))
    if side * side != length:
        raise ValueError(f"GCPO's entropy map needs L = side², got L = {length}")
    return side


def causal_mask(n: int, length: int, frac: float, device=None) -> Tensor:
    """[N, L] bool: the first ⌊frac·L⌋ positions of every sequence."""
    mask = torch.zeros(n, length, dtype=torch.bool, device=device)
    mask[:, :int(length * frac)] = True
    return mask


def entropy_gradient(entropy: Tensor) -> Tensor:
    """|∇ H̃| [N, L]: gradient magnitude of the causally smoothed entropy map.

    H̃ at (r, c) is the mean of H over (r, c) and its already-generated neighbours (r, c−1),
    (r−1, c−1), (r−1, c), (r−1, c+1) that lie inside the map; the gradient is the central
    difference inside the map and the one-sided difference on its border, per axis.
    """
    n, length = entropy.shape
    side = _side(length)
    h = as_float(entropy.detach()).reshape(n, side, side)
    pad = F.pad(h, (1, 1, 1, 0))  # [N, side+1, side+2]: one row above, one column each side
    ones = F.pad(torch.ones_like(h[:1]), (1, 1, 1, 0))
    shifts = [(1, 1), (1, 0), (0, 0), (0, 1), (0, 2)]  # (row, col) offsets into pad: self, left,
    total = sum(pad[:, r:r + side, c:c + side] for r, c in shifts)  # up-left, up, up-right
    count = sum(ones[:, r:r + side, c:c + side] for r, c in shifts)
    mean = total / count  # [N, side, side] H̃

    def diff(x: Tensor, dim: int) -> Tensor:
        first = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
        last = x.narrow(dim, side - 1, 1) - x.narrow(dim, side - 2, 1)
        inner = (x.narrow(dim, 2, side - 2) - x.narrow(dim, 0, side - 2)) / 2
        return torch.cat([first, inner, last], dim=dim)

    dx, dy = diff(mean, 2), diff(mean, 1)
    return torch.sqrt(dx * dx + dy * dy).reshape(n, length)


def entropy_gradient_mask(entropy: Tensor, frac: float) -> Tensor:
    """[N, L] bool: per row, the ⌊frac·L⌋ largest |∇H̃| inside :data:`ENTROPY_WINDOW`."""
    n, length = entropy.shape
    grad = entropy_gradient(entropy)
    start, size = int(length * ENTROPY_WINDOW[0]), int(length * ENTROPY_WINDOW[1])
    k = min(int(length * frac), size)
    mask = torch.zeros(n, length, dtype=torch.bool, device=entropy.device)
    if k > 0:
        idx = torch.topk(grad[:, start:start + size], k, dim=1).indices + start
        mask.scatter_(1, idx, True)
    return mask


def group_similarity(code_emb: Tensor, group_index: Tensor) -> Tensor:
    """[N, L]: mean cosine similarity over the ordered pairs (i, j), i ≠ j, of sample i's group at
    each position t (the same value for every member of a group).

    Σ_{i≠j} cos = ‖Σ_i q̂_i‖² − Σ_i ‖q̂_i‖² with q̂ the unit vectors: O(N·L·D), no G×G matrix.
    """
    n = code_emb.shape[0]
    g = groups_of(group_index.to(code_emb.device), n)
    q = F.normalize(as_float(code_emb.detach()), dim=-1, eps=1e-8)  # [N, L, D]
    s = group_sum(q, g)  # [P, L, D]
    self_sum = group_sum((q * q).sum(-1), g)  # [P, L]
    pairs = (g.counts * (g.counts - 1)).clamp(min=1).to(q.dtype)[:, None]  # [P, 1]
    mean = ((s * s).sum(-1) - self_sum) / pairs  # [P, L]
    return mean[g.inverse]


def similarity_mask(similarity: Tensor, exclude: Tensor, frac: float) -> Tensor:
    """[N, L] bool: per row, the ⌊frac·L⌋ lowest similarities among positions not in ``exclude``."""
    n, length = similarity.shape
    k = int(length * frac)
    mask = torch.zeros(n, length, dtype=torch.bool, device=similarity.device)
    if k > 0:
        sim = as_float(similarity.detach()).masked_fill(exclude, float("inf"))
        idx = torch.topk(sim, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


def gcpo_token_mask(entropy: Tensor, code_emb: Tensor, group_index: Tensor,
                    frac: float = 0.1) -> Tensor:
    """[N, L] bool: GCPO's critical tokens, causal ∪ entropy-gradient ∪ diversity."""
    n, length = entropy.shape
    first = causal_mask(n, length, frac, entropy.device)
    ent = entropy_gradient_mask(entropy, frac)
    div = similarity_mask(group_similarity(code_emb, group_index), first | ent, frac)
    return first | ent | div


def dynamic_advantage_weight(logp: Tensor, ref_logp: Tensor, clip: float = 0.5) -> Tensor:
    """κ [N, L] = running mean over s ≤ t of exp(clip(ℓ_s − ℓ^ref_s, −clip, clip)); detached."""
    d = (as_float(logp.detach()) - as_float(ref_logp.detach())).clamp(-clip, clip)
    steps = torch.arange(1, d.shape[1] + 1, dtype=d.dtype, device=d.device)
    return torch.exp(d).cumsum(dim=1) / steps


def gcpo_weights(selected: Tensor, kappa: Tensor,
                 coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """(c [N, L], m [N, L]): GCPO in the per-token coefficient interface.

    ``coefficients`` is ``loss_coefficients(selected, agg=...)`` (the policy term's aggregation
    with the selection as token weights w); GCPO multiplies each token's advantage by κ, so
    c = coefficients · κ. The KL term β Σ m·KL / (N·L) of ``stage_loss`` becomes the authors'
    β Σ_{selected} KL / (number of selected tokens) with m = selected · N·L / Σ selected.
    """
    sel = selected.detach().float()
    c = coefficients.detach().float() * kappa.detach().float()
    m = sel * (sel.numel() / sel.sum().clamp(min=1.0))
    return c, m

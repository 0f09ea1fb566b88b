"""Similarity-aware token weights w (docs/algorithm.md §4) and KL weights m (docs/algorithm.md §6).

For samples i, j of one group and a position t:
- s_{ij,t} = cos(q_{i,t}, q_{j,t}), with q the (L2-normalised) VQ code vector of the sampled token;
- P_i, the partner set of i (see ``PARTNER_SETS`` below);
- c̄_{i,t} = mean over j ∈ P_i of s_{ij,t}  (c̄ = 0 when P_i is empty);
- w_{i,t} = clamp((1 − c̄_{i,t}) / 2, 0, 1): a token that looks like its opposite-sign partners'
  tokens (c̄ → 1) would get a gradient contradicting theirs, so it gets weight → 0;
- m_{i,t} = 0.5 + 0.5 · clamp(c̄_{i,t} + 1, 0, 1): tokens with a strong, unconflicted gradient
  (c̄ → −1) are held less tightly to the reference (m → 0.5).

The G×G×L similarities come from one batched einsum over [P, G, L, D] (docs/algorithm.md §4.1). The authors
looped over i, j in Python with a hard-coded 24×24 reshape; here L and D come from the input.

Shapes: N = P·G samples, P groups of G, L tokens per sample, D code dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stagerl.algo._groups import from_grouped, groups_of, to_grouped
from stagerl.errors import UserError

#: Partner sets (docs/algorithm.md §4.2), config field ``algo.partner_set``.
#: - ``fixed``:  P_i = { j ≠ i : A_i·A_j < 0 }, the opposite-sign members.
#: - ``parity``: P_i = { j : A_i·A_j ≤ 0 }, as in the authors' code: zero-advantage members are
#:   partners of everyone, and i is its own partner when A_i = 0, with s_ii counted as 0 (so i adds
#:   0 to the sum but 1 to the mean's denominator).
#: In both, |A| ≤ ``SIGN_ZERO_TOL`` counts as A = 0.
PARTNER_SETS = ("fixed", "parity")

#: |A| at or below this counts as A = 0 in the partner test of both partner sets (one rule,
#: :func:`snap_zero`). Why a tolerance: A is normalised to unit group std, and float rounding leaves
#: a member that sits at its group mean with a residual |A| (~2e-16 from the fp64 advantages, ~1e-8
#: in the authors' fp32 code) of arbitrary sign. Its policy-gradient term is negligible either way,
#: but its sign decides whom it counts as a partner, and under ``parity`` whether it is a partner of
#: everyone: a flipped sign changes c̄, w and m of the whole group. Treating it as 0 makes that
#: deterministic. A tied group needs no tolerance: ``group_advantages`` returns exact zeros there.
SIGN_ZERO_TOL = 1e-6


def pairwise_similarity(emb: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """s_{ij,t} for all pairs of each group: ([P, G, G, L], order [N]).

    ``order`` maps grouped rows back to samples (row ``order[p*G + g]`` of the input is member g of
    group p). ``emb`` is re-normalised here, which is a no-op for unit vectors and makes the dot
    product a cosine for raw code vectors too.
    """
    if emb.dim() != 3:
        raise ValueError(f"emb must be [N, L, D], got shape {tuple(emb.shape)}")
    q = F.normalize(emb.detach().float(), dim=-1)  # [N, L, D] q_{i,t}
    q_grouped, order = to_grouped(q, groups_of(group_index, q.shape[0]))  # [P, G, L, D]
    s = torch.einsum("pild,pjld->pijl", q_grouped, q_grouped)  # [P, G, G, L] s_{ij,t}
    return s, order


def snap_zero(adv: Tensor, zero_tol: float = SIGN_ZERO_TOL) -> Tensor:
    """``adv`` with |A| ≤ ``zero_tol`` set to exactly 0 (see ``SIGN_ZERO_TOL``); the partner tests
    of both partner sets read the signs of this."""
    return torch.where(adv.abs() <= zero_tol, torch.zeros_like(adv), adv)


def partner_mask(adv: Tensor, partner_set: str,
                 zero_tol: float = SIGN_ZERO_TOL) -> tuple[Tensor, Tensor]:
    """Partner sets P_i from grouped advantages [P, G]: (in_mean [P, G, G], in_sum [P, G, G]).

    ``in_mean[p, i, j]``: j counts in the denominator of i's mean; ``in_sum``: j's s_ij is summed.
    They differ only on the diagonal under ``parity`` (s_ii counted as 0).
    """
    sign = torch.sign(snap_zero(adv, zero_tol))  # [P, G] in {-1, 0, 1}
    product = sign[:, :, None] * sign[:, None, :]  # [P, G, G]
    if partner_set == "fixed":
        in_mean = product < 0  # j = i never: sign_i² ≥ 0
        return in_mean, in_mean
    if partner_set == "parity":
        # The authors' test A_i·A_j ≤ 0, zero included, on the snapped advantages.
        in_mean = product <= 0
        eye = torch.eye(adv.shape[1], dtype=torch.bool, device=adv.device)
        return in_mean, in_mean & ~eye
    raise UserError(f"unknown partner set {partner_set!r}; choose from {', '.join(PARTNER_SETS)}")


def mean_opposite_similarity(emb: Tensor, advantages: Tensor, group_index: Tensor,
                             partner_set: str = "fixed", *,
                             zero_tol: float = SIGN_ZERO_TOL) -> Tensor:
    """c̄_{i,t} = mean over j ∈ P_i of s_{ij,t}  (docs/algorithm.md §4.1-§4.3).

    Args:
        emb: [N, L, D] code vectors q_{i,t} of the sampled tokens (L2-normalised; re-normalised).
        advantages: [N] A_i.
        group_index: [N] group label of each sample; every group must have the same size G.
        partner_set: "fixed" or "parity" (see ``PARTNER_SETS``).
        zero_tol: |A| ≤ zero_tol counts as 0, under both partner sets (see ``SIGN_ZERO_TOL``).

    Returns:
        [N, L] c̄, fp32, detached. Empty P_i gives c̄ = 0 (w = 0.5, m = 1) under both partner sets.
        Under ``fixed`` that is the spec. Under ``parity`` P_i is never empty for mean-zero group
        advantages (a non-zero A_i always has an opposite-sign member, a zero A_i contains i);
        only advantages that are not centred per group can empty it, where the authors' mean
        would be 0/0 (NaN). We return 0 there, as ``fixed`` does, rather than a NaN.
    """
    if advantages.shape != (emb.shape[0],):
        raise ValueError(f"advantages must be [N] = [{emb.shape[0]}], got "
                         f"{tuple(advantages.shape)}")
    s, order = pairwise_similarity(emb, group_index)  # [P, G, G, L]
    adv_grouped = advantages.detach().float()[order].reshape(s.shape[:2])  # [P, G]
    in_mean, in_sum = partner_mask(adv_grouped, partner_set, zero_tol)
    total = torch.einsum("pij,pijl->pil", in_sum.float(), s)  # [P, G, L] Σ_{j∈P_i} s_ij
    size = in_mean.sum(dim=-1).clamp(min=1).float()  # [P, G] |P_i|, 0 -> 1 so c̄ = 0/1 = 0
    return from_grouped(total / size[..., None], order)  # [N, L]


def apply_tied_rule(c_bar: Tensor, group_tied: Tensor | None,
                    entropy_reward_on: bool = False) -> Tensor:
    """Tied-group rule (docs/algorithm.md §4.6): c̄ = 1 on groups with no reward signal.

    When every reward column of a group was dropped and the entropy reward is off, the authors set
    c̄ = 1, so w = 0 (no policy gradient from that group). The same c̄ feeds the KL weight, so
    m = 0.5 + 0.5·clamp(2, 0, 1) = 1 there: such a group keeps the plain, unweighted KL pull toward
    the reference. With the entropy reward on, a tied group does carry signal (the entropy bonus),
    so the rule does not apply.
    """
    if group_tied is None or entropy_reward_on:
        return c_bar
    if group_tied.shape != c_bar.shape[:1]:
        raise ValueError(f"group_tied must be [N] = [{c_bar.shape[0]}], got "
                         f"{tuple(group_tied.shape)}")
    return torch.where(group_tied[:, None], torch.ones_like(c_bar), c_bar)


def token_weights(c_bar: Tensor, group_tied: Tensor | None = None,
                  entropy_reward_on: bool = False) -> Tensor:
    """w_{i,t} = clamp((1 − c̄_{i,t}) / 2, 0, 1)  [N, L] (docs/algorithm.md §4.4), tied rule applied."""
    c_bar = apply_tied_rule(c_bar, group_tied, entropy_reward_on)
    return ((1.0 - c_bar) / 2.0).clamp(0.0, 1.0)


def kl_weights(c_bar: Tensor, group_tied: Tensor | None = None,
               entropy_reward_on: bool = False) -> Tensor:
    """m_{i,t} = 0.5 + 0.5 · clamp(c̄_{i,t} + 1, 0, 1)  [N, L] (docs/algorithm.md §6), in [0.5, 1].

    Pass the same ``group_tied`` / ``entropy_reward_on`` as to :func:`token_weights` to apply the
    tied-group rule consistently: c̄ = 1 there, hence m = 1.
    """
    c_bar = apply_tied_rule(c_bar, group_tied, entropy_reward_on)
    return 0.5 + 0.5 * (c_bar + 1.0).clamp(0.0, 1.0)


def loss_weights(c_bar: Tensor, *, reweight: bool, kl_reweight: bool,
                 group_tied: Tensor | None = None, silenced: Tensor | None = None,
                 entropy_reward_on: bool = False) -> tuple[Tensor, Tensor]:
    """The token weights (w, m) a rollout trains with, both [N, L] (docs/algorithm.md §4.4-§4.6).

    - ``reweight`` on: w from c̄, with the tied-group rule (w = 0) on ``group_tied`` groups (all
      reward columns dropped) unless the entropy reward gives them a signal, and always on
      ``silenced`` groups (an image no reward could score).
    - ``reweight`` off (vanilla GRPO, +Ent): w = 1 on every token, tied and silenced groups
      included; the tied-group rule does not exist there (their A = 0 adds nothing to the loss,
      but they still count in the per-group mean).
    - ``kl_reweight`` on: m from c̄ under the same rule (c̄ = 1 gives m = 1); off: m = 1.

    ``group_tied`` and ``silenced`` are [N] bool per sample (True for every member of the group).
    """
    ones = torch.ones_like(c_bar)
    rule = None
    for flags in (None if entropy_reward_on else group_tied, silenced):
        if flags is not None:
            rule = flags if rule is None else rule | flags
    w = token_weights(c_bar, rule) if reweight else ones
    m = kl_weights(c_bar, rule) if kl_reweight else ones
    return w, m

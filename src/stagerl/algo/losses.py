"""Policy-gradient loss, KL loss and their STAGE combination (docs/algorithm.md §5, §6).

- ρ_{i,t} = exp(ℓ_{i,t} − ℓ^old_{i,t}); the authors take one update per rollout (ℓ^old = ℓ.detach(),
  so ρ = 1 with the gradient of ℓ). Beyond the authors: PPO clipping (Schulman et al. 2017,
  arXiv 1707.06347) with separate ε_low / ε_high ("clip-higher", DAPO, arXiv 2503.14476), for μ > 1
  updates per rollout with ℓ^old saved at rollout time.
- per-token surrogate: A_i·ρ_{i,t}, or min(A_i·ρ, A_i·clip(ρ, 1 − ε_low, 1 + ε_high)) when clipping;
- aggregation: every aggregation is linear in the per-token loss, L_pg = Σ_{i,t} c_{i,t}·(−A_i ρ_{i,t}),
  so it is written as the coefficients c [N, L] it puts on each token (a registry in the style of
  verl's ``agg_loss``). Computing c once on the whole rollout and summing Σ c·(−Aρ) over micro-batches
  gives exactly the full-batch loss, whatever the micro-batching (``loss_coefficients``):
  - ``group_weighted_mean`` (default; the authors' runs): per group g,
    L_pg(g) = −Σ_{i∈g,t} w A ρ / (Σ_{i∈g,t} w + 1e-6), then the mean over groups. With w = 1
    (vanilla GRPO) this is each group's token mean, then the mean over groups. The authors ran one
    group per GPU and let DDP average over GPUs, which is the same objective;
  - ``batch_weighted_mean``: −Σ w A ρ / (Σ w + 1e-6) with one Σw over every group of the batch
    (groups weigh by their share of Σw; equals the above only with one group);
  - ``token_mean``: −Σ w A ρ / (number of tokens);
  - ``seq_mean``: the mean over sequences of each sequence's token mean (the original GRPO);
  - ``constant`` (Dr. GRPO, arXiv 2503.20783): −Σ w A ρ / (N · C), C = ``constant_normalizer``
    or L, so that the loss scale does not depend on how many tokens a batch holds.
- KL term: β · Σ m·KL / (number of tokens), m the KL weights (docs/algorithm.md §6). With
  ``kl_bias_correction`` each token's KL is multiplied by ρ (TRL's ``use_bias_correction_kl``:
  the tokens were sampled from π_old, not π_θ; docs/algorithm.md §10).
- ratio level (TRL's ``importance_sampling_level``, GSPO, arXiv 2507.18071): "token" (above) or
  "sequence", ρ_i = exp(Σ_t m(ℓ − ℓ^old) / Σ_t m), one ratio per sequence shared by its tokens.

Token weights w, KL weights m and advantages A are constants (detached); the gradient flows through
ℓ only. Metrics are plain floats, gathered with a single device sync.

Shapes: N sequences, L tokens each. ``mask`` [N, L] marks real tokens (all, for fixed-size images).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from stagerl.algo._groups import group_sum, groups_of
from stagerl.algo.kl import kl_divergence
from stagerl.errors import UserError

#: (w·mask [N, L], mask [N, L] float, group_index [N] or None, constant_normalizer) -> c [N, L]
Aggregation = Callable[[Tensor, Tensor, Optional[Tensor], Optional[float]], Tensor]
LOSS_AGGREGATIONS: dict[str, Aggregation] = {}
WEIGHT_SUM_EPS = 1e-6  # the 1e-6 of the Σw denominator (docs/algorithm.md §5)


def register_loss_agg(name: str) -> Callable[[Aggregation], Aggregation]:
    def wrap(fn: Aggregation) -> Aggregation:
        LOSS_AGGREGATIONS[name] = fn
        return fn

    return wrap


@register_loss_agg("group_weighted_mean")
def _group_weighted_mean(w: Tensor, mask: Tensor, group_index: Optional[Tensor],
                         c: Optional[float]) -> Tensor:
    if group_index is None:  # the whole batch is one group (the authors' one prompt per GPU)
        return w / (w.sum() + WEIGHT_SUM_EPS)
    g = groups_of(group_index.to(w.device), w.shape[0])
    w_sum = group_sum(w.sum(dim=1), g)  # [P] Σ_{i∈g,t} w
    return w / ((w_sum + WEIGHT_SUM_EPS) * g.num_groups)[g.inverse][:, None]


@register_loss_agg("batch_weighted_mean")
def _batch_weighted_mean(w: Tensor, mask: Tensor, group_index: Optional[Tensor],
                         c: Optional[float]) -> Tensor:
    return w / (w.sum() + WEIGHT_SUM_EPS)


@register_loss_agg("token_mean")
def _token_mean(w: Tensor, mask: Tensor, group_index: Optional[Tensor],
                c: Optional[float]) -> Tensor:
    return w / mask.sum().clamp(min=1.0)


@register_loss_agg("seq_mean")
def _seq_mean(w: Tensor, mask: Tensor, group_index: Optional[Tensor],
              c: Optional[float]) -> Tensor:
    n_seq = (mask.sum(dim=1) > 0).sum().clamp(min=1)  # sequences with at least one token
    return w / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / n_seq


@register_loss_agg("constant")
def _constant(w: Tensor, mask: Tensor, group_index: Optional[Tensor],
              c: Optional[float]) -> Tensor:
    n, length = w.shape
    return w / (n * (c if c is not None else length))


def loss_coefficients(token_weights: Optional[Tensor], *, agg: str = "group_weighted_mean",
                      group_index: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                      constant_normalizer: Optional[float] = None,
                      like: Optional[Tensor] = None) -> Tensor:
    """c [N, L]: the coefficient each token's −A·ρ gets in L_pg under aggregation ``agg``.

    ``token_weights`` [N, L] (None = w = 1, then ``like`` gives the shape); ``group_index`` [N]
    labels the groups of ``group_weighted_mean`` (None = one group). Detached, fp32. Compute it on
    the whole batch and slice it per micro-batch: the micro-batch losses then add up to the
    full-batch loss exactly.
    """
    if agg not in LOSS_AGGREGATIONS:
        raise UserError(f"unknown loss aggregation {agg!r}; choose from "
                        f"{', '.join(LOSS_AGGREGATIONS)}")
    ref = token_weights if token_weights is not None else like
    if ref is None:
        raise ValueError("loss_coefficients needs token_weights or like= for the [N, L] shape")
    mask_f = _mask_of(ref, mask).float()
    w = mask_f if token_weights is None else token_weights.detach().float() * mask_f  # [N, L]
    return LOSS_AGGREGATIONS[agg](w, mask_f, group_index, constant_normalizer)


def _floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Tensor metrics -> plain floats with one device sync (one stack, one ``tolist``)."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def _mask_of(like: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if mask.shape != like.shape:
        raise ValueError(f"mask must be {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask.bool()


#: Importance-ratio levels (TRL's ``importance_sampling_level``; docs/algorithm.md §10).
RATIO_LEVELS = ("token", "sequence")


def importance_ratio(logp: Tensor, old_logp: Tensor, mask: Optional[Tensor] = None,
                     level: str = "token") -> Tensor:
    """ρ [N, L]: exp(ℓ − ℓ^old) per token, or per sequence (GSPO) broadcast over its tokens.

    "sequence": ρ_i = exp(Σ_t m_{i,t}(ℓ − ℓ^old)_{i,t} / max(Σ_t m_{i,t}, 1)), the length-normalised
    log-ratio of TRL's ``importance_sampling_level="sequence"`` (docs/algorithm.md §10). The
    gradient flows through ℓ; ℓ^old is detached.
    """
    if level not in RATIO_LEVELS:
        raise UserError(f"unknown ratio level {level!r}; choose from {', '.join(RATIO_LEVELS)}")
    real = _mask_of(logp, mask)
    log_ratio = torch.where(real, logp.float() - old_logp.detach().float(),
                            torch.zeros_like(logp, dtype=torch.float32))  # [N, L]
    if level == "sequence":
        m = real.float()
        seq = log_ratio.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        log_ratio = seq.expand_as(log_ratio)  # [N, L], one value per row
    return torch.exp(log_ratio)


def _policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor,
                 token_weights: Optional[Tensor], clip_eps_low: Optional[float],
                 clip_eps_high: Optional[float], agg: str, mask: Optional[Tensor],
                 constant_normalizer: Optional[float], group_index: Optional[Tensor],
                 coefficients: Optional[Tensor], ratio_level: str = "token",
                 ratio: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    if clip_eps_low is None and clip_eps_high is not None:
        raise UserError("clip_eps_high is set but clip_eps_low is not; set clip_eps_low to clip")
    if logp.shape != old_logp.shape or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)} and old_logp {tuple(old_logp.shape)} must "
                         "both be [N, L]")
    real = _mask_of(logp, mask)  # [N, L] bool
    if coefficients is None:
        coefficients = loss_coefficients(token_weights, agg=agg, group_index=group_index,
                                         mask=real, constant_normalizer=constant_normalizer,
                                         like=logp)
    elif coefficients.shape != logp.shape:
        raise ValueError(f"coefficients must be {tuple(logp.shape)}, got "
                         f"{tuple(coefficients.shape)}")
    adv = advantages.detach().float()
    adv = adv[:, None] if adv.dim() == 1 else adv  # [N, 1] (or [N, L] per-token advantages)
    if ratio is None:
        ratio = importance_ratio(logp, old_logp, real, ratio_level)  # [N, L] ρ
    surrogate = adv * ratio  # [N, L] A·ρ
    clipped = torch.zeros_like(real)
    if clip_eps_low is not None:
        eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
        surrogate_clipped = adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high)
        clipped = surrogate_clipped < surrogate  # where the clipped (gradient-free) branch wins
        surrogate = torch.minimum(surrogate, surrogate_clipped)
    # torch.where, not a product: a padded token's −inf/NaN log-prob must not reach the sum.
    token_loss = torch.where(real, -surrogate, torch.zeros_like(surrogate))  # [N, L]
    loss = (coefficients.detach().float() * token_loss).sum()  # Σ c·(−Aρ)
    with torch.no_grad():
        mask_f = real.float()
        n_tok = mask_f.sum().clamp(min=1.0)
        r = ratio.detach()
        log_r = r.log()
        metrics = {
            "clip_frac": (clipped & real).float().sum() / n_tok,
            "ratio_mean": (r * mask_f).sum() / n_tok,
            "ratio_max": torch.where(real, r, torch.zeros_like(r)).max(),
            "ratio_min": torch.where(real, r, torch.full_like(r, float("inf"))).min(),
            # ½(log ρ)² (k2): how far this update moved from the rollout policy.
            "approx_kl": torch.where(real, 0.5 * log_r * log_r, torch.zeros_like(r)).sum() / n_tok,
        }
    return loss, metrics


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor,
                token_weights: Optional[Tensor] = None, *, clip_eps_low: Optional[float] = None,
                clip_eps_high: Optional[float] = None, agg: str = "group_weighted_mean",
                mask: Optional[Tensor] = None, constant_normalizer: Optional[float] = None,
                group_index: Optional[Tensor] = None, coefficients: Optional[Tensor] = None,
                ratio_level: str = "token") -> tuple[Tensor, dict[str, float]]:
    """L_pg from ℓ [N, L], ℓ^old [N, L], A [N] and token weights w [N, L] (docs/algorithm.md §5).

    ``clip_eps_low`` = None disables clipping; ``clip_eps_high`` defaults to ``clip_eps_low``.
    ``token_weights`` = None means w = 1. ``group_index`` [N] labels the groups for
    ``group_weighted_mean`` (None = the batch is one group). ``coefficients`` [N, L], when given,
    replace (w, agg, group_index): pass a slice of :func:`loss_coefficients` computed on the whole
    batch to get a micro-batch's exact share of the full-batch loss. ``ratio_level`` "sequence"
    uses one ratio per sequence (:func:`importance_ratio`). Returns (scalar loss, metrics:
    clip_frac, ratio_mean, ratio_max, ratio_min, approx_kl).
    """
    loss, metrics = _policy_loss(logp, old_logp, advantages, token_weights, clip_eps_low,
                                 clip_eps_high, agg, mask, constant_normalizer, group_index,
                                 coefficients, ratio_level)
    return loss, _floats(metrics)


def _kl_loss(kl: Tensor, kl_weights: Optional[Tensor], beta: float, mask: Optional[Tensor],
             num_tokens: Optional[float],
             ratio: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
    real = _mask_of(kl, mask)
    kl = torch.where(real, kl.float(), torch.zeros_like(kl, dtype=torch.float32))  # [N, L] KL
    if ratio is not None:  # bias correction: ρ·KL, the gradient flows through ρ as well
        kl = kl * torch.where(real, ratio, torch.zeros_like(ratio))
    mask_f = real.float()
    m = mask_f if kl_weights is None else kl_weights.detach().float() * mask_f  # [N, L] m
    n_tok = mask_f.sum().clamp(min=1.0)
    denom = n_tok if num_tokens is None else num_tokens
    weighted = (m * kl).sum() / denom  # Σ m·KL / number of tokens
    # β = 0 returns an exact 0, not 0·KL: an inf KL would otherwise turn the loss into NaN.
    loss = beta * weighted if beta > 0 else weighted.new_zeros(())
    metrics = {"mean": kl.detach().sum() / n_tok, "weighted_mean": (m * kl).detach().sum() / n_tok,
               "max": kl.detach().max(), "m_mean": m.sum() / n_tok}
    return loss, metrics


def kl_loss(kl: Tensor, kl_weights: Optional[Tensor], beta: float,
            mask: Optional[Tensor] = None,
            num_tokens: Optional[float] = None) -> tuple[Tensor, dict[str, float]]:
    """β · Σ_{i,t} m_{i,t}·KL_{i,t} / (number of tokens)  (docs/algorithm.md §6).

    ``kl_weights`` = None is the plain, unweighted KL (m = 1). ``num_tokens`` overrides the
    denominator (the whole batch's token count, for a micro-batch's share). Returns (scalar loss,
    metrics: mean and max of the unweighted KL, weighted_mean = Σ m·KL / tokens, m_mean).
    """
    loss, metrics = _kl_loss(kl, kl_weights, beta, mask, num_tokens)
    return loss, _floats(metrics)


def stage_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, *,
               ref_logp: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
               kl_weights: Optional[Tensor] = None, beta: float = 0.0, kl_estimator: str = "k3",
               clip_eps_low: Optional[float] = None, clip_eps_high: Optional[float] = None,
               agg: str = "group_weighted_mean", mask: Optional[Tensor] = None,
               constant_normalizer: Optional[float] = None,
               group_index: Optional[Tensor] = None, coefficients: Optional[Tensor] = None,
               num_tokens: Optional[float] = None, ratio_level: str = "token",
               kl_bias_correction: bool = False) -> tuple[Tensor, dict[str, float]]:
    """L = L_pg + β · Σ m·KL / tokens, with namespaced metrics (docs/algorithm.md §5, §6).

    ``ratio_level`` and ``kl_bias_correction`` are TRL's options (docs/algorithm.md §10): one
    ratio per sequence, and the KL of each token multiplied by its ratio ρ.

    The trainer's loss: it calls this with ``coefficients`` and ``num_tokens`` of the whole
    rollout, sliced per micro-batch. ``ref_logp`` [N, L] is needed when β > 0; when given with
    β = 0 the KL to the reference is still measured (logged, not optimised), since the ``wo_kl``
    rows keep a reference for the entropy reward. Metrics: loss/{total,pg,kl},
    policy/{clip_frac,ratio_mean,ratio_max,ratio_min,approx_kl}, kl/{weighted_mean,max}.
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
    ratio = importance_ratio(logp, old_logp, mask, ratio_level)  # [N, L] ρ
    pg, pg_metrics = _policy_loss(logp, old_logp, advantages, token_weights, clip_eps_low,
                                  clip_eps_high, agg, mask, constant_normalizer, group_index,
                                  coefficients, ratio_level, ratio)
    metrics = {f"policy/{k}": v for k, v in pg_metrics.items()}
    total = pg
    kl_term = pg.new_zeros(())
    if ref_logp is not None:
        kl = kl_divergence(logp, ref_logp, kl_estimator)  # [N, L]
        kl_term, kl_metrics = _kl_loss(kl, kl_weights, beta, mask, num_tokens,
                                       ratio if kl_bias_correction else None)
        # kl/mean and kl/m_mean are left out: the rollout logs policy/kl_k3 and algo/m_mean, and
        # one name per quantity keeps the metric list of docs/design.md §9 short.
        metrics.update({f"kl/{k}": kl_metrics[k] for k in ("weighted_mean", "max")})
        total = pg + kl_term
    metrics.update({"loss/total": total, "loss/pg": pg, "loss/kl": kl_term})
    return total, _floats(metrics)

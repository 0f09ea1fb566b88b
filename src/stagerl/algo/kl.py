"""Per-token KL estimators KL_k1, KL_k2, KL_k3 between the policy and the reference (docs/algorithm.md §6).

Tokens are sampled from the policy, so with log r = ℓ^ref − ℓ (ℓ = log π_θ, ℓ^ref = log π_ref)
the three estimators of KL(π_θ ‖ π_ref) from J. Schulman, "Approximating KL Divergence" (2020,
http://joschu.net/blog/kl-approx.html) are:
- k1 = −log r = ℓ − ℓ^ref                        (unbiased, high variance, can be negative);
- k2 = ½ (log r)²                                (biased, low variance, ≥ 0);
- k3 = (r − 1) − log r = exp(ℓ^ref − ℓ) − (ℓ^ref − ℓ) − 1   (unbiased, ≥ 0; STAGE's choice).

A small registry, verl-style: add an estimator with ``@register_kl_estimator("name")``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from stagerl.errors import UserError

KLEstimator = Callable[[Tensor], Tensor]  # log r [N, L] -> KL [N, L]
KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_kl_estimator(name: str) -> Callable[[KLEstimator], KLEstimator]:
    def wrap(fn: KLEstimator) -> KLEstimator:
        KL_ESTIMATORS[name] = fn
        return fn

    return wrap


@register_kl_estimator("k1")
def _k1(log_r: Tensor) -> Tensor:
    return -log_r


@register_kl_estimator("k2")
def _k2(log_r: Tensor) -> Tensor:
    return 0.5 * log_r * log_r


@register_kl_estimator("k3")
def _k3(log_r: Tensor) -> Tensor:
    # expm1(x) - x instead of exp(x) - x - 1: the same value, without cancellation when
    # log r ≈ 0 (the usual case near the reference), so the result is exactly 0 at log r = 0.
    return torch.expm1(log_r) - log_r


def kl_divergence(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """KL_{i,t} per token [N, L] from ℓ [N, L] and ℓ^ref [N, L] (docs/algorithm.md §6).

    Computed in fp32 (bf16 log-probs would lose the small differences that matter here).
    Gradient flows through ``logp`` only; the reference is detached.
    """
    if estimator not in KL_ESTIMATORS:
        raise UserError(f"unknown KL estimator {estimator!r}; choose from "
                        f"{', '.join(sorted(KL_ESTIMATORS))}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    log_r = ref_logp.detach().float() - logp.float()
    return KL_ESTIMATORS[estimator](log_r)

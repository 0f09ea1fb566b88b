"""Drawing tokens: the one place where randomness enters sampling, shared by every adapter.

Two ways to supply it:
- a ``torch.Generator`` (what ``generate()``-style samplers use). A generator belongs to one device;
  :func:`draw` makes its draw on the generator's device and moves the result, so a CPU generator
  never meets CUDA probabilities inside ``torch.multinomial`` (which refuses that);
- pre-drawn **noise**: one uniform u in [0, 1) per row and position, token = inverse CDF at u. The
  trainer draws it per prompt group from a generator seeded by (seed, step, global group index),
  so a rollout's tokens do not depend on how groups are spread over processes or micro-batches,
  nor on the device: a 2-process run samples exactly what a 1-process run samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """[N, V] non-negative weights (need not sum to 1), [N] uniforms in [0, 1) -> [N] int64 ids."""
    cdf = probs.float().cumsum(-1)  # [N, V]
    target = u.to(device=cdf.device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


def draw(probs: Tensor, generator: torch.Generator | None = None,
         u: Tensor | None = None) -> Tensor:
    """One token per row of ``probs`` [N, V] -> [N] int64 on ``probs``' device.

    ``u`` [N] (pre-drawn noise) takes precedence; otherwise ``torch.multinomial`` with
    ``generator``, on the generator's device.
    """
    if u is not None:
        return inverse_cdf(probs, u)
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    picked = torch.multinomial(probs.to(generator.device), 1, generator=generator)
    return picked[:, 0].to(probs.device)


def group_noise(group_seeds: list[int], group_size: int, length: int) -> Tensor:
    """[len(group_seeds) * group_size, L] uniforms; group k's G rows come from its own seed."""
    rows = [torch.rand(group_size, length, generator=torch.Generator().manual_seed(s))
            for s in group_seeds]
    return torch.cat(rows) if rows else torch.zeros(0, length)

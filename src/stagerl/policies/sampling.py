"""The sampling math every policy adapter shares: guidance, truncation, scored statistics, draws.

One implementation for every adapter (docs/algorithm.md §1), so the behaviour and scored
distributions cannot drift apart between models:
- *behaviour* (what sampling draws from): CFG logits u + s·(c − u), divided by the temperature,
  then top-k / top-p truncation (:func:`behaviour_logits`);
- *scored* (what the loss, KL and entropy use): ``cond`` = c / T, ``cfg`` = (u + s·(c − u)) / T with
  the unconditional branch detached, never truncated (:func:`scored_logits`, :func:`token_stats`).

Randomness enters in :func:`draw`, in one of two ways:
- a ``torch.Generator`` (what ``generate()``-style samplers use). A generator belongs to one device;
  :func:`draw` makes its draw on the generator's device and moves the result, so a CPU generator
  never meets CUDA probabilities inside ``torch.multinomial`` (which refuses that);
- pre-drawn **noise**: one uniform u in [0, 1) per row and position, token = inverse CDF at u. The
  trainer draws it per prompt group from a generator seeded by (seed, step, global group index),
  so a rollout's tokens do not depend on how groups are spread over processes or micro-batches,
  nor on the device: a 2-process run samples exactly what a 1-process run samples.

:func:`sample_tokens` is the one sampling loop over a batch of prompts: training rollouts,
evaluation, ``stagerl sample``, pretraining checks and the study all call it, and differ only in
where their noise comes from (:func:`group_noise` per prompt group, :func:`chunk_noise` per
evaluation chunk).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from stagerl.policies.base import Policy, PromptInputs, SamplingParams


def guide(cond: Tensor, uncond: Tensor | None, cfg_scale: float) -> Tensor:
    """u + s·(c − u) on raw logits [..., V] (``uncond`` None = no guidance)."""
    return cond if uncond is None else uncond + cfg_scale * (cond - uncond)


def truncate_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p (nucleus) truncation; removed entries become -inf. [N, V] -> [N, V].

    The most likely token is always kept. Ties at the k-th value are kept (as transformers'
    TopKLogitsWarper); top-p drops a token once the mass before it reaches p.
    """
    out = logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # mass before this token >= p
        drop_sorted[..., 0] = False
        out = out.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return out


def behaviour_logits(cond: Tensor, uncond: Tensor | None, cfg_scale: float, temperature: float,
                     top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The behaviour distribution's logits [N, V]: guided, tempered, truncated."""
    return truncate_logits(guide(cond, uncond, cfg_scale) / temperature, top_k, top_p)


def scored_logits(cond: Tensor, uncond: Tensor | None, mode: str, cfg_scale: float,
                  temperature: float) -> Tensor:
    """The scored distribution's logits: c / T (``cond``), or guided with u detached (``cfg``)."""
    if mode == "cond" or uncond is None:
        return cond / temperature
    return guide(cond, uncond.detach(), cfg_scale) / temperature


def token_stats(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """[..., V] logits, [...] ids -> (log-prob of the ids, entropy of the full distribution)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def chunked_token_stats(head: Callable[[Tensor], Tensor], h_cond: Tensor, h_uncond: Tensor | None,
                        tokens: Tensor, mode: str, cfg_scale: float, temperature: float,
                        chunk_size: int = 0,
                        head_in_checkpoint: bool = True) -> tuple[Tensor, Tensor]:
    """Teacher-forced (log-prob of ``tokens``, entropy), both [N, L], from hidden states [N, L, H].

    ``head`` maps [..., H] to image-token logits [..., V]; ``h_uncond`` (``cfg`` mode only) runs
    without gradients. With ``chunk_size`` > 0 the head and the log-softmax run over that many
    positions at a time, each chunk under activation checkpointing when gradients flow, so an
    [N, L, V] fp32 tensor never exists, not even for backward (benchmarks/logprob_memory.py).
    ``head_in_checkpoint=False`` keeps the head outside the checkpoint (its logits are saved per
    chunk) for engines whose weights exist only around the head's own forward (ZeRO-3).
    """
    def uncond_logits(hu: Tensor | None) -> Tensor | None:
        if hu is None:
            return None
        with torch.no_grad():
            return head(hu).float()

    def logit_stats(lc: Tensor, lu: Tensor | None, tok: Tensor) -> tuple[Tensor, Tensor]:
        return token_stats(scored_logits(lc, lu, mode, cfg_scale, temperature), tok)

    def chunk_stats(hc: Tensor, hu: Tensor | None, tok: Tensor) -> tuple[Tensor, Tensor]:
        return logit_stats(head(hc).float(), uncond_logits(hu), tok)

    length = tokens.shape[1]
    step = chunk_size if chunk_size > 0 else length
    recompute = chunk_size > 0 and torch.is_grad_enabled() and h_cond.requires_grad
    logps, ents = [], []
    for a in range(0, length, step):
        sl = slice(a, a + step)
        hc, hu, tok = h_cond[:, sl], None if h_uncond is None else h_uncond[:, sl], tokens[:, sl]
        if recompute and head_in_checkpoint:
            lp, ent = checkpoint(chunk_stats, hc, hu, tok, use_reentrant=False)
        elif recompute:
            lp, ent = checkpoint(logit_stats, head(hc).float(), uncond_logits(hu), tok,
                                 use_reentrant=False)
        else:
            lp, ent = chunk_stats(hc, hu, tok)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps, 1), torch.cat(ents, 1)


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


def chunk_noise(seed: int, rows: int, length: int) -> Tensor:
    """[rows, L] uniforms from one generator seeded ``seed``, drawn position by position (one
    uniform per row per step), i.e. the draws a sampler stepping a ``torch.Generator`` makes."""
    return torch.rand(length, rows, generator=torch.Generator().manual_seed(seed)).T


def group_noise(group_seeds: list[int], group_size: int, length: int) -> Tensor:
    """[len(group_seeds) * group_size, L] uniforms; group k's G rows come from its own seed."""
    rows = [torch.rand(group_size, length, generator=torch.Generator().manual_seed(s))
            for s in group_seeds]
    return torch.cat(rows) if rows else torch.zeros(0, length)


@torch.no_grad()
def sample_tokens(policy: Policy, prompts: list[str], params: SamplingParams, noise: Tensor,
                  micro: int = 0) -> tuple[PromptInputs, Tensor, Tensor, Tensor]:
    """The sampling loop: ``prompts`` (N) -> (inputs [N, T], tokens [N, L], scored log-probs
    [N, L], scored entropies [N, L]), ``micro`` rows at a time (0 = all at once), row i drawing
    with ``noise[i]`` [L], so the tokens do not depend on the micro-batching."""
    device = next(policy.parameters()).device
    inputs = policy.encode_prompts(prompts).to(device)
    noise = noise.to(device)
    micro = micro or len(prompts)
    toks, lps, ents = [], [], []
    for s in range(0, len(prompts), micro):
        out = policy.sample(inputs.select(slice(s, s + micro)), params, noise=noise[s:s + micro])
        toks.append(out.tokens)
        lps.append(out.logprobs.float())
        ents.append(out.entropy.float())
    return inputs, torch.cat(toks), torch.cat(lps), torch.cat(ents)

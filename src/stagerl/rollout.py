"""The rollout phase (no gradients) and the typed container it hands to the update phase.

Shapes: P prompts on this process, G samples each, N = P * G sequences, L image tokens, D code
embedding dims, K reward columns. Every ``Rollout`` field documents its shape.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from stagerl import algo
from stagerl.data import PromptItem
from stagerl.policies.base import PromptInputs, SamplingParams
from stagerl.rewards.base import RewardSet


@dataclass
class Rollout:
    prompts: list[str]  # N prompts, each repeated G times (group-major)
    metadata: list[dict[str, Any]]  # N metadata dicts
    group_index: torch.Tensor  # [N] int64, global prompt index of each sequence
    inputs: PromptInputs  # [N, T] tokenised prompts (both CFG branches)
    tokens: torch.Tensor  # [N, L] int64 sampled image tokens
    old_logprobs: torch.Tensor  # [N, L] scored log-probs at rollout time (teacher-forced)
    behaviour_logprobs: torch.Tensor  # [N, L] log-probs under the sampling distribution
    entropy: torch.Tensor  # [N, L] policy entropy H_{i,t}
    ref_logprobs: torch.Tensor | None  # [N, L] reference log-probs, None without a reference
    ref_entropy: torch.Tensor | None  # [N, L] reference entropy H^ref_{i,t}
    code_emb: torch.Tensor  # [N, L, D] L2-normalised VQ code vectors q_{i,t}
    images: list[Image.Image]  # N decoded images
    reward_columns: torch.Tensor  # [N, K] raw reward r_{k,i} (invalid entries set to 0)
    reward_valid: torch.Tensor  # [N, K] bool
    rewards: torch.Tensor  # [N] combined reward R_i, entropy reward included
    advantages: torch.Tensor  # [N] A_i
    c_bar: torch.Tensor  # [N, L] mean opposite-sign similarity c̄_{i,t}
    token_weights: torch.Tensor  # [N, L] w_{i,t} (ones when reweighting is off)
    kl_weights: torch.Tensor  # [N, L] m_{i,t} (ones when KL reweighting is off)
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@torch.no_grad()
def _teacher_forced(model: Any, inputs: PromptInputs, tokens: torch.Tensor, cfg: Any,
                    micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    lps, ents = [], []
    for s in range(0, len(tokens), micro):
        st = model(inputs.select(slice(s, s + micro)), tokens[s:s + micro],
                   logprob_mode=cfg.sampling.logprob_mode, cfg_scale=cfg.sampling.cfg_scale,
                   temperature=cfg.sampling.temperature, chunk_size=cfg.sampling.logprob_chunk)
        lps.append(st.logprobs.float())
        ents.append(st.entropy.float())
    return torch.cat(lps), torch.cat(ents)


@torch.no_grad()
def generate(policy: Any, items: list[PromptItem], group_size: int, params: SamplingParams,
             generator: torch.Generator, micro: int = 0):
    """Sample G sequences per prompt -> (inputs [N,T], tokens [N,L], scored lp, behaviour lp)."""
    prompts = [it.prompt for it in items for _ in range(group_size)]
    device = next(policy.parameters()).device
    inputs = policy.encode_prompts(prompts).to(device)
    micro = micro or len(prompts)
    toks, lps, blps = [], [], []
    for s in range(0, len(prompts), micro):
        out = policy.sample(inputs.select(slice(s, s + micro)), params, generator=generator)
        toks.append(out.tokens)
        lps.append(out.logprobs.float())
        blps.append(out.behaviour_logprobs.float())
    return inputs, torch.cat(toks), torch.cat(lps), torch.cat(blps)


def rollout(policy: Any, reference: Any | None, items: list[PromptItem], first_group: int,
            rewards: RewardSet, cfg: Any, generator: torch.Generator,
            train_forward: Any | None = None) -> Rollout:
    """Sample, score and compute advantages and token weights for ``items`` (this process's prompts).

    ``policy`` is the unwrapped module (sampling, embeddings, decoding); ``train_forward`` is the
    module whose ``forward`` gives teacher-forced stats (the accelerate-prepared wrapper; defaults to
    ``policy``).
    """
    G = cfg.sampling.group_size
    params = SamplingParams(cfg.sampling.cfg_scale, cfg.sampling.temperature, cfg.sampling.top_k,
                            cfg.sampling.top_p, cfg.sampling.logprob_mode)
    t0 = time.perf_counter()
    inputs, tokens, sample_lp, behaviour_lp = generate(policy, items, G, params, generator,
                                                       cfg.sampling.micro_batch)
    t1 = time.perf_counter()
    micro = cfg.sampling.micro_batch or len(tokens)
    old_lp, entropy = _teacher_forced(train_forward or policy, inputs, tokens, cfg, micro)
    ref_lp = ref_ent = None
    if reference is not None:
        ref_lp, ref_ent = _teacher_forced(reference, inputs, tokens, cfg, micro)
    with torch.no_grad():
        code_emb = policy.code_embeddings(tokens).float()
        images = policy.decode(tokens)
    prompts = [it.prompt for it in items for _ in range(G)]
    metadata = [it.metadata for it in items for _ in range(G)]
    group_index = torch.arange(first_group, first_group + len(items)).repeat_interleave(G)
    t2 = time.perf_counter()
    columns, valid, _ = rewards(images, prompts, metadata)
    t3 = time.perf_counter()
    ro = Rollout(prompts, metadata, group_index, inputs, tokens, old_lp, behaviour_lp, entropy,
                 ref_lp, ref_ent, code_emb, images, columns, valid, rewards=torch.zeros(0),
                 advantages=torch.zeros(0), c_bar=torch.zeros(0), token_weights=torch.zeros(0),
                 kl_weights=torch.zeros(0))
    ro.metrics["rollout/logprob_gap"] = float((sample_lp - old_lp).abs().max())
    score_rollout(ro, cfg, rewards.names)
    ro.metrics.update({"perf/sample_s": t1 - t0, "perf/logprob_decode_s": t2 - t1,
                       "perf/reward_s": t3 - t2, "perf/advantage_s": time.perf_counter() - t3})
    return ro


def score_rollout(ro: Rollout, cfg: Any, names: list[str]) -> None:
    """Rewards -> R_i (§1, §2) -> A_i (§1) -> c̄, w, m (§3, §4), in place. Pure algo calls."""
    a = cfg.algo
    device = ro.tokens.device
    gi = ro.group_index.to(device)
    cols = ro.reward_columns.to(device).float()
    valid = ro.reward_valid.to(device)  # non-finite *valid* scores are stopped by the trainer
    # An image a reward could not score must not masquerade as a 0 score (issue 6): either its whole
    # group is silenced (the default) or, on request, it is scored 0.
    bad_group = torch.zeros_like(gi, dtype=torch.bool)
    if not bool(valid.all()):
        bad = (~valid).any(dim=1)
        if cfg.reward.on_invalid == "skip_group":
            bad_group = torch.isin(gi, gi[bad])
    cols = torch.where(valid, cols, torch.zeros_like(cols))
    ro.reward_columns = cols
    weights = torch.tensor(cfg.reward.weights or [1.0] * len(names), dtype=torch.float32,
                           device=device)
    comb = algo.combine_rewards(cols, gi, weights, drop_tied=cfg.reward.drop_tied_columns,
                                tied_std=cfg.reward.tied_std)
    total = comb.total
    group_tied = comb.group_tied | bad_group
    if a.entropy_reward != "off" and ro.ref_entropy is not None:
        total, bonus = algo.entropy_reward(total, ro.entropy.mean(1), ro.ref_entropy.mean(1), gi,
                                           mode=a.entropy_reward, coef=a.entropy_coef)
        ro.metrics["reward/entropy_bonus_abs"] = float(bonus.abs().mean())
    total = torch.where(bad_group, torch.zeros_like(total), total)
    ro.rewards = total
    ro.advantages = algo.group_advantages(total, gi, eps=a.adv_eps)
    ro.advantages = torch.where(bad_group, torch.zeros_like(ro.advantages), ro.advantages)
    ro.c_bar = algo.mean_opposite_similarity(ro.code_emb.to(device), ro.advantages, gi,
                                             variant=a.variant)
    entropy_on = a.entropy_reward != "off" and ro.ref_entropy is not None
    # The tied-group rule (§3.6) also covers groups silenced for invalid rewards.
    tied_for_rule = group_tied if not entropy_on else bad_group
    if a.reweight:
        ro.token_weights = algo.token_weights(ro.c_bar, tied_for_rule, entropy_reward_on=False)
    else:
        ro.token_weights = torch.where(tied_for_rule[:, None], 0.0,
                                       torch.ones_like(ro.c_bar))
    ro.kl_weights = algo.kl_weights(ro.c_bar, tied_for_rule) if a.kl_reweight else torch.ones_like(ro.c_bar)
    ro.metrics.update(_reward_metrics(ro, names, valid, group_tied))


def _reward_metrics(ro: Rollout, names: list[str], valid: torch.Tensor,
                    group_tied: torch.Tensor) -> dict[str, float]:
    m: dict[str, float] = {}
    for k, name in enumerate(names):
        col = ro.reward_columns[:, k]
        m[f"reward/{name}/mean"] = float(col.mean())
        m[f"reward/{name}/std"] = float(col.std()) if len(col) > 1 else 0.0
        m[f"reward/{name}/invalid"] = float((~valid[:, k]).sum())
        tags = [md.get("tag") for md in ro.metadata]
        for tag in sorted({t for t in tags if t}):
            sel = torch.tensor([t == tag for t in tags])
            m[f"reward/{name}/{tag}"] = float(col[sel].mean())
    m["reward/total/mean"] = float(ro.rewards.mean())
    m["reward/tied_group_frac"] = float(group_tied.float().mean())
    m["adv/mean"] = float(ro.advantages.mean())
    m["adv/std"] = float(ro.advantages.std()) if len(ro.advantages) > 1 else 0.0
    m["adv/abs_max"] = float(ro.advantages.abs().max())
    m["algo/w_mean"] = float(ro.token_weights.mean())
    m["algo/m_mean"] = float(ro.kl_weights.mean())
    m["algo/c_bar_mean"] = float(ro.c_bar.mean())
    m["policy/entropy"] = float(ro.entropy.mean())
    if ro.ref_entropy is not None:
        m["ref/entropy"] = float(ro.ref_entropy.mean())
        m["policy/kl_k3"] = float(algo.kl_divergence(ro.old_logprobs, ro.ref_logprobs, "k3").mean())
    m["rollout/samples"] = float(len(ro))
    if not math.isfinite(m["reward/total/mean"]):
        m["reward/total/mean"] = float("nan")
    return m

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
from stagerl.data import PromptItem, mix_seed
from stagerl.policies.base import Policy, PromptInputs, SamplingParams
from stagerl.policies.sampling import group_noise, sample_tokens
from stagerl.quality import within_prompt_diversity
from stagerl.rewards.base import RewardSet
from stagerl.config_schema import Config


@dataclass
class Scores:
    """What the algorithm derives from one rollout's rewards and code vectors (pure math)."""

    reward_columns: torch.Tensor  # [N, K] raw reward r_{k,i} (invalid entries set to 0)
    rewards: torch.Tensor  # [N] combined reward R_i, entropy reward included
    advantages: torch.Tensor  # [N] A_i
    c_bar: torch.Tensor  # [N, L] mean opposite-sign similarity c̄_{i,t}
    token_weights: torch.Tensor  # [N, L] w_{i,t} (ones when reweighting is off)
    kl_weights: torch.Tensor  # [N, L] m_{i,t} (ones when KL reweighting is off)
    loss_coef: torch.Tensor  # [N, L] c_{i,t}: each token's coefficient in L_pg (the aggregation)
    metrics: dict[str, float]


@dataclass
class Rollout:
    prompts: list[str]  # N prompts, each repeated G times (group-major)
    metadata: list[dict[str, Any]]  # N metadata dicts
    group_index: torch.Tensor  # [N] int64, global prompt index of each sequence
    inputs: PromptInputs  # [N, T] tokenised prompts (both CFG branches)
    tokens: torch.Tensor  # [N, L] int64 sampled image tokens
    old_logprobs: torch.Tensor  # [N, L] scored log-probs at rollout time (teacher-forced)
    entropy: torch.Tensor  # [N, L] policy entropy H_{i,t}
    ref_logprobs: torch.Tensor | None  # [N, L] reference log-probs, None without a reference
    ref_entropy: torch.Tensor | None  # [N, L] reference entropy H^ref_{i,t}
    code_emb: torch.Tensor  # [N, L, D] L2-normalised VQ code vectors q_{i,t}
    images: list[Image.Image]  # N decoded images
    reward_valid: torch.Tensor  # [N, K] bool
    scores: Scores  # rewards, advantages, weights and loss coefficients
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    # The update phase reads these through the rollout.
    @property
    def rewards(self) -> torch.Tensor:  # [N]
        return self.scores.rewards

    @property
    def reward_columns(self) -> torch.Tensor:  # [N, K]
        return self.scores.reward_columns

    @property
    def advantages(self) -> torch.Tensor:  # [N]
        return self.scores.advantages

    @property
    def token_weights(self) -> torch.Tensor:  # [N, L]
        return self.scores.token_weights

    @property
    def kl_weights(self) -> torch.Tensor:  # [N, L]
        return self.scores.kl_weights


@torch.no_grad()
def _teacher_forced(model: torch.nn.Module, inputs: PromptInputs, tokens: torch.Tensor,
                    cfg: Config, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    lps, ents = [], []
    for s in range(0, len(tokens), micro):
        st = model(inputs.select(slice(s, s + micro)), tokens[s:s + micro],
                   logprob_mode=cfg.sampling.logprob_mode, cfg_scale=cfg.sampling.cfg_scale,
                   temperature=cfg.sampling.temperature, chunk_size=cfg.sampling.logprob_chunk)
        lps.append(st.logprobs.float())
        ents.append(st.entropy.float())
    return torch.cat(lps), torch.cat(ents)


@torch.no_grad()
def generate(policy: Policy, items: list[PromptItem], first_group: int, group_size: int,
             params: SamplingParams, seed: int, micro: int = 0):
    """Sample G sequences per prompt -> (inputs [N, T], tokens [N, L], scored log-probs [N, L],
    scored entropies [N, L]).

    Group k's randomness comes from (seed, its global index ``first_group + k``) only, so the
    tokens do not depend on the process layout, the micro-batching or the device
    (:mod:`stagerl.policies.sampling`).
    """
    prompts = [it.prompt for it in items for _ in range(group_size)]
    noise = group_noise([mix_seed(seed, first_group + k) for k in range(len(items))], group_size,
                        policy.num_image_tokens)  # [N, L]
    return sample_tokens(policy, prompts, params, noise, micro)


def rollout(policy: Policy, reference: Policy | None, items: list[PromptItem], first_group: int,
            rewards: RewardSet, cfg: Config, seed: int,
            train_forward: torch.nn.Module | None = None,
            monitors: RewardSet | None = None) -> Rollout:
    """Sample, score and compute advantages and token weights for ``items`` (this process's prompts).

    ``policy`` is the unwrapped module (sampling, embeddings, decoding); ``train_forward`` is the
    module whose ``forward`` gives teacher-forced stats (the accelerate-prepared wrapper; defaults to
    ``policy``). ``seed`` is this step's sampling seed (see :func:`generate`). ``monitors``
    (:meth:`RewardSet.monitors`) score the same images for the log only (``monitor/<name>/mean``):
    the gold rewards beside a learned proxy.
    """
    G = cfg.sampling.group_size
    params = SamplingParams.from_config(cfg.sampling)
    t0 = time.perf_counter()
    inputs, tokens, old_lp, entropy = generate(policy, items, first_group, G, params, seed,
                                               cfg.sampling.micro_batch)
    t1 = time.perf_counter()
    micro = cfg.sampling.micro_batch or len(tokens)
    gap = None
    if not cfg.sampling.reuse_sample_stats:  # a second, teacher-forced pass of the policy
        sample_lp = old_lp
        old_lp, entropy = _teacher_forced(train_forward or policy, inputs, tokens, cfg, micro)
        gap = float((sample_lp - old_lp).abs().max())
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
    scores = score_rollout(columns, valid, group_index, code_emb, entropy, ref_ent, cfg,
                           rewards.names, [md.get("tag") for md in metadata],
                           logp=old_lp, ref_logp=ref_lp)
    ro = Rollout(prompts, metadata, group_index, inputs, tokens, old_lp, entropy, ref_lp, ref_ent,
                 code_emb, images, valid, scores, metrics=dict(scores.metrics))
    if gap is not None:
        ro.metrics["rollout/logprob_gap"] = gap
    if ref_lp is not None:
        kl = algo.kl_divergence(old_lp, ref_lp, "k3")  # [N, L]
        ro.metrics["policy/kl_k3"] = float(kl.mean())
        # KL of a whole image to the reference: by the chain rule, the sum of the per-token KLs
        # (the KL that reward over-optimisation is plotted against; docs/study.md)
        ro.metrics["policy/kl_seq_k3"] = float(kl.sum(-1).mean())
    if monitors is not None:
        m_cols, m_valid, _ = monitors(images, prompts, metadata)  # [N, M]
        for k, name in enumerate(monitors.names):
            ok = m_valid[:, k]
            ro.metrics[f"monitor/{name}/mean"] = float(m_cols[ok, k].mean()) if ok.any() \
                else float("nan")
    perf = {"perf/sample_s": t1 - t0, "perf/logprob_decode_s": t2 - t1,
            "perf/reward_s": t3 - t2, "perf/advantage_s": time.perf_counter() - t3}
    if G >= 2:  # mode collapse within a group (quality.within_prompt_diversity)
        ro.metrics.update({f"rollout/diversity/{k}": v
                           for k, v in within_prompt_diversity(tokens, G).items()})
    ro.metrics.update(perf)
    return ro


def score_rollout(columns: torch.Tensor, valid: torch.Tensor, group_index: torch.Tensor,
                  code_emb: torch.Tensor, entropy: torch.Tensor, ref_entropy: torch.Tensor | None,
                  cfg: Config, names: list[str], tags: list[str | None],
                  logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None) -> Scores:
    """Rewards -> R_i -> A_i -> c̄, w, m -> loss coefficients (docs/algorithm.md §2-§5). Pure.

    ``logp`` / ``ref_logp`` [N, L] (rollout and reference log-probs) are read by GCPO's dynamic
    advantage weight only (``algo.token_select=gcpo``, docs/algorithm.md §11).

    ``columns`` [N, K] raw rewards, ``valid`` [N, K], ``group_index`` [N], ``code_emb`` [N, L, D],
    ``entropy`` / ``ref_entropy`` [N, L]. The reward arithmetic runs in fp64: an entropy bonus of
    ~1e-5 added to a reward of 1 would lose most of its digits in fp32, and in a tied group those
    digits become the whole advantage.
    """
    a = cfg.algo
    device = code_emb.device
    gi = group_index.to(device)
    valid = valid.to(device)  # non-finite *valid* scores are stopped by the trainer
    # An image a reward could not score must not masquerade as a 0 score: either its whole group is
    # silenced (the default) or, on request, it is scored 0.
    silenced = torch.zeros_like(gi, dtype=torch.bool)
    if not bool(valid.all()) and cfg.reward.on_invalid == "skip_group":
        silenced = torch.isin(gi, gi[(~valid).any(dim=1)])
    cols = torch.where(valid, columns.to(device).double(), torch.zeros((), dtype=torch.float64,
                                                                      device=device))
    weights = torch.tensor(cfg.reward.weights or [1.0] * len(names), dtype=torch.float64,
                           device=device)
    comb = algo.combine_rewards(cols, gi, weights, drop_tied=cfg.reward.drop_tied_columns,
                                tied_std=cfg.reward.tied_std)
    total = comb.total
    metrics: dict[str, float] = {}
    entropy_on = a.entropy_reward != "off" and ref_entropy is not None
    if entropy_on:
        total, bonus = algo.entropy_reward(total, entropy.double().mean(1),
                                           ref_entropy.double().mean(1), gi,
                                           mode=a.entropy_reward, coef=a.entropy_coef,
                                           tied=a.entropy_tied, tied_std=cfg.reward.tied_std)
        metrics["reward/entropy_bonus_abs"] = float(bonus.abs().mean())
    total = torch.where(silenced, torch.zeros_like(total), total)
    adv = algo.group_advantages(total, gi, eps=a.adv_eps, scale=a.adv_scale, counted=~silenced)
    adv = torch.where(silenced, torch.zeros_like(adv), adv).float()
    c_bar = algo.mean_opposite_similarity(code_emb, adv, gi, partner_set=a.partner_set)
    w, m = algo.loss_weights(c_bar, reweight=a.reweight, kl_reweight=a.kl_reweight,
                             group_tied=comb.group_tied, silenced=silenced,
                             entropy_reward_on=entropy_on)
    if a.token_select == "gcpo":  # GCPO's critical tokens carry the loss (docs/algorithm.md §11)
        if logp is None or ref_logp is None:
            raise ValueError("algo.token_select=gcpo needs the rollout and reference log-probs")
        sel = algo.gcpo_token_mask(entropy, code_emb, gi, frac=a.gcpo_frac)
        kappa = algo.dynamic_advantage_weight(logp.to(device), ref_logp.to(device),
                                              clip=a.gcpo_kappa_clip)
        w = sel.float()  # STAGE's weights are off under GCPO (config rule): w = the selection
        coef, m = algo.gcpo_weights(w, kappa, algo.loss_coefficients(w, agg=a.loss_agg,
                                                                     group_index=gi))
        metrics["algo/gcpo_selected_frac"] = float(sel.float().mean())
        metrics["algo/gcpo_kappa_mean"] = float((kappa * sel).sum() / sel.sum().clamp(min=1))
    else:
        coef = algo.loss_coefficients(w, agg=a.loss_agg, group_index=gi)
    scores = Scores(cols.float(), total.float(), adv, c_bar, w, m, coef, metrics)
    metrics.update(_reward_metrics(scores, names, valid, comb.group_tied | silenced, tags))
    metrics["policy/entropy"] = float(entropy.mean())
    if ref_entropy is not None:
        metrics["ref/entropy"] = float(ref_entropy.mean())
    return scores


def _reward_metrics(sc: Scores, names: list[str], valid: torch.Tensor, group_tied: torch.Tensor,
                    tags: list[str | None]) -> dict[str, float]:
    m: dict[str, float] = {}
    for k, name in enumerate(names):
        col = sc.reward_columns[:, k]
        m[f"reward/{name}/mean"] = float(col.mean())
        m[f"reward/{name}/std"] = float(col.std()) if len(col) > 1 else 0.0
        m[f"reward/{name}/invalid"] = float((~valid[:, k]).sum())
        for tag in sorted({t for t in tags if t}):
            sel = torch.tensor([t == tag for t in tags], device=col.device)
            m[f"reward/{name}/{tag}"] = float(col[sel].mean())
    m["reward/total/mean"] = float(sc.rewards.mean())
    m["reward/tied_group_frac"] = float(group_tied.float().mean())
    m["adv/mean"] = float(sc.advantages.mean())
    m["adv/std"] = float(sc.advantages.std()) if len(sc.advantages) > 1 else 0.0
    m["adv/abs_max"] = float(sc.advantages.abs().max())
    m["algo/w_mean"] = float(sc.token_weights.mean())
    m["algo/m_mean"] = float(sc.kl_weights.mean())
    m["algo/c_bar_mean"] = float(sc.c_bar.mean())
    m["rollout/samples"] = float(len(sc.rewards))
    if not math.isfinite(m["reward/total/mean"]):
        m["reward/total/mean"] = float("nan")
    return m

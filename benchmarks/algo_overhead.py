"""What STAGE's extras cost on top of a vanilla GRPO loss, and what the batched c̄ saves.

Run: ``OMP_NUM_THREADS=1 python benchmarks/algo_overhead.py [--repeats 15]``

At the Janus-Pro shapes (G = 8, L = 576 = 24×24, D = 8, V = 16384) on CPU, timed side by side in one
run (variants interleaved in every repeat, median reported):

(a) vanilla GRPO loss computation, forward only: log-softmax over the [G, L, V] logits, gather of
    ℓ, per-token entropy H (logged by every trainer), combined rewards, advantages, policy loss
    and k3 KL;
(b) the same plus STAGE's extras: entropy reward (docs/algorithm.md §3), similarity c̄ (§4), token weights w, KL
    weights m, the weighted losses. H̄^ref is an input, like ℓ^ref: both come from the reference
    forward at rollout time. The extra cost of H^ref there (one exp·mul·sum over the reference
    log-softmax, which ℓ^ref needs anyway) is timed as its own row, for the record.
An A/A control, (a) timed a second time in the same loop, shows how much of the end-to-end
(b)/(a) ratio is machine noise; the extras are also timed alone, which is the precise number.
(c) the batched c̄ (one einsum) against a loop in the shape of the authors' code: Python loops over
    i, j with a per-pair cosine over the L positions.
(d) GCPO (docs/algorithm.md §11) timed in the same interleaved loop as (a) and (b): (a) plus its
    token selection (causal ∪ entropy gradient ∪ diversity), κ, and the coefficients (c, m); and
    those extras timed alone, whose ratio to (a) is the precise number (goal ≤ 3 %).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

from stagerl.algo import (combine_rewards, entropy_reward, group_advantages,  # noqa: E402
                          kl_weights, mean_opposite_similarity, stage_loss, token_weights,
                          dynamic_advantage_weight, gcpo_token_mask, gcpo_weights,
                          loss_coefficients)


def make_inputs(g: int, length: int, dim: int, vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    codebook = F.normalize(torch.randn(vocab, dim, generator=gen), dim=-1)  # [V, D] q
    tokens = torch.randint(0, vocab, (g, length), generator=gen)  # [G, L]
    return {
        "logits": torch.randn(g, length, vocab, generator=gen).requires_grad_(True),  # [G, L, V]
        "ref_logits": torch.randn(g, length, vocab, generator=gen),  # [G, L, V]
        "tokens": tokens,
        "ref_logp": -torch.rand(g, length, generator=gen) * 10 - 5,  # [G, L] ℓ^ref
        "ref_entropy_mean": torch.rand(g, generator=gen) + 9.0,  # [G] H̄^ref
        "rewards": torch.randint(0, 2, (g, 3), generator=gen).float(),  # [G, K] r_k
        "group_index": torch.zeros(g, dtype=torch.long),  # [G] one prompt
        "emb": codebook[tokens],  # [G, L, D] q_{i,t}
    }


def logp_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    lp = torch.log_softmax(logits.float(), dim=-1)  # [G, L, V]
    logp = lp.gather(-1, tokens[..., None]).squeeze(-1)  # [G, L] ℓ
    entropy = -(lp.exp() * lp).sum(-1)  # [G, L] H
    return logp, entropy


def vanilla(x: dict) -> torch.Tensor:
    logp, entropy = logp_and_entropy(x["logits"], x["tokens"])
    combined = combine_rewards(x["rewards"], x["group_index"])
    adv = group_advantages(combined.total, x["group_index"])
    loss, _ = stage_loss(logp, logp.detach(), adv, ref_logp=x["ref_logp"], beta=0.03)
    return loss


def stage(x: dict) -> torch.Tensor:
    logp, entropy = logp_and_entropy(x["logits"], x["tokens"])
    gi = x["group_index"]
    combined = combine_rewards(x["rewards"], gi)
    rewards, _ = entropy_reward(combined.total, entropy.detach().mean(1), x["ref_entropy_mean"],
                                gi, mode="max_only")
    adv = group_advantages(rewards, gi)
    c_bar = mean_opposite_similarity(x["emb"], adv, gi, "fixed")
    w = token_weights(c_bar, combined.group_tied, entropy_reward_on=True)
    m = kl_weights(c_bar, combined.group_tied, entropy_reward_on=True)
    loss, _ = stage_loss(logp, logp.detach(), adv, ref_logp=x["ref_logp"], token_weights=w,
                         kl_weights=m, beta=0.03)
    return loss


def stage_extras_alone(x: dict, entropy_mean: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Only what (b) adds to (a): e_i, c̄, w, m (the w·, m· products inside the loss excluded)."""
    gi = x["group_index"]
    new_rewards, _ = entropy_reward(rewards, entropy_mean, x["ref_entropy_mean"], gi)
    adv = group_advantages(new_rewards, gi)
    c_bar = mean_opposite_similarity(x["emb"], adv, gi, "fixed")
    tied = torch.zeros_like(gi, dtype=torch.bool)
    return token_weights(c_bar, tied, True) + kl_weights(c_bar, tied, True)


def gcpo_extras_alone(x: dict, entropy: torch.Tensor, logp: torch.Tensor) -> tuple:
    """Only what GCPO adds to (a): the selection, κ and the coefficients (c, m)."""
    sel = gcpo_token_mask(entropy, x["emb"], x["group_index"], frac=0.1).float()
    kappa = dynamic_advantage_weight(logp, x["ref_logp"], clip=0.5)
    return gcpo_weights(sel, kappa, loss_coefficients(sel, agg="batch_weighted_mean"))


def gcpo(x: dict) -> torch.Tensor:
    logp, entropy = logp_and_entropy(x["logits"], x["tokens"])
    combined = combine_rewards(x["rewards"], x["group_index"])
    adv = group_advantages(combined.total, x["group_index"])
    c, m = gcpo_extras_alone(x, entropy.detach(), logp.detach())
    loss, _ = stage_loss(logp, logp.detach(), adv, ref_logp=x["ref_logp"], kl_weights=m,
                         beta=0.04, coefficients=c, num_tokens=float(logp.numel()))
    return loss


def ref_entropy_extra(x: dict) -> float:
    """Rollout-time seconds of H^ref alone: the reference log-softmax is paid for ℓ^ref anyway."""
    with torch.no_grad():
        lp = torch.log_softmax(x["ref_logits"], dim=-1)
        start = time.perf_counter()
        _ = -(lp.exp() * lp).sum(-1).mean(1)
        return time.perf_counter() - start


def authors_style_loop(emb: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """One group [G, L, D]: for i, for j, a per-pair cosine over L when A_i·A_j < 0."""
    g, length, _ = emb.shape
    out = torch.zeros(g, length)
    for i in range(g):
        total, count = torch.zeros(length), 0
        for j in range(g):
            if adv[i] * adv[j] < 0:
                total += F.cosine_similarity(emb[i], emb[j], dim=-1)
                count += 1
        out[i] = total / count if count else 0.0
    return out


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call, per repeat; every repeat runs every variant once, in rotating order."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], base: str, other: str) -> float:
    """Median over repeats of other/base: the two ran back to back, under the same load."""
    return statistics.median(o / b for b, o in zip(times[base], times[other]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=576)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    args = parser.parse_args()
    g, length, dim, vocab = args.group_size, args.length, args.dim, args.vocab
    print(f"torch {torch.__version__}, CPU, torch threads = {torch.get_num_threads()}; "
          f"G={g} L={length} D={dim} V={vocab}; median of {args.repeats} interleaved repeats")
    x = make_inputs(g, length, dim, vocab)

    with torch.no_grad():
        logp0, entropy0 = logp_and_entropy(x["logits"], x["tokens"])  # [G, L] ℓ, H
        entropy_mean = entropy0.mean(1)  # [G] H̄
    total = combine_rewards(x["rewards"], x["group_index"]).total
    # "control" is (a) again: its ratio to (a) shows how much of (b)/(a) is machine noise.
    times = time_interleaved({"vanilla": lambda: vanilla(x), "stage": lambda: stage(x),
                              "control": lambda: vanilla(x),
                              "extras": lambda: stage_extras_alone(x, entropy_mean, total),
                              "gcpo": lambda: gcpo(x),
                              "gcpo_extras": lambda: gcpo_extras_alone(x, entropy0, logp0)},
                             args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    ref_h = statistics.median(ref_entropy_extra(x) for _ in range(5))
    extra = med["stage"] - med["vanilla"]
    print("\n(a) vs (b): loss computation, forward only")
    print(f"{'variant':<44}{'median ms':>12}")
    print(f"{'(a) vanilla GRPO (logsoftmax+H, A, L_pg, k3)':<44}{med['vanilla'] * 1e3:>12.2f}")
    print(f"{'(b) STAGE (a + e_i, c-bar, w, m)':<44}{med['stage'] * 1e3:>12.2f}")
    print(f"{'    (b) - (a)  (difference of medians)':<44}{extra * 1e3:>12.2f}")
    print(f"{'    extras timed alone: e_i, c-bar, w, m':<44}{med['extras'] * 1e3:>12.2f}")
    print(f"{'    H^ref at rollout (not in (b))':<44}{ref_h * 1e3:>12.2f}")
    print(f"{'    (a) again, A/A noise control':<44}{med['control'] * 1e3:>12.2f}")
    print(f"ratio (b)/(a) end to end: {med['stage'] / med['vanilla']:.4f} (medians), "
          f"{paired_ratio(times, 'vanilla', 'stage'):.4f} (median of paired repeats); A/A control (a)/(a): "
          f"{paired_ratio(times, 'vanilla', 'control'):.4f}")
    print(f"extras alone / (a) = {100 * med['extras'] / med['vanilla']:+.3f} %  (goal <= +3 %)")
    print("\n(d) GCPO, same loop: (a) + selection, kappa, (c, m)")
    print(f"{'(d) GCPO end to end':<44}{med['gcpo'] * 1e3:>12.2f}")
    print(f"{'    GCPO extras timed alone':<44}{med['gcpo_extras'] * 1e3:>12.2f}")
    print(f"ratio (d)/(a) end to end: {med['gcpo'] / med['vanilla']:.4f} (medians), "
          f"{paired_ratio(times, 'vanilla', 'gcpo'):.4f} (median of paired repeats)")
    print(f"GCPO extras alone / (a) = {100 * med['gcpo_extras'] / med['vanilla']:+.3f} %  "
          "(goal <= +3 %)")

    # (c) the similarity weights alone.
    gen = torch.Generator().manual_seed(1)
    adv = group_advantages(torch.randint(0, 3, (g,), generator=gen).float(), x["group_index"])
    emb = x["emb"]
    vec = mean_opposite_similarity(emb, adv, x["group_index"], "fixed")
    loop = authors_style_loop(emb, adv)
    torch.testing.assert_close(vec, loop, rtol=1e-5, atol=1e-5)  # same numbers, or no timing
    times_c = time_interleaved({
        "batched": lambda: mean_opposite_similarity(emb, adv, x["group_index"], "fixed"),
        "loop": lambda: authors_style_loop(emb, adv)}, args.repeats * 10)
    med_c = {name: statistics.median(t) for name, t in times_c.items()}
    print("\n(c) c-bar for one group: batched einsum vs per-pair loop (identical outputs checked)")
    print(f"{'variant':<44}{'median ms':>12}")
    print(f"{'batched einsum over [P, G, L, D]':<44}{med_c['batched'] * 1e3:>12.3f}")
    print(f"{'Python loop over i, j, per-pair cosine':<44}{med_c['loop'] * 1e3:>12.3f}")
    print(f"speed-up loop / batched = {med_c['loop'] / med_c['batched']:.1f}x")


if __name__ == "__main__":
    main()

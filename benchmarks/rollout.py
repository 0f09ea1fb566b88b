"""Rollout speed of the tiny policy: KV-cache CFG sampling vs recomputing the prefix every step.

Both variants run side by side in one process, on the same prompts and the
same seeded generator (so they draw the same tokens), at:
- the shipped 8x8 grid (64 image tokens), and
- a 16x16 grid (256 tokens): a random-init model of the same width on a 64x64 canvas, where the
  cache matters more because recompute is quadratic in the sequence length.

Prints images per second for each and the ratio; states the torch thread count used.

Second table: our Janus CFG sampler (stagerl.policies.janus) against transformers' own
``generate(generation_mode="image")`` on the tiny random Janus, same prompts and seed (``top_k=0``):
images per second, the ratio (goal: ours at least as fast) and whether the tokens agree.
Third table: our Janus sampler with the dynamic cache, the static cache and static cache +
``torch.compile`` of the decode step (``sampling.cache``, ``sampling.compile``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout.py [--threads 1] [--batch 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from stagerl.policies.base import SamplingParams
from stagerl.policies.tiny import PromptVocab, TinyConfig, TinyPolicy
from stagerl.worlds.shapes.prompts import generate, prompt_vocabulary
from stagerl.worlds.shapes.tokenizer import PatchTokenizer


def random_model(grid: int, codes: int = 512, patch: int = 4, seed: int = 0) -> TinyPolicy:
    """Default-width (d=128, 4 layers) random-init policy on a grid x grid token canvas."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randint(0, 256, (codes, patch, patch, 3), generator=g, dtype=torch.uint8)
    tok = PatchTokenizer(codebook, (grid * patch, grid * patch), patch)
    vocab = PromptVocab([PromptVocab.PAD, PromptVocab.UNK, PromptVocab.NULL] + prompt_vocabulary())
    cfg = TinyConfig(vocab_size=codes, grid=[grid, grid], prompt_vocab_size=len(vocab))
    torch.manual_seed(seed)
    return TinyPolicy(cfg, tok, vocab).eval()


def time_sampling(model: TinyPolicy, prompts: list[str], use_cache: bool,
                  repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` seconds for one batch, and the tokens drawn."""
    inputs = model.encode_prompts(prompts)
    params = SamplingParams(cfg_scale=2.0)
    best, tokens = float("inf"), None
    for _ in range(repeats):
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        tokens = model.sample(inputs, params, gen, use_cache=use_cache).tokens
        best = min(best, time.perf_counter() - t0)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--batch", type=int, default=16,
                        help="prompts per sampling call (CFG doubles the rows)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [e.prompt for e in generate(args.batch, 0, split="test")]
    print(f"torch threads: {torch.get_num_threads()}   batch: {args.batch} prompts, CFG 2.0 "
          f"(2x{args.batch} rows), best of {args.repeats}")
    print(f"{'grid':>6} {'tokens':>6} {'cache img/s':>12} {'no-cache img/s':>15} "
          f"{'speed-up':>9} same-tokens")
    for grid in (8, 16):
        model = random_model(grid)
        with torch.inference_mode():
            time_sampling(model, prompts[:2], True, 1)  # warm-up
            t_cache, a = time_sampling(model, prompts, True, args.repeats)
            # recompute at 256 tokens takes ~50 s a batch: one timing is plenty there
            t_full, b = time_sampling(model, prompts, False, args.repeats if grid == 8 else 1)
        print(f"{grid}x{grid:<4} {grid * grid:>6} {args.batch / t_cache:>12.1f} "
              f"{args.batch / t_full:>15.1f} {t_full / t_cache:>8.2f}x {bool(torch.equal(a, b))}")
    janus_vs_generate(args.batch, max(args.repeats, 3))
    janus_caches(args.batch, max(args.repeats, 3))


def janus_vs_generate(batch: int, repeats: int) -> None:
    """Our Janus sampler vs ``generate(generation_mode="image")`` on the tiny random Janus."""
    from stagerl.policies.janus import JanusPolicy
    from stagerl.policies.janus_tiny import build_tiny_janus

    prompts = [e.prompt for e in generate(batch, 0, split="test")]
    print(f"\nJanus (tiny random), batch {batch}, CFG 5, best of {repeats}")
    print(f"{'sampler':>28} {'img/s':>8}")
    for grid in (8, 16):
        policy = JanusPolicy(*build_tiny_janus(grid=grid))
        inputs = policy.encode_prompts(prompts)

        def ours():
            torch.manual_seed(123)
            return policy.sample(inputs, SamplingParams(cfg_scale=5.0)).tokens

        def theirs():
            torch.manual_seed(123)
            return policy.sample_with_generate(inputs, 5.0)

        with torch.inference_mode():
            ours(), theirs()  # warm-up
            t_ours, t_theirs = float("inf"), float("inf")
            for _ in range(repeats):  # interleaved, so both see the same machine load
                t0 = time.perf_counter()
                a = ours()
                t1 = time.perf_counter()
                b = theirs()
                t2 = time.perf_counter()
                t_ours, t_theirs = min(t_ours, t1 - t0), min(t_theirs, t2 - t1)
        print(f"{f'ours, {grid}x{grid} tokens':>28} {batch / t_ours:>8.1f}")
        print(f"{f'generate(), {grid}x{grid} tokens':>28} {batch / t_theirs:>8.1f}   "
              f"ours/generate speed {t_theirs / t_ours:.2f}x, same tokens: "
              f"{bool(torch.equal(a, b))}")


def janus_caches(batch: int, repeats: int) -> None:
    """Our Janus sampler with the dynamic cache, the static cache, and static + torch.compile."""
    from stagerl.policies.janus import JanusPolicy
    from stagerl.policies.janus_tiny import build_tiny_janus

    policy = JanusPolicy(*build_tiny_janus())
    inputs = policy.encode_prompts([e.prompt for e in generate(batch, 0, split="test")])
    noise = torch.rand(batch, policy.num_image_tokens)
    print(f"\nJanus sampler caches (tiny random, 64 tokens), batch {batch}, best of {repeats}")
    print(f"{'variant':>22} {'first call s':>13} {'img/s':>8} same-tokens")
    ref = None
    for name, kw in (("dynamic cache", {}), ("static cache", {"cache": "static"}),
                     ("static + compile", {"cache": "static", "compile": True})):
        params = SamplingParams(cfg_scale=5.0, **kw)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = policy.sample(inputs, params, noise=noise)  # includes any compile
            first = time.perf_counter() - t0
            best = min(_seconds(lambda: policy.sample(inputs, params, noise=noise))
                       for _ in range(repeats))
        ref = out.tokens if ref is None else ref
        print(f"{name:>22} {first:>13.2f} {batch / best:>8.1f} {bool(torch.equal(out.tokens, ref))}")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

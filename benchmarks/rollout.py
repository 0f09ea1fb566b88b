"""Rollout speed of the tiny policy: KV-cache CFG sampling vs recomputing the prefix every step.

Both variants run side by side in one process, on the same prompts and the
same seeded generator (so they draw the same tokens), at:
- the shipped 8x8 grid (64 image tokens), and
- a 16x16 grid (256 tokens): a random-init model of the same width on a 64x64 canvas, where the
  cache matters more because recompute is quadratic in the sequence length.

Prints images per second for each and the ratio; states the torch thread count used.

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
            t_full, b = time_sampling(model, prompts, False, args.repeats)
        print(f"{grid}x{grid:<4} {grid * grid:>6} {args.batch / t_cache:>12.1f} "
              f"{args.batch / t_full:>15.1f} {t_full / t_cache:>8.2f}x {bool(torch.equal(a, b))}")


if __name__ == "__main__":
    main()

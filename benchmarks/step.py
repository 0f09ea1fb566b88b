"""A roofline for one training step: achieved GFLOP/s per phase against the machine's matmul peak.

For two models, in one run, on the same thread count:
- the shipped shapes-world model (``builtin:shapes``, 64 image tokens), P=8 prompts x G=8;
- a Janus with Janus-Pro-1B's widths and vocabularies (hidden 2048, MLP 5632, 16,384 image codes,
  102,400 text tokens) but 2 LM layers and an 8x8 token grid, random weights, 2 prompts x G=2.

Each phase's FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real code
path (sampling with CFG and a KV cache; the reference model's teacher-forced pass; the update's
teacher-forced forward + backward; the AdamW step), then the phase is timed without the counter (best of
``--repeats``). The peak is a large fp32 matmul timed in the same process. Phases far below the
peak are named with the measured reason.

    OMP_NUM_THREADS=1 python benchmarks/step.py [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from stagerl.policies.base import SamplingParams


def matmul_peak(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a size^3 fp32 matmul (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def phases(policy, prompts: list[str], group: int, cfg_scale: float, chunk: int) -> dict:
    """name -> zero-argument callable for the three phases of one step."""
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    inputs = policy.encode_prompts([p for p in prompts for _ in range(group)])
    params = SamplingParams(cfg_scale=cfg_scale)
    noise = torch.rand(len(inputs), policy.num_image_tokens)
    with torch.no_grad():
        tokens = policy.sample(inputs, params, noise=noise).tokens
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)

    def sample():
        with torch.no_grad():
            policy.sample(inputs, params, noise=noise)

    def reference_pass():
        with torch.no_grad():
            reference(inputs, tokens, chunk_size=chunk)

    def update():
        optimizer.zero_grad(set_to_none=True)
        stats = policy(inputs, tokens, chunk_size=chunk)
        (-stats.logprobs.mean() + 0.01 * stats.entropy.mean()).backward()

    def adamw():
        optimizer.step()

    return {"sampling": sample, "reference pass": reference_pass, "update fwd+bwd": update,
            "AdamW step": adamw}


REASONS = {
    "sampling": "one decode step per token: small matmuls over 2N rows that read every weight "
                "once per token (memory-bound), plus Python overhead per token",
    "reference pass": "teacher-forced, all positions at once",
    "update fwd+bwd": "teacher-forced forward + backward (recompute of checkpointed chunks); "
                      "hypothesis, not measured here: with Janus' 102,400 x 2048 text embedding "
                      "trained, its dense gradient (840 MB for a few used rows) is extra "
                      "memory traffic",
    "AdamW step": "no matmuls: reads and writes every trainable parameter and two moments "
                  "(memory-bound by nature; ~28 bytes moved per parameter)",
}


def report(name: str, fns: dict, peak: float, repeats: int) -> None:
    print(f"\n{name}")
    print(f"{'phase':<16}{'GFLOP':>10}{'seconds':>10}{'GFLOP/s':>10}{'of peak':>9}")
    # phases are timed in order; the AdamW step needs the gradients of the update before it
    for phase, fn in fns.items():
        fn()  # warm-up
        flops = _flops(fn)
        seconds = min(_timed(fn) for _ in range(repeats))
        rate = flops / seconds / 1e9
        print(f"{phase:<16}{flops / 1e9:>10.2f}{seconds:>10.3f}{rate:>10.1f}{rate / peak:>8.0%}")
    for phase in fns:
        print(f"  {phase}: {REASONS[phase]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak(args.threads)
    print(f"torch threads: {torch.get_num_threads()}   fp32 matmul peak (1024^3): "
          f"{peak:.1f} GFLOP/s")

    from stagerl.policies.tiny import TinyPolicy, resolve_model_path
    from stagerl.worlds.shapes.prompts import generate

    shapes = TinyPolicy.from_pretrained(resolve_model_path("builtin:shapes")).train()
    prompts = [e.prompt for e in generate(8, 0, split="test")]
    report("shapes model (builtin:shapes, 64 tokens), P=8 x G=8, CFG 2",
           phases(shapes, prompts, 8, 2.0, 0), peak, args.repeats)

    from stagerl.policies.janus import JanusPolicy
    from stagerl.policies.janus_tiny import sized_janus

    janus = JanusPolicy(*sized_janus("1b", layers=2, grid=8))
    janus.requires_grad_(False)
    janus.core.model.language_model.requires_grad_(True)
    janus.train()
    report("Janus, 1B widths and vocabularies, 2 layers, 8x8 tokens, P=2 x G=2, CFG 5, chunk 32",
           phases(janus, prompts[:2], 2, 5.0, 32), peak, args.repeats)


if __name__ == "__main__":
    main()

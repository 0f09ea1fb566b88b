"""Peak memory of teacher-forced log-probs + entropies: our chunked computation vs the naive one.

At Janus-Pro's image vocabulary (V = 16,384 codes), L = 576 positions and N = 16 sequences, the
naive computation materialises [N, L, V] fp32 logits, log-softmax and probabilities (604 MB each)
and keeps them for backward. ``stagerl.policies.sampling.chunked_token_stats`` (what both policy
adapters call) runs the head and the softmax over ``chunk`` positions at a time under activation
checkpointing. Each variant runs forward + backward in its own fresh process; the number reported
is the growth of the process's peak resident memory (``ru_maxrss``) over the run, measured, not
estimated. A third process checks that the gradients agree (fp32).

Goal: chunked <= 25 % of naive, gradients within 1e-5.

    python benchmarks/logprob_memory.py [--hidden 512] [--chunk 144]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

N, L, V = 16, 576, 16384


def _inputs(hidden: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, L, hidden, generator=gen) * 0.5).requires_grad_(True)  # [N, L, H]
    head = torch.nn.Linear(hidden, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, hidden, generator=gen) / hidden ** 0.5)
    tokens = torch.randint(0, V, (N, L), generator=gen)
    return h, head, tokens


def _loss(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    return -(logp.mean()) + 0.1 * entropy.mean()  # uses both outputs, as the trainer does


def naive(h, head, tokens):
    logits = head(h).float()  # [N, L, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def chunked(h, head, tokens, chunk):
    from stagerl.policies.sampling import chunked_token_stats

    return chunked_token_stats(head, h, None, tokens, "cond", 1.0, 1.0, chunk)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(variant: str, hidden: int, chunk: int) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    h, head, tokens = _inputs(hidden)
    base = _peak_mib()
    logp, entropy = naive(h, head, tokens) if variant == "naive" else \
        chunked(h, head, tokens, chunk)
    _loss(logp, entropy).backward()
    return {"variant": variant, "peak_growth_mib": round(_peak_mib() - base, 1)}


def check_gradients(hidden: int, chunk: int) -> dict:
    grads = []
    for fn in (naive, lambda *a: chunked(*a, chunk)):
        h, head, tokens = _inputs(hidden)
        _loss(*fn(h, head, tokens)).backward()
        grads.append((h.grad, head.weight.grad))
    err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
              for a, b in zip(grads[0], grads[1]))
    return {"max_relative_grad_diff": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H (default 512)")
    parser.add_argument("--chunks", default="144,64", help="positions per chunk to measure "
                        "(default 144,64: the old and the current sampling.logprob_chunk of the "
                        "Janus-Pro recipes)")
    parser.add_argument("--chunk", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = check_gradients(args.hidden, args.chunk) if args.child == "grads" else \
            run_variant(args.child, args.hidden, args.chunk)
        print(json.dumps(out))
        return
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    print(f"log-prob + entropy memory, N={N} L={L} V={V} H={args.hidden}, fp32, forward+backward, "
          f"{threads} thread(s); each variant in a fresh process")
    def child(kind: str, chunk: int) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--hidden",
                               str(args.hidden), "--chunk", str(chunk)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": threads})
        return json.loads(proc.stdout.strip().splitlines()[-1])

    chunks = [int(c) for c in args.chunks.split(",")]
    nv = child("naive", 0)["peak_growth_mib"]
    print(f"{'variant':<34}{'peak growth':>12}{'/ naive':>10}{'max rel. grad diff':>20}")
    print(f"{'naive [N, L, V] materialised':<34}{nv:>8.0f} MiB{1.0:>10.3f}{'-':>20}")
    for c in chunks:
        ch = child("chunked", c)["peak_growth_mib"]
        err = child("grads", c)["max_relative_grad_diff"]
        print(f"{f'chunked ({c} positions)':<34}{ch:>8.0f} MiB{ch / nv:>10.3f}{err:>20.2e}")
    print("goal: chunked / naive <= 0.25 with gradients within 1e-5 of the naive path")


if __name__ == "__main__":
    main()

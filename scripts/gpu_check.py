"""The prepared GPU check (``make gpu-check``): what CPU tests cannot show, in one short run.

On one CUDA GPU, in a few minutes, it:
1. trains the tiny Janus (loaded from a saved folder) for 3 steps in bf16 under each engine
   (DDP, DeepSpeed ZeRO-2, ZeRO-3, FSDP2; one process each, through ``accelerate launch`` and the
   shipped launch files);
2. times our CFG sampler (dynamic cache, static cache, static cache + ``torch.compile``) against
   transformers' ``generate(generation_mode="image")`` on the same
   prompts and seed (tokens/s, the ratio, and whether the tokens agree), for a Janus with the
   1B's widths and vocabularies but 2 layers (random weights; real weights cannot be fetched here);
3. measures peak GPU memory of one rollout and one update for a Janus with the 7B's widths and
   vocabularies but 2 layers, bf16.
4. LlamaGen: times its CFG sampler and measures one rollout and one optimizer update for a
   LlamaGen-T2I with GPT-XL's widths but 2 layers, the VQ-16 decoder and a random one-layer T5 of
   FLAN-T5-XL's width, bf16 (docs/llamagen.md).
It writes one JSON file (``--out``). Without a CUDA device it prints one line and exits 0.
``--dry-run`` runs every phase on the CPU at toy sizes (fp32, one engine), so that the script is
exercised by ``make test`` and cannot rot.

    python scripts/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
from stagerl.policies.janus import JanusPolicy  # noqa: E402
from stagerl.policies.janus_tiny import sized_janus  # noqa: E402

LAUNCH_FILES = {"ddp": "ddp", "zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3",
                "fsdp2": "fsdp"}
def run_engines(engines: list[str], dry: bool, work: Path) -> dict:
    """Phase 1: 3 steps of the tiny Janus under each engine, one process each."""
    from stagerl.policies.janus_tiny import build_tiny_janus

    model_dir = work / "janus_tiny"
    model, processor = build_tiny_janus()
    model.save_pretrained(str(model_dir))
    processor.save_pretrained(str(model_dir))
    precision, dtype = ("no", "float32") if dry else ("bf16", "bfloat16")
    out = {}
    for engine in engines:
        launch = yaml.safe_load((ROOT / "configs" / "accelerate" /
                                 f"{LAUNCH_FILES[engine]}.yaml").read_text())
        launch.update(num_processes=1, mixed_precision=precision)
        launch.pop("gpu_ids", None)
        launch_path = work / f"{engine}.yaml"
        launch_path.write_text(yaml.safe_dump(launch))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(launch_path), "--main_process_port", "0", "-m", "stagerl", "train",
               str(ROOT / "configs" / "janus_tiny_test.yaml"), f"model.path={model_dir}",
               "model.tiny_random=false", f"model.dtype={dtype}",
               f"run.mixed_precision={precision}", f"run.out_dir={work / 'runs'}",
               f"run.name={engine}", "log.image_every=0",
               "sampling.reuse_sample_stats=false"]  # teacher-force too: log the gap
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "WORLD_SIZE": "1"})
        rows = []
        metrics = work / "runs" / engine / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        out[engine] = {"ok": proc.returncode == 0 and len(rows) == 3,
                       "seconds": round(time.perf_counter() - t0, 1),
                       "loss": [r.get("loss/total") for r in rows],
                       "logprob_gap": [r.get("rollout/logprob_gap") for r in rows],
                       "error": [line for line in proc.stderr.splitlines()
                                 if "Error" in line][-3:] if proc.returncode else []}
    return out


def time_sampler(dry: bool, device: str) -> dict:
    """Phase 2: our CFG sampler vs transformers' generate(), same prompts and seed."""
    from stagerl.policies.base import SamplingParams

    size, grid, dtype = ("toy", 8, torch.float32) if dry else ("1b", 24, torch.bfloat16)
    policy = JanusPolicy(*sized_janus(size, layers=2, grid=grid, dtype=dtype, device=device))
    inputs = policy.encode_prompts(["a red circle", "two blue squares", "a photo of a cat",
                                    "a green triangle above a bench"]).to(device)
    n_tokens = len(inputs) * policy.num_image_tokens

    def timed(fn):
        fn()  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - t0

    def ours():
        torch.manual_seed(123)
        return policy.sample(inputs, SamplingParams(cfg_scale=5.0)).tokens

    def theirs():
        torch.manual_seed(123)
        return policy.sample_with_generate(inputs, 5.0)

    def static(compile_step: bool):
        def fn():
            torch.manual_seed(123)
            return policy.sample(inputs, SamplingParams(cfg_scale=5.0, cache="static",
                                                        compile=compile_step)).tokens
        return fn

    with torch.no_grad():
        a, t_ours = timed(ours)
        b, t_theirs = timed(theirs)
        c, t_static = timed(static(False))
        d, t_compiled = timed(static(True)) if not dry else (c, t_static)
    return {"static_cache_tokens_per_s": round(n_tokens / t_static, 1),
            "static_compiled_tokens_per_s": None if dry else round(n_tokens / t_compiled, 1),
            "static_same_tokens": bool(torch.equal(a.cpu(), c.cpu())
                                       and torch.equal(a.cpu(), d.cpu())),
            "model": f"Janus-Pro-{size} widths, 2 layers, {str(dtype)[6:]}",
            "tokens": n_tokens, "ours_tokens_per_s": round(n_tokens / t_ours, 1),
            "generate_tokens_per_s": round(n_tokens / t_theirs, 1),
            "speed_ratio_ours_over_generate": round(t_theirs / t_ours, 3),
            "same_tokens": bool(torch.equal(a.cpu(), b.cpu()))}


def peak_gib(fn: Callable[[], None], device: str) -> float | None:
    """Run ``fn``; on CUDA return its peak allocated memory in GiB (None elsewhere)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def measure_memory(dry: bool, device: str) -> dict:
    """Phase 3: peak memory of one rollout and one update (7B widths, 2 layers, bf16)."""
    from stagerl.policies.base import SamplingParams

    size, grid, dtype = ("toy", 8, torch.float32) if dry else ("7b", 24, torch.bfloat16)
    policy = JanusPolicy(*sized_janus(size, layers=2, grid=grid, dtype=dtype, device=device))
    policy.requires_grad_(False)
    policy.core.model.language_model.requires_grad_(True)
    inputs = policy.encode_prompts(["a photo of a cat"] * 8).to(device)  # one group, G = 8

    state = {}

    def rollout():
        with torch.no_grad():
            out = policy.sample(inputs, SamplingParams(cfg_scale=5.0),
                                generator=torch.Generator(device=device).manual_seed(0))
            policy(inputs, out.tokens, chunk_size=64)
        state["tokens"] = out.tokens

    def update():
        stats = policy(inputs, state["tokens"], chunk_size=64)
        (-stats.logprobs.mean()).backward()

    return {"model": f"Janus-Pro-{size} widths, 2 layers, {str(dtype)[6:]}, G = 8",
            "rollout_peak_gib": peak_gib(rollout, device),
            "update_peak_gib": peak_gib(update, device),
            "weights_gib": round(sum(p.numel() * p.element_size()
                                     for p in policy.parameters()) / 2**30, 2)}


def llamagen_check(dry: bool, device: str) -> dict:
    """Phase 4: LlamaGen-T2I at XL widths, 2 layers: sampler speed, rollout and update memory."""
    from stagerl.policies.base import SamplingParams
    from stagerl.policies.llamagen import sized_llamagen

    size, dtype = ("toy", torch.float32) if dry else ("XL", torch.bfloat16)
    policy = sized_llamagen(size, "t2i", layers=2, dtype=dtype, device=device)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters()], lr=1e-6)
    prompts = ["a red circle", "two blue squares", "a photo of a cat", "a bench"]
    state: dict = {}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def rollout() -> None:
        inputs = policy.encode_prompts(prompts * 2)  # one group of G = 8
        with torch.no_grad():
            out = policy.sample(inputs, SamplingParams(cfg_scale=7.5),
                                generator=torch.Generator(device=device).manual_seed(0))
            policy.decode(out.tokens)
        state["inputs"], state["tokens"] = inputs, out.tokens

    def update() -> None:
        stats = policy(state["inputs"], state["tokens"], chunk_size=64)
        (-stats.logprobs.mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    inputs = policy.encode_prompts(prompts)
    with torch.no_grad():
        policy.sample(inputs, SamplingParams(cfg_scale=7.5))  # warm-up
        sync()
        t0 = time.perf_counter()
        policy.sample(inputs, SamplingParams(cfg_scale=7.5))
        sync()
        seconds = time.perf_counter() - t0
    n_tokens = len(prompts) * policy.num_image_tokens
    rollout_gib = peak_gib(rollout, device)
    update_gib = peak_gib(update, device)
    return {"model": f"LlamaGen-T2I {size} widths, 2 layers, {str(dtype)[6:]}, G = 8",
            "tokens": n_tokens, "sampler_tokens_per_s": round(n_tokens / seconds, 1),
            "rollout_peak_gib": rollout_gib, "update_peak_gib": update_gib,
            "updated": all(torch.isfinite(p).all() for p in policy.model.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every phase on the CPU at toy sizes (what make test does)")
    parser.add_argument("--engines", default=None,
                        help="comma-separated subset of ddp,zero2,zero3,fsdp2 (default: all; "
                             "ddp for --dry-run)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check (exit 0)")
        return 0
    device = "cpu" if args.dry_run else "cuda"
    engines = (args.engines.split(",") if args.engines
               else ["ddp"] if args.dry_run else list(LAUNCH_FILES))
    t0 = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    "dry_run": args.dry_run, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        report["engines"] = run_engines(engines, args.dry_run, Path(tmp))
    report["sampler"] = time_sampler(args.dry_run, device)
    report["memory"] = measure_memory(args.dry_run, device)
    report["llamagen"] = llamagen_check(args.dry_run, device)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if all(e["ok"] for e in report["engines"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

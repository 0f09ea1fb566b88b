"""Evaluation: generate N images per prompt with fixed seeds, write GenEval's folder layout, score,
and return per-category tables.

Two entry points:
- :func:`evaluate_shapes` -- a shapes-world suite, scored by the exact evaluator (strict, lenient,
  partial credit). Used before/after training and by ``stagerl eval``.
- :func:`evaluate_prompts` -- any prompt file (GenEval metadata jsonl, T2I-CompBench / OCR txt,
  DrawBench csv) scored by configured reward back ends.

Both skip prompts whose images already exist in the output folder (rerunning resumes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stagerl.data import PromptItem, _mix
from stagerl.policies.base import SamplingParams

SHAPES_SUITES = ("test", "compositions", "phrasings")
# `heldout` is the name used in configs for the in-distribution held-out suite.
SUITE_ALIASES = {"heldout": "test", "indist": "test"}


def shapes_items(suite: str, n_prompts: int, seed: int = 1234) -> list[PromptItem]:
    from stagerl.worlds.shapes.prompts import generate

    split = SUITE_ALIASES.get(suite, suite)
    return [PromptItem(ex.prompt, ex.metadata) for ex in generate(n_prompts, seed=seed, split=split)]


@torch.no_grad()
def generate_images(policy: Any, items: list[PromptItem], images_per_prompt: int,
                    params: SamplingParams, seed: int, out_dir: Path | None = None,
                    chunk_prompts: int = 32) -> list[list[Image.Image]]:
    """``images_per_prompt`` images for each prompt; chunk c is sampled with seed mix(seed, c), so
    the images do not depend on which chunks were skipped. Writes GenEval's layout when ``out_dir``
    is given and reuses complete prompt folders found there."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    result: list[list[Image.Image]] = []
    for c in range(0, len(items), chunk_prompts):
        chunk = items[c:c + chunk_prompts]
        cached = [_load_prompt_dir(out_dir, c + k, images_per_prompt) for k in range(len(chunk))] \
            if out_dir else [None] * len(chunk)
        if all(x is not None for x in cached):
            result.extend(cached)  # type: ignore[arg-type]
            continue
        prompts = [it.prompt for it in chunk for _ in range(images_per_prompt)]
        inputs = policy.encode_prompts(prompts).to(device)
        gen = torch.Generator(device="cpu").manual_seed(_mix(seed, c // chunk_prompts))
        out = policy.sample(inputs, params, generator=gen)
        images = policy.decode(out.tokens)
        for k, it in enumerate(chunk):
            imgs = images[k * images_per_prompt:(k + 1) * images_per_prompt]
            if out_dir:
                _write_prompt_dir(out_dir, c + k, it, imgs)
            result.append(imgs)
    policy.train(was_training)
    return result


def _prompt_dir(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"{index:05d}"


def _write_prompt_dir(out_dir: Path, index: int, item: PromptItem, images: list[Image.Image]):
    d = _prompt_dir(out_dir, index)
    (d / "samples").mkdir(parents=True, exist_ok=True)
    (d / "metadata.jsonl").write_text(json.dumps({**item.metadata, "prompt": item.prompt}) + "\n")
    for j, img in enumerate(images):
        img.save(d / "samples" / f"{j:04d}.png")


def _load_prompt_dir(out_dir: Path | None, index: int, n: int) -> list[Image.Image] | None:
    if out_dir is None:
        return None
    d = _prompt_dir(out_dir, index) / "samples"
    files = [d / f"{j:04d}.png" for j in range(n)]
    if not all(f.is_file() for f in files):
        return None
    return [Image.open(f).convert("RGB") for f in files]


def evaluate_shapes(policy: Any, suite: str = "heldout", n_prompts: int = 200,
                    images_per_prompt: int = 4, cfg_scale: float = 2.0, seed: int = 1234,
                    temperature: float = 1.0, top_k: int = 0, out_dir: Path | None = None,
                    ) -> dict[str, Any]:
    """Strict / lenient per-category accuracy and mean partial credit on a shapes suite."""
    from stagerl.worlds.shapes.evaluate import category_table, evaluate_batch

    items = shapes_items(suite, n_prompts, seed)
    params = SamplingParams(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k)
    per_prompt = generate_images(policy, items, images_per_prompt, params, seed, out_dir)
    images = [img for imgs in per_prompt for img in imgs]
    metas = [it.metadata for it in items for _ in range(images_per_prompt)]
    verdicts = evaluate_batch(images, metas)
    result = {
        "suite": suite, "prompts": len(items), "images_per_prompt": images_per_prompt,
        "cfg_scale": cfg_scale, "seed": seed,
        "strict": category_table(verdicts, metas, key="strict"),
        "lenient": category_table(verdicts, metas, key="lenient"),
        "partial": float(sum(v.score for v in verdicts) / max(1, len(verdicts))),
    }
    if out_dir:
        (Path(out_dir) / "results.json").write_text(json.dumps(result, indent=1))
    return result


def evaluate_prompts(policy: Any, items: list[PromptItem], reward_names: list[str],
                     reward_kwargs: dict[str, dict], images_per_prompt: int, params: SamplingParams,
                     seed: int, out_dir: Path | None) -> dict[str, Any]:
    """Mean score per reward, per category (metadata 'tag') and overall (mean of categories)."""
    from stagerl.rewards.base import RewardSet

    rewards = RewardSet(reward_names, reward_kwargs)
    per_prompt = generate_images(policy, items, images_per_prompt, params, seed, out_dir)
    images = [img for imgs in per_prompt for img in imgs]
    prompts = [it.prompt for it in items for _ in range(images_per_prompt)]
    metas = [it.metadata for it in items for _ in range(images_per_prompt)]
    scores, valid, _ = rewards(images, prompts, metas)
    tags = [m.get("tag") or "all" for m in metas]
    table: dict[str, dict[str, float]] = {}
    for k, name in enumerate(reward_names):
        col, ok = scores[:, k], valid[:, k]
        per_tag = {}
        for tag in sorted(set(tags)):
            sel = torch.tensor([t == tag for t in tags]) & ok
            per_tag[tag] = float(col[sel].mean()) if bool(sel.any()) else float("nan")
        per_tag["overall"] = float(torch.tensor(list(per_tag.values())).nanmean())
        per_tag["invalid"] = float((~ok).sum())
        table[name] = per_tag
    result = {"prompts": len(items), "images_per_prompt": images_per_prompt, "scores": table}
    if out_dir:
        (Path(out_dir) / "results.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A plain-text table: one row per name, one column per category."""
    cols: list[str] = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    head = f"{'':<14}" + "".join(f"{c[:12]:>13}" for c in cols)
    lines = [title] if title else []
    lines += [head] + [f"{name[:14]:<14}" + "".join(
        f"{r.get(c, float('nan')):>13.3f}" for c in cols) for name, r in rows.items()]
    return "\n".join(lines)

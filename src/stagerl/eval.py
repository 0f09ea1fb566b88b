"""Evaluation harness: generate N images per prompt with fixed seeds, write GenEval's folder layout,
score, and save per-category tables.

Entry points:
- :func:`evaluate_suite` -- a shapes-world suite, scored by the exact evaluator (strict, lenient,
  partial credit) -> a :class:`ShapesEval`. The one shapes evaluation (docs/design.md §13): the
  trainer's before/after evaluation, ``stagerl eval``, ``stagerl pretrain`` (the model card) and
  ``stagerl study`` all call it.
- :func:`evaluate_benchmark` -- a benchmark path: GenEval metadata (.jsonl), T2I-CompBench-style
  prompt lists (.txt, the category is the file name: ``color_val.txt`` -> ``color``; or a folder of
  them), DrawBench (.csv with a Category column) or an OCR prompt file (.txt), scored by the
  configured reward back ends.
- :func:`evaluate_prompts` -- the same on already-loaded :class:`PromptItem` s.

Rerunning on the same output folder skips work already done: complete prompt folders are not
sampled again, and per-prompt reward scores (``scores.json``) are not
recomputed. ``eval_config.json``
records the sampling settings of a folder; reusing it with different settings is a UserError,
because the cached images would silently belong to another configuration.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stagerl.benchmarks import resolve_benchmark
from stagerl.data import (EVAL_SEED, SHAPES_SUITES, SUITE_ALIASES, PromptItem,  # noqa: F401
                          check_suite, load_prompt_file, mix_seed, suite_names)
from stagerl.errors import UserError
from stagerl.policies.base import Policy, SamplingParams
from stagerl.policies.sampling import chunk_noise, sample_tokens
from stagerl.worlds.shapes.evaluate import category_table, evaluate_batch
from stagerl.worlds.shapes.prompts import generate
from stagerl.worlds.shapes.spec import WorldSpec

log = logging.getLogger(__name__)

_SPLIT_WORDS = ("val", "test", "train", "prompts", "metadata", "evaluation")
CHUNK_PROMPTS = 32  # prompts sampled together by generate_images (and the seed of each chunk)


def shapes_items(suite: str, n_prompts: int, seed: int = EVAL_SEED) -> list[PromptItem]:
    split = check_suite(suite)
    examples = generate(n_prompts, seed=seed, split=split)
    return [PromptItem(ex.prompt, ex.metadata) for ex in examples]


# --------------------------------------------------------------------------------------------------
# Benchmarks: loading with categories


def benchmark_category(path: str | Path) -> str:
    """Category of a prompt-list file from its name: ``color_val.txt`` -> ``color``,
    ``3d_spatial_val.txt`` -> ``3d_spatial``. Split words (val, test, prompts...) are dropped; a
    name that is nothing but split words (``ocr/test_prompts.txt``) takes its folder's name
    (``ocr``)."""
    p = Path(path)
    words = [w for w in re.split(r"[_\-.]+", p.stem.lower()) if w]
    kept = [w for w in words if w not in _SPLIT_WORDS]
    if kept:
        return "_".join(kept)
    return p.parent.name.lower() or p.stem.lower()


def load_benchmark(path: str | Path, max_prompts: int | None = None) -> list[PromptItem]:
    """Prompts of one benchmark, each with a ``tag`` (its category) in the metadata.

    - ``.jsonl``: GenEval metadata; the tag is the line's own ``tag`` (GenEval's six categories);
    - ``.csv``: DrawBench; the tag is the ``Category`` column;
    - ``.txt``: one prompt a line (T2I-CompBench, OCR); the tag is :func:`benchmark_category`;
    - a folder: every .txt/.jsonl/.csv inside, in name order (e.g. T2I-CompBench's eight files).

    ``max_prompts`` keeps the first prompts *of each file* (so a folder keeps every category).
    """
    p = resolve_benchmark(path)  # a shipped set's name (geneval, t2i-compbench, ...) or a path
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".txt", ".jsonl", ".csv"))
        if not files:
            raise UserError(f"benchmark folder {path} holds no .txt, .jsonl or .csv prompt files")
        return [it for f in files for it in load_benchmark(f, max_prompts)]
    items = load_prompt_file(p)[:max_prompts]
    default_tag = benchmark_category(p)
    out = []
    for it in items:
        meta = dict(it.metadata)
        if not meta.get("tag"):
            meta["tag"] = default_tag
        out.append(PromptItem(it.prompt, meta))
    return out


# --------------------------------------------------------------------------------------------------
# Sampling into GenEval's layout


def _check_eval_config(out_dir: Path | None, settings: dict[str, Any]) -> None:
    """Record the sampling settings of an output folder; refuse to mix settings in one folder."""
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval_config.json"
    settings = json.loads(json.dumps(settings))  # normalise tuples/floats as JSON sees them
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise UserError(f"{out_dir} holds images made with other settings ({', '.join(diff)} "
                            f"differ); use a fresh output folder or delete it")
        return
    path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


@torch.no_grad()
def generate_images(policy: Policy, items: list[PromptItem], images_per_prompt: int,
                    params: SamplingParams, seed: int, out_dir: Path | None = None,
                    chunk_prompts: int = CHUNK_PROMPTS, progress: Any = None,
                    ) -> list[list[Image.Image]]:
    """``images_per_prompt`` images for each prompt; chunk c is sampled with seed mix(seed, c), so
    the images do not depend on which chunks were skipped. Writes GenEval's layout when ``out_dir``
    is given and reuses complete prompt folders found there. ``progress`` is an optional tqdm-like
    factory; its bar counts images."""
    was_training = policy.training
    policy.eval()
    result: list[list[Image.Image]] = []
    bar = progress(total=len(items) * images_per_prompt, desc="sampling", unit="img") \
        if progress else None
    for c in range(0, len(items), chunk_prompts):
        chunk = items[c:c + chunk_prompts]
        cached = [_load_prompt_dir(out_dir, c + k, images_per_prompt) for k in range(len(chunk))] \
            if out_dir else [None] * len(chunk)
        if all(x is not None for x in cached):
            result.extend(cached)  # type: ignore[arg-type]
        else:
            result.extend(_sample_chunk(policy, chunk, c, images_per_prompt, params,
                                        mix_seed(seed, c // chunk_prompts), out_dir))
        if bar is not None:
            bar.update(len(chunk) * images_per_prompt)
    if bar is not None:
        bar.close()
    policy.train(was_training)
    return result


def _sample_chunk(policy: Policy, chunk: list[PromptItem], first: int, images_per_prompt: int,
                  params: SamplingParams, seed: int, out_dir: Path | None
                  ) -> list[list[Image.Image]]:
    """Images of one chunk of prompts, written to their prompt folders when ``out_dir`` is given."""
    prompts = [it.prompt for it in chunk for _ in range(images_per_prompt)]
    noise = chunk_noise(seed, len(prompts), policy.num_image_tokens)  # [N, L]
    _, tokens, _, _ = sample_tokens(policy, prompts, params, noise)
    images = policy.decode(tokens)
    result = []
    for k, it in enumerate(chunk):
        imgs = images[k * images_per_prompt:(k + 1) * images_per_prompt]
        if out_dir:
            _write_prompt_dir(out_dir, first + k, it, imgs)
        result.append(imgs)
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


# --------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class ShapesEval:
    """One shapes-suite evaluation: the settings that made the images, the exact evaluator's
    per-category tables and the images themselves (``images[i]`` are prompt ``items[i]``'s)."""

    suite: str
    prompts: int
    images_per_prompt: int
    cfg_scale: float
    temperature: float
    top_k: int
    top_p: float
    seed: int
    strict: dict[str, float]  # per category and overall (mean of categories), strict verdicts
    lenient: dict[str, float]  # the same with GenEval's rules alone
    partial: float  # mean partial-credit score over all images
    items: list[PromptItem] = field(repr=False, compare=False)
    images: list[list[Image.Image]] = field(repr=False, compare=False)
    # mean score of each learned proxy reward trained on, on the same images (the trainer adds
    # it: gold and proxy side by side; docs/rewards.md, "Learned proxy rewards")
    proxy: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the prompts and images: what results.json and run folders store."""
        return {**{k: getattr(self, k) for k in _STORED},
                **({"proxy": self.proxy} if self.proxy else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapesEval":
        """A stored evaluation (:meth:`to_dict`), without its prompts and images."""
        return cls(**{k: d[k] for k in _STORED}, items=[], images=[],
                   proxy=dict(d.get("proxy") or {}))  # absent from files of older versions


_STORED = ("suite", "prompts", "images_per_prompt", "cfg_scale", "temperature", "top_k", "top_p",
           "seed", "strict", "lenient", "partial")


def evaluate_suite(policy: Policy, suite: str, n_prompts: int, images_per_prompt: int,
                   params: SamplingParams, seed: int = EVAL_SEED, out_dir: Path | None = None,
                   progress: Any = None) -> ShapesEval:
    """Strict / lenient per-category accuracy and mean partial credit on a shapes suite: the first
    ``n_prompts`` prompts of ``suite`` drawn with ``seed``, ``images_per_prompt`` images each
    sampled by :func:`generate_images` with ``params`` and ``seed``. Writes GenEval's layout and
    results.json / results.md under ``out_dir`` when given. ``progress``: an optional tqdm-like
    factory for the sampling bar."""
    items = shapes_items(suite, n_prompts, seed)
    out_dir = Path(out_dir) if out_dir else None
    settings = {"suite": SUITE_ALIASES.get(suite, suite), "seed": seed,
                "images_per_prompt": images_per_prompt, "cfg_scale": params.cfg_scale,
                "temperature": params.temperature, "top_k": params.top_k}
    if params.top_p != 1.0:  # folders written before top_p was honoured stay reusable
        settings["top_p"] = params.top_p
    _check_eval_config(out_dir, settings)
    per_prompt = generate_images(policy, items, images_per_prompt, params, seed, out_dir,
                                 progress=progress)
    images = [img for imgs in per_prompt for img in imgs]
    metas = [it.metadata for it in items for _ in range(images_per_prompt)]
    _check_canvas(images, suite)
    verdicts = evaluate_batch(images, metas)
    result = ShapesEval(
        suite=suite, prompts=len(items), images_per_prompt=images_per_prompt,
        cfg_scale=params.cfg_scale, temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, seed=seed,
        strict=category_table(verdicts, metas, key="strict"),
        lenient=category_table(verdicts, metas, key="lenient"),
        partial=float(sum(v.score for v in verdicts) / max(1, len(verdicts))),
        items=items, images=per_prompt)
    if out_dir:
        (out_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=1))
        title = (f"shapes suite {suite}: {len(items)} prompts x {images_per_prompt} images, "
                 f"cfg {params.cfg_scale}; mean partial credit {result.partial:.3f}")
        (out_dir / "results.md").write_text(markdown_table(
            {"strict": result.strict, "lenient": result.lenient}, title))
    return result


def _check_canvas(images: list[Image.Image], suite: str) -> None:
    """The shapes evaluator reads the shapes world's canvas; another model's images are a
    UserError, not a traceback from deep inside the evaluator."""
    canvas = WorldSpec().canvas
    if images and images[0].size != (canvas, canvas):
        w, h = images[0].size
        raise UserError(f"suite {suite}: the model draws {w}x{h} images, but the shapes "
                        f"evaluator reads {canvas}x{canvas} shapes-world images; evaluate this "
                        f"model with --benchmark and a reward instead")


def _cached_scores(out_dir: Path | None, index: int, name: str, n: int) -> tuple | None:
    """(scores, valid, reason) of reward ``name`` for prompt ``index`` from its scores.json, if
    complete; ``reason`` says why images were invalid (None when all were valid or unknown)."""
    if out_dir is None:
        return None
    path = _prompt_dir(out_dir, index) / "scores.json"
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(name)
    if not entry or len(entry["scores"]) < n:
        return None
    return entry["scores"][:n], entry["valid"][:n], entry.get("reason")


def _store_scores(out_dir: Path, index: int, name: str, scores: list[float], valid: list[bool],
                  reason: str | None):
    path = _prompt_dir(out_dir, index) / "scores.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    # NaN is not JSON; an invalid entry's value does not matter (valid=False), store 0.
    data[name] = {"scores": [s if math.isfinite(s) else 0.0 for s in scores], "valid": valid,
                  "reason": reason}
    path.write_text(json.dumps(data))


def _invalid_reason(details: list[dict], valid: list[bool]) -> str | None:
    """The first reason a reward gave for an invalid image (its details' 'error'), if any."""
    for d, ok in zip(details, valid):
        if not ok and isinstance(d, dict) and d.get("error"):
            return str(d["error"])
    return None


def _score_reward(name: str, kwargs: dict, per_prompt: list[list[Image.Image]],
                  items: list[PromptItem], out_dir: Path | None) -> tuple[list, list, list]:
    """Scores [P][n], valid [P][n] and invalid reasons [P] of one reward; prompts with cached
    scores are not rescored."""
    from stagerl.rewards.base import build_reward

    n = len(per_prompt[0]) if per_prompt else 0
    scores: list = [None] * len(items)
    valid: list = [None] * len(items)
    reasons: list = [None] * len(items)
    todo = []
    for i in range(len(items)):
        hit = _cached_scores(out_dir, i, name, n)
        if hit is None:
            todo.append(i)
        else:
            scores[i], valid[i], reasons[i] = hit
    if todo:
        fn = build_reward(name, **dict(kwargs.get(name) or {}))
        images = [im for i in todo for im in per_prompt[i]]
        prompts = [items[i].prompt for i in todo for _ in range(n)]
        metas = [items[i].metadata for i in todo for _ in range(n)]
        out = fn(images, prompts, metas)
        details = list(out.details) + [{}] * (len(images) - len(out.details))
        for k, i in enumerate(todo):
            s = [float(x) for x in out.scores[k * n:(k + 1) * n]]
            v = [bool(x) for x in out.valid[k * n:(k + 1) * n]]
            scores[i], valid[i] = s, v
            reasons[i] = _invalid_reason(details[k * n:(k + 1) * n], v)
            if out_dir:
                _store_scores(out_dir, i, name, s, v, reasons[i])
    return scores, valid, reasons


def evaluate_prompts(policy: Policy, items: list[PromptItem], reward_names: list[str],
                     reward_kwargs: dict[str, dict], images_per_prompt: int, params: SamplingParams,
                     seed: int, out_dir: Path | None, title: str = "",
                     progress: Any = None) -> dict[str, Any]:
    """Mean score per reward, per category (metadata 'tag') and overall (mean of categories).

    ``result["notes"]`` says why a category has no score (every image invalid for a reward).
    Saves results.json and results.md (one table row per reward) under ``out_dir``."""
    if not items:
        raise UserError("evaluation: no prompts to evaluate")
    out_dir = Path(out_dir) if out_dir else None
    digest = hashlib.sha256("\n".join(it.prompt for it in items).encode()).hexdigest()[:16]
    _check_eval_config(out_dir, {"prompts_sha256": digest, "seed": seed,
                                 "images_per_prompt": images_per_prompt,
                                 "cfg_scale": params.cfg_scale, "temperature": params.temperature,
                                 "top_k": params.top_k, "top_p": params.top_p})
    per_prompt = generate_images(policy, items, images_per_prompt, params, seed, out_dir,
                                 progress=progress)
    tags = [it.metadata.get("tag") or "all" for it in items]
    table: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for name in reward_names:
        scores, valid, reasons = _score_reward(name, reward_kwargs, per_prompt, items, out_dir)
        table[name] = _per_tag(scores, valid, tags)
        notes += _empty_tag_notes(name, valid, reasons, tags)
    result = {"prompts": len(items), "images_per_prompt": images_per_prompt, "seed": seed,
              "cfg_scale": params.cfg_scale, "scores": table, "notes": notes}
    if out_dir:
        (out_dir / "results.json").write_text(json.dumps(result, indent=1))
        head = title or (f"{len(items)} prompts x {images_per_prompt} images: mean reward by "
                         f"category")
        text = markdown_table(table, head) + "".join(f"\n- {note}" for note in notes)
        (out_dir / "results.md").write_text(text + ("\n" if notes else ""))
    return result


def _empty_tag_notes(name: str, valid: list[list[bool]], reasons: list[str | None],
                     tags: list[str]) -> list[str]:
    """One line per category in which reward ``name`` found no usable image, saying why."""
    notes = []
    for tag in sorted(set(tags)):
        rows = [i for i, t in enumerate(tags) if t == tag]
        if any(ok for i in rows for ok in valid[i]):
            continue
        count = sum(len(valid[i]) for i in rows)
        why = next((reasons[i] for i in rows if reasons[i]), None)
        notes.append(f"{tag}: no score from reward '{name}': all {count} images were invalid"
                     + (f" ({why})" if why else " (the reward gave no reason)"))
    return notes


def _per_tag(scores: list[list[float]], valid: list[list[bool]],
             tags: list[str]) -> dict[str, float]:
    """Mean valid score per tag, overall = mean of tags (GenEval's convention), invalid count."""
    per_tag: dict[str, float] = {}
    for tag in sorted(set(tags)):
        vals = [s for i, t in enumerate(tags) if t == tag
                for s, ok in zip(scores[i], valid[i]) if ok]
        per_tag[tag] = float(sum(vals) / len(vals)) if vals else float("nan")
    finite = [v for v in per_tag.values() if math.isfinite(v)]
    per_tag["overall"] = float(sum(finite) / len(finite)) if finite else float("nan")
    per_tag["invalid"] = float(sum(not ok for vs in valid for ok in vs))
    return per_tag


def evaluate_benchmark(policy: Policy, path: str | Path, reward_names: list[str],
                       reward_kwargs: dict[str, dict], images_per_prompt: int,
                       params: SamplingParams, seed: int, out_dir: Path | None,
                       max_prompts: int | None = None, items: list[PromptItem] | None = None,
                       progress: Any = None) -> dict[str, Any]:
    """:func:`load_benchmark` + :func:`evaluate_prompts`: the one call ``stagerl eval --benchmark``
    needs. The whole file is evaluated unless ``max_prompts`` is given, which applies per file
    (every category of a folder is kept). ``items``: the benchmark already loaded."""
    items = load_benchmark(path, max_prompts) if items is None else items
    title = f"{path}: mean reward by category ({len(items)} prompts x {images_per_prompt} images)"
    result = evaluate_prompts(policy, items, reward_names, reward_kwargs, images_per_prompt,
                              params, seed, out_dir, title=title, progress=progress)
    result["benchmark"] = str(path)
    return result


# --------------------------------------------------------------------------------------------------
# Tables


def _columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    return cols


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A plain-text table: one row per name, one column per category; names are never cut."""
    cols = _columns(rows)
    first = max([len(name) for name in rows] + [4]) + 1
    widths = [max(len(c), 6) + 2 for c in cols]
    head = " " * first + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))
    lines = [title] if title else []
    lines += [head] + [f"{name:<{first}}" + "".join(
        f"{r.get(c, float('nan')):>{w}.3f}" for c, w in zip(cols, widths))
        for name, r in rows.items()]
    return "\n".join(lines)


def markdown_table(rows: dict[str, dict[str, Any]], title: str = "", digits: int = 3) -> str:
    """A GitHub markdown table: one row per name, one column per category. Cells may be floats
    (formatted with ``digits``) or ready-made strings (e.g. "0.41 ± 0.03")."""
    cols = _columns(rows)

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
        return "n/a" if v is None else str(v)

    lines = [f"**{title}**", ""] if title else []
    lines.append("| | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    lines += ["| " + name + " | " + " | ".join(cell(r.get(c)) for c in cols) + " |"
              for name, r in rows.items()]
    return "\n".join(lines) + "\n"

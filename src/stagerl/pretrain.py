"""Pretrain the shapes-world base model from scratch.

Recipe: render the world's "train" split, fit the patch-codebook tokenizer on those renders, train
the tiny LlamaGen-style policy (policies/tiny.py) with next-token cross-entropy, AdamW, a linear
warmup + cosine decay, 10 % prompt dropout to the null prompt (so CFG works, as in LlamaGen) and an
EMA of the weights (the EMA is what gets saved and evaluated). Then sample the held-out "test"
split under CFG and score it with the exact evaluator (strict and lenient per-category tables).

The default budget is sized to land the base model where RL has room to improve (the target: strict
overall 0.30-0.65 on held-out prompts, counting/position/colour attribution below single object)
within 15 minutes on 2 CPU cores; see assets/shapes/MODEL_CARD.md for the measured run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stagerl.config_schema import _f
from stagerl.eval import CHUNK_PROMPTS, EVAL_SEED, ShapesEval, evaluate_suite
from stagerl.policies.base import PromptInputs, SamplingParams
from stagerl.policies.tiny import PromptVocab, TinyConfig, TinyPolicy
from stagerl.worlds.shapes.prompts import generate, prompt_vocabulary
from stagerl.worlds.shapes.render import render
from stagerl.worlds.shapes.spec import WorldSpec
from stagerl.worlds.shapes.tokenizer import PatchTokenizer

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Every knob of the pretraining recipe; the defaults made the shipped model."""

    seed: int = _f(0, "Seed for data generation, initialisation, batch order and prompt dropout.",
                   min=0, max=2 ** 63 - 1)
    train_examples: int = _f(20000, "Renders of the world's 'train' split the model learns from.",
                             min=1)
    codebook_size: int = _f(512, "K: most frequent actual patches kept by the tokenizer ("
                            "~512; the default world has only ~420 distinct ones).", min=1)
    patch: int = _f(4, "Patch side in pixels; token grid = canvas / patch per side (32/4 = 8x8).",
                    min=1)
    d_model: int = _f(128, "Transformer width.", min=1)
    n_layers: int = _f(4, "Transformer blocks.", min=1)
    n_heads: int = _f(4, "Attention heads.", min=1)
    mlp_hidden: int = _f(352, "SwiGLU hidden width (~8/3 d_model, Llama's ratio).", min=1)
    prompt_len: int = _f(16, "T: prompt slots; longer prompts keep their first T words.", min=1)
    steps: int = _f(1000, "Optimizer steps (measured: ~800 -> strict 0.37, ~2,200 -> 0.59; "
                    "1,000 lands in the 0.30-0.65 band, see assets/shapes/MODEL_CARD.md).", min=1)
    batch_size: int = _f(64, "Sequences per optimizer step.", min=1)
    lr: float = _f(1e-3, "Peak AdamW learning rate (linear warmup, cosine decay to 10 % of it).",
                   min=0.0)
    warmup_steps: int = _f(100, "Linear warmup steps.", min=0)
    weight_decay: float = _f(0.01, "AdamW weight decay on matrices (not on norm gains).", min=0.0)
    grad_clip: float = _f(1.0, "Max global gradient norm; 0 = off.", min=0.0)
    prompt_dropout: float = _f(0.1, "Probability of replacing a prompt by the null prompt, which "
                               "trains the unconditional branch for CFG (LlamaGen).",
                               min=0.0, max=1.0)
    ema_decay: float = _f(0.995, "EMA decay of the weights; the EMA is saved and evaluated; "
                          "0 = off.", min=0.0, max=1.0)
    eval_prompts: int = _f(240, "Held-out 'test' split prompts for the final evaluation (a "
                           "multiple of 6 gives every category the same count).", min=1)
    eval_images_per_prompt: int = _f(4, "Images sampled per evaluation prompt.", min=1)
    eval_cfg_scales: list[float] = _f([1.5, 2.0, 2.5, 3.0], "CFG scales to evaluate at ("
                                      "1.5-3 suit this model); the card recommends the best.",
                                      min=0.0)
    eval_seed: int = _f(EVAL_SEED, "Seed of the test-split prompts and of sampling at evaluation.",
                        min=0, max=2 ** 63 - 1)
    threads: int = _f(0, "torch intra-op threads for this run; 0 = leave torch's default.", min=0)
    progress: bool = _f(True, "Show a tqdm progress bar.")


@dataclass
class PretrainOptions(PretrainConfig):
    """``stagerl pretrain``: the recipe and where its model goes."""

    out: str = _f("runs/pretrain-shapes", "Directory to write the model (weights, config, vocab, "
                  "tokenizer) and its MODEL_CARD.md.")

    def recipe(self) -> PretrainConfig:
        return PretrainConfig(**{f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(PretrainConfig)})


# --------------------------------------------------------------------------------------------------
# Data


def build_data(cfg: PretrainConfig, spec: WorldSpec) -> tuple[list[str], np.ndarray]:
    """Prompts and uint8 renders [N, H, W, 3] of the train split."""
    examples = generate(cfg.train_examples, cfg.seed, spec, split="train")
    images = np.stack([render(e.objects, spec) for e in examples])
    return [e.prompt for e in examples], images


def build_model(cfg: PretrainConfig, spec: WorldSpec, images: np.ndarray) -> TinyPolicy:
    """Fit the tokenizer on the train renders and build a random-init policy around it."""
    tokenizer = PatchTokenizer.fit(images, cfg.codebook_size, cfg.patch)
    return random_policy(cfg, spec, tokenizer)


def random_policy(cfg: PretrainConfig, spec: WorldSpec, tokenizer: PatchTokenizer) -> TinyPolicy:
    """A randomly initialised policy whose prompt vocabulary covers the world's templates."""
    vocab = PromptVocab([PromptVocab.PAD, PromptVocab.UNK, PromptVocab.NULL]
                        + prompt_vocabulary(spec))
    config = TinyConfig(vocab_size=tokenizer.vocab_size, grid=list(tokenizer.grid),
                        prompt_vocab_size=len(vocab), prompt_len=cfg.prompt_len,
                        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                        mlp_hidden=cfg.mlp_hidden)
    torch.manual_seed(cfg.seed)
    return TinyPolicy(config, tokenizer, vocab)


# --------------------------------------------------------------------------------------------------
# Training


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def _ema_update(ema: TinyPolicy, model: TinyPolicy, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def train(model: TinyPolicy, inputs: PromptInputs, tokens: torch.Tensor,
          cfg: PretrainConfig) -> tuple[TinyPolicy, list[float]]:
    """Teacher-forced cross-entropy. tokens [N, L]; returns (EMA model, per-step losses)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim == 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else model
    losses = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not cfg.progress, mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, len(tokens), (cfg.batch_size,), generator=gen)
        batch = inputs.select(idx)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout  # [B]
        ids = torch.where(drop[:, None], batch.uncond_ids, batch.cond_ids)
        mask = torch.where(drop[:, None], batch.uncond_mask, batch.cond_mask)
        logits = model.image_logits(ids, mask, tokens[idx])  # [B, L, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[idx].flatten())
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not model:
            # Short warm-up of the EMA horizon so early steps are not dominated by the random init.
            _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    return ema.eval(), losses


# --------------------------------------------------------------------------------------------------
# Evaluation: the one shapes evaluation of stagerl.eval (docs/design.md §13)


def evaluate_recipe(model: TinyPolicy, cfg: PretrainConfig,
                    n_prompts: int | None = None) -> list[ShapesEval]:
    """The recipe's held-out evaluation, one :class:`stagerl.eval.ShapesEval` per CFG scale:
    the first ``n_prompts`` (default ``cfg.eval_prompts``) prompts of the heldout suite, exactly as
    ``stagerl eval --cfg-scale S --seed <eval_seed>`` draws and scores them."""
    n = cfg.eval_prompts if n_prompts is None else n_prompts
    return [evaluate_suite(model, "heldout", n, cfg.eval_images_per_prompt,
                           SamplingParams(cfg_scale=s), cfg.eval_seed)
            for s in cfg.eval_cfg_scales]


def format_table(result: ShapesEval) -> str:
    """A Markdown table: one row per category, strict and lenient accuracy."""
    strict, lenient = result.strict, result.lenient
    rows = ["| category | strict | lenient |", "|---|---|---|"]
    for tag in list(k for k in strict if k != "overall") + ["overall"]:
        rows.append(f"| {tag} | {strict[tag]:.3f} | {lenient.get(tag, float('nan')):.3f} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# The whole recipe


@dataclass
class PretrainResult:
    """What the recipe measured; ``pretrain_results.json`` is :meth:`to_dict`."""

    config: PretrainConfig
    params: int
    codebook_used: float  # fraction of the codebook the train renders use
    data_seconds: float
    train_seconds: float
    total_seconds: float
    threads: int
    final_loss: float  # mean of the last 50 steps
    evals: list[ShapesEval]  # one per CFG scale
    check: ShapesEval | None = None  # eval_check.json: the quick reproduction of the card

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"config": dataclasses.asdict(self.config), "params": self.params,
                             "codebook_used": self.codebook_used,
                             "data_seconds": self.data_seconds,
                             "train_seconds": self.train_seconds,
                             "total_seconds": self.total_seconds, "threads": self.threads,
                             "final_loss": self.final_loss,
                             "evals": [ev.to_dict() for ev in self.evals]}
        if self.check is not None:
            d["check"] = {k: getattr(self.check, k) for k in _CHECK_KEYS}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], check: dict[str, Any] | None = None
                  ) -> "PretrainResult":
        """A stored result; ``check`` is the full eval_check.json (the results file keeps only
        a summary of it)."""
        return cls(PretrainConfig(**d["config"]), d["params"], d["codebook_used"],
                   d["data_seconds"], d["train_seconds"], d["total_seconds"], d["threads"],
                   d["final_loss"], [ShapesEval.from_dict(ev) for ev in d["evals"]],
                   ShapesEval.from_dict(check) if check is not None else None)


_CHECK_KEYS = ("prompts", "images_per_prompt", "cfg_scale", "seed", "strict")


def pretrain(cfg: PretrainConfig, out_dir: str | Path | None = None,
             spec: WorldSpec | None = None) -> PretrainResult:
    """Data -> tokenizer -> model -> EMA -> evaluation; saves to ``out_dir`` when given (the
    weights, eval_check.json and pretrain_results.json)."""
    spec = spec or WorldSpec()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    prompts, images = build_data(cfg, spec)
    model = build_model(cfg, spec, images)
    tokens = model.tokenizer.encode(images)  # [N, L]
    inputs = model.encode_prompts(prompts)
    t_data = time.perf_counter() - t0
    log.info("data: %d examples, %d codes, %.1fs", len(prompts), model.tokenizer.vocab_size, t_data)
    ema, losses = train(model, inputs, tokens, cfg)
    t_train = time.perf_counter() - t0 - t_data
    evals = evaluate_recipe(ema, cfg)
    result = PretrainResult(cfg, sum(p.numel() for p in ema.parameters()),
                            model.tokenizer.usage(tokens), t_data, t_train,
                            time.perf_counter() - t0, torch.get_num_threads(),
                            float(np.mean(losses[-50:])), evals)
    if out_dir is not None:
        ema.save_pretrained(out_dir)
        result.check = write_check(ema, result, out_dir)
        (Path(out_dir) / "pretrain_results.json").write_text(
            json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def write_check(model: TinyPolicy, result: PretrainResult, out_dir: str | Path,
                prompts: int = 2 * CHUNK_PROMPTS) -> ShapesEval:
    """Score the first ``prompts`` eval prompts at the best CFG scale and save it as
    eval_check.json: the reference tests/test_shipped_model.py reproduces in seconds. A multiple
    of the evaluation's chunk size, so its images are exactly those prompts' images in the full
    table."""
    cfg = dataclasses.replace(result.config, eval_cfg_scales=[best_cfg_scale(result)])
    check = evaluate_recipe(model, cfg, min(prompts, cfg.eval_prompts))[0]
    (Path(out_dir) / "eval_check.json").write_text(json.dumps(check.to_dict(), indent=2) + "\n")
    return check


def best_cfg_scale(result: PretrainResult) -> float:
    """The evaluated CFG scale with the highest strict overall accuracy (ties: the smaller)."""
    best = max(result.evals, key=lambda ev: (ev.strict["overall"], -ev.cfg_scale))
    return float(best.cfg_scale)


def model_card(result: PretrainResult, command: str) -> str:
    """A short Markdown model card: how the model was made and how it scores."""
    cfg = dataclasses.asdict(result.config)
    lines = [
        "# Shapes-world base model (stagerl tiny policy)", "",
        "A LlamaGen-style decoder-only transformer over 4x4-pixel patch codes of the shapes world, "
        "pretrained from scratch by `stagerl pretrain`. It is the default policy of "
        "`stagerl train` / `stagerl eval` (`model.path: builtin:shapes`).", "",
        "## How it was made",
        f"- Command: `{command}`",
        f"- Seed: {cfg['seed']}; {cfg['steps']} steps x batch {cfg['batch_size']}, AdamW lr "
        f"{cfg['lr']} (warmup {cfg['warmup_steps']}, cosine to 10 %), prompt dropout "
        f"{cfg['prompt_dropout']}, EMA {cfg['ema_decay']} (the EMA weights are shipped).",
        f"- Data: {cfg['train_examples']} renders of the world's `train` split; tokenizer codebook "
        f"{cfg['codebook_size']} max, patch {cfg['patch']}, {result.codebook_used:.0%} used.",
        f"- Model: d={cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
        f"{result.params:,} parameters; final train loss {result.final_loss:.3f}.",
        f"- Wall time: {result.total_seconds:.0f} s total ({result.train_seconds:.0f} s "
        f"training) with {result.threads} torch thread(s), on a shared 2-core CPU.", "",
        "## Evaluation protocol",
        f"- Suite `{result.evals[0].suite}` (the `test` split: held-out seed stream, "
        "in-distribution templates), "
        f"the first {cfg['eval_prompts']} prompts of seed {cfg['eval_seed']} (categories cycle, so "
        f"{cfg['eval_prompts'] // 6} per category), {cfg['eval_images_per_prompt']} images per "
        f"prompt, temperature 1, no top-k/top-p, sampled and scored by `stagerl.eval.evaluate_suite`"
        f" (chunks of {CHUNK_PROMPTS} prompts, chunk c seeded mix({cfg['eval_seed']}, c)), the "
        "function `stagerl eval` and in-run evaluation call: `stagerl eval --prompts "
        f"{cfg['eval_prompts']} --cfg-scale S` reproduces each table below. Scored by the exact "
        "evaluator (`stagerl.worlds.shapes.evaluate`).",
        "- Overall = mean of the six per-category accuracies (GenEval's convention).",
        f"- Recommended CFG scale: **{best_cfg_scale(result)}** (best strict overall among those "
        "evaluated).", ""]
    ck = result.check
    if ck is not None:
        lines += [f"- Quick check (`eval_check.json`, reproduced by tests/test_shipped_model.py): "
                  f"the first {ck.prompts} of those prompts x {ck.images_per_prompt} images "
                  f"at CFG {ck.cfg_scale}, seed {ck.seed}: strict overall "
                  f"{ck.strict['overall']:.3f}.", ""]
    for ev in result.evals:
        lines += [f"### CFG {ev.cfg_scale} (mean partial-credit score {ev.partial:.3f})", "",
                  format_table(ev), ""]
    return "\n".join(lines)

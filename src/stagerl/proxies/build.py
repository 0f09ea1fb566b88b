"""Build and measure the shapes world's learned proxy rewards (networks: :mod:`stagerl.proxies.nets`;
saving and loading: :mod:`stagerl.proxies.proxy`).

A proxy is trained on images labelled by the exact evaluator (the gold reward):
1. world renders of the ``train`` split (what a perfect policy draws), and
2. samples of the base model on ``train`` prompts (where the policy starts; RL then leaves it).
The detector learns the exact back end's parse of each image (objects and fragments); the scorer
learns the strict verdict of (image, prompt) pairs, each image paired with its own prompt and
with another example's prompt (so that it must read the prompt).

Agreement with gold is then measured on data it never saw: fresh base-model samples and fresh
renders of the held-out ``test`` split, and written into ``proxy.json`` beside the weights.
``stagerl pretrain-reward NAME`` runs all of it (docs/rewards.md, "Learned proxy rewards").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stagerl.config_schema import _f
from stagerl.data import PromptItem, mix_seed
from stagerl.errors import UserError
from stagerl.policies.base import SamplingParams
from stagerl.policies.tiny import TinyPolicy, resolve_model_path
from stagerl.worlds.shapes.detect import SceneParse, parse_image
from stagerl.worlds.shapes.evaluate import verdict_from_parse
from stagerl.worlds.shapes.prompts import generate
from stagerl.proxies.proxy import PROMPT_LEN, Proxy, check_proxy_name, scorer_vocab
from stagerl.proxies.nets import STRIDE, DetectorNet, ScorerNet, as_input
from stagerl.worlds.shapes.render import render
from stagerl.worlds.shapes.spec import WorldSpec

log = logging.getLogger(__name__)



@dataclass
class ProxyConfig:
    """Every knob of a proxy reward's recipe; the defaults made the shipped proxies."""

    seed: int = _f(0, "Seed for data, sampling, initialisation and batch order.", min=0,
                   max=2 ** 63 - 1)
    renders: int = _f(4000, "Training renders of the world's 'train' split (data knob).", min=0)
    samples: int = _f(4000, "Training samples of the base model on 'train' prompts (data knob).",
                      min=0)
    width: int = _f(32, "Channels of every layer (capacity knob).", min=1)
    steps: int = _f(1500, "Optimizer steps.", min=1)
    batch: int = _f(128, "Images per optimizer step.", min=1)
    lr: float = _f(2e-3, "AdamW learning rate (cosine decay to 10 %).", min=0.0)
    base_model: str = _f("builtin:shapes", "The base model whose samples are labelled: "
                         "builtin:shapes or a tiny-model directory.")
    sample_cfg: float = _f(2.0, "CFG scale of the base-model samples (stagerl train's default).",
                           min=1.0)
    eval_samples: int = _f(512, "Held-out base-model samples ('test' prompts) for agreement.",
                           min=1)
    eval_renders: int = _f(256, "Held-out renders ('test' split) for agreement.", min=1)
    threads: int = _f(0, "torch intra-op threads; 0 = leave torch's default.", min=0)
    progress: bool = _f(True, "Show a tqdm progress bar.")


@dataclass
class LabelledImages:
    """Images with the prompts they answer and the gold parse and verdict of each."""

    images: np.ndarray  # [N, H, W, 3] uint8
    items: list[PromptItem]  # N prompts with their GenEval metadata
    parses: list[SceneParse]  # N exact parses
    strict: np.ndarray  # [N] bool gold strict verdicts
    lenient: np.ndarray  # [N] bool gold lenient verdicts


# --------------------------------------------------------------------------------------------------
# Data


def _items(n: int, seed: int, spec: WorldSpec, split: str) -> tuple[list[PromptItem], np.ndarray]:
    examples = generate(n, seed, spec, split=split)
    images = np.stack([render(e.objects, spec) for e in examples]) if examples else \
        np.zeros((0, spec.canvas, spec.canvas, 3), np.uint8)
    return [PromptItem(e.prompt, e.metadata) for e in examples], images


def _sample(policy: TinyPolicy, items: list[PromptItem], cfg_scale: float, seed: int,
            chunk: int = 256) -> np.ndarray:
    """One base-model image per prompt, chunk c seeded with mix(seed, c) -> [N, H, W, 3] uint8."""
    from stagerl.policies.sampling import chunk_noise, sample_tokens

    params = SamplingParams(cfg_scale=cfg_scale)
    out = []
    with torch.no_grad():
        for c in range(0, len(items), chunk):
            prompts = [it.prompt for it in items[c:c + chunk]]
            noise = chunk_noise(mix_seed(seed, c // chunk), len(prompts), policy.num_image_tokens)
            _, tokens, _, _ = sample_tokens(policy, prompts, params, noise)
            out.extend(np.asarray(im.convert("RGB")) for im in policy.decode(tokens))
    return np.stack(out)


def label(images: np.ndarray, items: list[PromptItem], spec: WorldSpec) -> LabelledImages:
    """The exact evaluator's parse and verdicts of every (image, prompt)."""
    parses = [parse_image(im, spec) for im in images]
    verdicts = [verdict_from_parse(p, it.metadata) for p, it in zip(parses, items)]
    return LabelledImages(images, items, parses, np.array([v.strict for v in verdicts]),
                          np.array([v.lenient for v in verdicts]))


def _mismatched(data: LabelledImages, seed: int) -> LabelledImages:
    """The same images, each paired with another image's prompt, labelled again by gold."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(data.items))
    items = [data.items[j] for j in perm]
    verdicts = [verdict_from_parse(p, it.metadata) for p, it in zip(data.parses, items)]
    return LabelledImages(data.images, items, data.parses,
                          np.array([v.strict for v in verdicts]),
                          np.array([v.lenient for v in verdicts]))


def _concat(parts: list[LabelledImages]) -> LabelledImages:
    parts = [p for p in parts if len(p.items)]
    return LabelledImages(np.concatenate([p.images for p in parts]),
                          [it for p in parts for it in p.items],
                          [x for p in parts for x in p.parses],
                          np.concatenate([p.strict for p in parts]),
                          np.concatenate([p.lenient for p in parts]))


def build_datasets(cfg: ProxyConfig, spec: WorldSpec) -> dict[str, LabelledImages]:
    """Training data and the two held-out sets: {"train", "eval_samples", "eval_renders"}."""
    if cfg.renders + cfg.samples == 0:
        raise UserError("renders/samples: the proxy needs at least one training image")
    path = resolve_model_path(cfg.base_model)
    if not (path / "config.json").is_file():
        raise UserError(f"base_model: {cfg.base_model!r} is not a tiny-model directory (no "
                        f"config.json); use builtin:shapes or a folder written by stagerl pretrain")
    policy = TinyPolicy.from_pretrained(path).eval()
    if policy.config.grid[0] * policy.tokenizer.patch != spec.canvas:
        raise UserError(f"base_model {cfg.base_model!r} draws another canvas than the world "
                        f"spec's {spec.canvas} pixels")
    r_items, r_images = _items(cfg.renders, cfg.seed, spec, "train")
    # Sampled prompts come from another stream of the same split than the renders'.
    s_items, _ = _items(cfg.samples, mix_seed(cfg.seed, 1), spec, "train")
    parts = [label(r_images, r_items, spec)]
    if cfg.samples:
        parts.append(label(_sample(policy, s_items, cfg.sample_cfg, mix_seed(cfg.seed, 2)),
                           s_items, spec))
    train = _concat(parts)
    e_items, _ = _items(cfg.eval_samples, mix_seed(cfg.seed, 3), spec, "test")
    eval_samples = label(_sample(policy, e_items, cfg.sample_cfg, mix_seed(cfg.seed, 4)),
                         e_items, spec)
    er_items, er_images = _items(cfg.eval_renders, mix_seed(cfg.seed, 5), spec, "test")
    eval_renders = label(er_images, er_items, spec)
    return {"train": train, "eval_samples": eval_samples, "eval_renders": eval_renders}


# --------------------------------------------------------------------------------------------------
# Detector: targets, loss


def detector_targets(parses: list[SceneParse], spec: WorldSpec) -> dict[str, torch.Tensor]:
    """Per-cell targets from exact parses: every object and fragment owns the cell of its box
    centre (the larger component wins a shared cell)."""
    g = spec.canvas // STRIDE
    n = len(parses)
    obj = torch.zeros(n, g, g)
    kind = torch.full((n, g, g), -100, dtype=torch.long)  # -100: ignored by cross_entropy
    color = torch.full((n, g, g), -100, dtype=torch.long)
    box = torch.zeros(n, 4, g, g)
    area = torch.zeros(n, g, g)
    shapes, colors = list(spec.shapes), list(spec.colors)
    for i, parse in enumerate(parses):
        comps = [(shapes.index(d.label), colors.index(d.color), d.box) for d in parse.detections]
        comps += [(len(shapes), colors.index(f.color) if f.color else len(colors), f.box)
                  for f in parse.fragments]
        for k, c, (x0, y0, x1, y1) in comps:
            cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
            gx, gy = min(int(cx // STRIDE), g - 1), min(int(cy // STRIDE), g - 1)
            if w * h <= area[i, gy, gx]:
                continue
            area[i, gy, gx] = w * h
            obj[i, gy, gx], kind[i, gy, gx], color[i, gy, gx] = 1.0, k, c
            box[i, :, gy, gx] = torch.tensor([cx / STRIDE - gx - 0.5, cy / STRIDE - gy - 0.5,
                                              w / 8.0, h / 8.0])
    return {"obj": obj, "kind": kind, "color": color, "box": box}


def detector_loss(net: DetectorNet, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    out = net(x)
    pos = t["obj"] > 0  # [B, g, g]
    loss = F.binary_cross_entropy_with_logits(out.objectness, t["obj"],
                                              pos_weight=torch.tensor(10.0))
    loss = loss + F.cross_entropy(out.kind, t["kind"]) + F.cross_entropy(out.color, t["color"])
    if pos.any():
        loss = loss + (out.box.permute(0, 2, 3, 1)[pos] - t["box"].permute(0, 2, 3, 1)[pos]
                       ).abs().mean()
    return loss


# --------------------------------------------------------------------------------------------------
# Training


def _cosine(step: int, steps: int) -> float:
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))


def _fit(net: torch.nn.Module, n: int, batch_loss: Any, cfg: ProxyConfig) -> float:
    """AdamW with cosine decay over ``cfg.steps`` random batches of ``cfg.batch`` of ``n``
    examples; ``batch_loss(idx)`` -> scalar loss. Returns the mean loss of the last 50 steps."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.steps))
    tail: list[float] = []
    net.train()
    for _ in tqdm(range(cfg.steps), desc="proxy", disable=not cfg.progress):
        idx = torch.randint(n, (min(cfg.batch, n),), generator=gen)
        loss = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tail = (tail + [float(loss.detach())])[-50:]
    net.eval()
    return float(np.mean(tail))


def build_proxy(name: str, cfg: ProxyConfig, spec: WorldSpec = WorldSpec()) -> Proxy:
    """Data, training and held-out agreement of proxy ``name`` (shapes_detector|shapes_scorer)."""
    kind = check_proxy_name(name)
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = build_datasets(cfg, spec)
    t_data = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    train = data["train"]
    x_all = as_input(torch.from_numpy(train.images))  # [N, 3, H, W]
    if kind == "detector":
        net: torch.nn.Module = DetectorNet(len(spec.shapes), len(spec.colors), cfg.width)
        t = detector_targets(train.parses, spec)
        loss = _fit(net, len(x_all), lambda i: detector_loss(
            net, x_all[i], {k: v[i] for k, v in t.items()}), cfg)
        examples = len(x_all)
    else:
        vocab = scorer_vocab(spec)
        net = ScorerNet(len(vocab), cfg.width)
        pairs = _concat([train, _mismatched(train, mix_seed(cfg.seed, 6))])
        x_pairs = torch.cat([x_all, x_all])
        ids, _ = vocab.encode([it.prompt for it in pairs.items], PROMPT_LEN)
        y = torch.from_numpy(pairs.strict.astype(np.float32))
        loss = _fit(net, len(y), lambda i: F.binary_cross_entropy_with_logits(
            net(x_pairs[i], ids[i]), y[i]), cfg)
        examples = len(y)
    t_train = time.perf_counter() - t0 - t_data
    proxy = Proxy(kind, net, spec, {"name": name, "config": dataclasses.asdict(cfg)})
    agreement = {"base_samples": agreement_on(proxy, data["eval_samples"]),
                 "renders": agreement_on(proxy, _concat([
                     data["eval_renders"],
                     _mismatched(data["eval_renders"], mix_seed(cfg.seed, 7))]))}
    proxy.meta.update({
        "agreement": agreement, "final_loss": loss,
        "parameters": sum(p.numel() for p in net.parameters()),
        "data": {"renders": cfg.renders, "samples": cfg.samples, "examples": examples,
                 "gold_strict_rate_train": float(train.strict.mean())},
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "threads": torch.get_num_threads()})
    return proxy


# --------------------------------------------------------------------------------------------------
# Agreement with gold, the card


def agreement_on(proxy: Proxy, data: LabelledImages) -> dict[str, float]:
    """How the proxy's verdicts agree with gold on ``data``."""
    s = proxy.scores(data.images, data.items)
    gold, mine = data.strict, s["strict"].astype(bool)
    out = {"n": float(len(gold)), "gold_pass": float(gold.mean()),
           "proxy_pass": float(mine.mean()), "strict_agreement": float((gold == mine).mean()),
           # the hackable direction: the proxy passes an image gold fails
           "false_pass": float(mine[~gold].mean()) if (~gold).any() else 0.0,
           "false_fail": float((~mine)[gold].mean()) if gold.any() else 0.0}
    if "lenient" in s:
        out["lenient_agreement"] = float((s["lenient"].astype(bool) == data.lenient).mean())
    if proxy.kind == "scorer":
        out["auc"] = _auc(s["score"], gold)
    return out


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (the rank-sum form; ties count half)."""
    pos, neg = score[label], score[~label]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


@dataclass
class ProxyOptions(ProxyConfig):
    """``stagerl pretrain-reward NAME``: the recipe and where the proxy goes."""

    out: str = _f("", "Directory to write the proxy (weights.safetensors, proxy.json, CARD.md); "
                  "default runs/proxy-<NAME>.")

    def recipe(self) -> ProxyConfig:
        return ProxyConfig(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(ProxyConfig)})


def proxy_card(proxy: Proxy, command: str) -> str:
    """CARD.md: what the proxy is, its data, size, seed and held-out agreement with gold."""
    m, cfg = proxy.meta, proxy.meta["config"]
    what = ("a learned detector whose detections go through GenEval's rules (strict verdict "
            "= rules + no unrequested objects + no fragments, as gold)" if proxy.kind == "detector"
            else "a learned scorer of P(strict verdict passes | image, prompt)")
    lines = [f"# Shapes-world proxy reward `{m['name']}`", "",
             f"{what[0].upper() + what[1:]}; a proxy of the exact evaluator (gold), for reward-hacking "
             "experiments (docs/rewards.md, \"Learned proxy rewards\").", "",
             "## How it was made",
             f"- Command: `{command}`",
             f"- Seed {cfg['seed']}; width {cfg['width']}, {m['parameters']:,} parameters; "
             f"{cfg['steps']} steps x batch {cfg['batch']}, AdamW lr {cfg['lr']} (cosine to 10 %).",
             f"- Data: {cfg['renders']} renders of the `train` split and {cfg['samples']} samples of "
             f"`{cfg['base_model']}` (CFG {cfg['sample_cfg']}) on `train` prompts, labelled by the "
             f"exact evaluator ({m['data']['examples']} training examples"
             + (", each image with its own prompt and with another's" if proxy.kind == "scorer"
                else "") + f"; gold strict pass rate {m['data']['gold_strict_rate_train']:.3f}).",
             f"- Final training loss {m['final_loss']:.4f}; wall time {m['seconds']['total']:.0f} s "
             f"({m['seconds']['data']:.0f} s data, {m['seconds']['train']:.0f} s training) with "
             f"{m['threads']} torch thread(s).", "",
             "## Agreement with gold on held-out data",
             "Base samples: fresh samples of the base model on `test` prompts. Renders: fresh "
             "`test` renders, each with its own prompt and with another's. False pass = the "
             "proxy passes an image gold fails (the direction a policy can exploit).", "",
             "| data | n | gold pass | proxy pass | strict agreement | false pass | false fail "
             "| lenient agreement / AUC |", "|---|---|---|---|---|---|---|---|"]
    for where, a in m["agreement"].items():
        extra = a.get("lenient_agreement", a.get("auc", float("nan")))
        lines.append(f"| {where} | {int(a['n'])} | {a['gold_pass']:.3f} | {a['proxy_pass']:.3f} | "
                     f"{a['strict_agreement']:.3f} | {a['false_pass']:.3f} | "
                     f"{a['false_fail']:.3f} | {extra:.3f} |")
    return "\n".join(lines) + "\n"

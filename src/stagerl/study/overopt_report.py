"""The over-optimisation study's page (docs/<prefix>.md), its figures, and its block at the top of
docs/results.md: gold and proxy against sqrt(KL) per method first, then the per-method table
(:mod:`stagerl.study.overopt`), and a grid of images the proxy passes and gold fails."""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from stagerl.study.common import StudySummary
from stagerl.study.overopt import (DROP, SMOOTH, GoldFit, MethodOveropt, analyse,
                                   paired_difference, smoothed)
from stagerl.study.stats import stats
from stagerl.study.report import LABELS, _git_commit

BLOCK_START, BLOCK_END = "<!-- overopt:start -->", "<!-- overopt:end -->"
DEFAULT_PREFIX = "results_overopt"
BASE = "base model"
COLORS = {"vanilla_grpo": "tab:blue", "plus_ent": "tab:orange", "stage": "tab:green",
          "wo_kl": "tab:red"}


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, sd, n = stats(values)
    if n == 0:
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def gold_proxy_figure(methods: dict[str, MethodOveropt], path: Path, proxy: str) -> Path:
    """One panel per method against d = sqrt(KL): every seed's evaluations as faint markers, the
    mean over seeds at each evaluation, smoothed over SMOOTH evaluations, as lines (gold strict
    solid, gold lenient dotted, the proxy dashed black), and gold(d) with the seeds' mean α, β
    thick and translucent."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), sharey=True,
                             squeeze=False)
    for ax, (row, m) in zip(axes[0], methods.items()):
        color = COLORS.get(row, "tab:gray")
        n = min(len(ro.d) for ro in m.runs)
        mean = {k: np.mean([getattr(ro, k)[:n] for ro in m.runs], axis=0)
                for k in ("d", "gold", "lenient", "proxy")}
        for k in mean:  # the base point (index 0) is not smoothed into the trained ones
            mean[k][1:] = smoothed(mean[k][1:])
        for ro in m.runs:
            ax.plot(ro.d, ro.gold, "o", color=color, ms=2.5, alpha=0.35)
            ax.plot(ro.d, ro.proxy, "x", color="black", ms=2.5, alpha=0.3)
        ax.plot(mean["d"], mean["gold"], "-", color=color, lw=1.8, label="gold strict")
        ax.plot(mean["d"], mean["lenient"], ":", color=color, lw=1.5, label="gold lenient")
        ax.plot(mean["d"], mean["proxy"], "--", color="black", lw=1.5, label=f"proxy ({proxy})")
        if m.alpha:
            fit = GoldFit(float(np.mean(m.alpha)), float(np.mean(m.beta)))
            xs = np.linspace(1e-3, float(max(ro.d.max() for ro in m.runs)), 100)
            ax.plot(xs, mean["gold"][0] + fit.gain(xs), color=color, lw=4, alpha=0.3,
                    label="gold fit d(α − β ln d)")
        ax.set_title(f"{LABELS.get(row, row)}  (over-optimised: {m.overoptimised}/{len(m.runs)})",
                     fontsize=9)
        ax.set_xlabel("d = sqrt(KL to the base, per image)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out score (lines: mean of seeds, smoothed)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hacked_grid(summary: StudySummary, methods: dict[str, MethodOveropt], reward: Any,
                path: Path, per_method: int = 6) -> tuple[Path | None, dict[str, float]]:
    """Images of each method's last seed-0-first evaluation that the proxy passes and gold fails,
    with gold's reason; returns the grid path (None when there is none) and, per method, the
    fraction of its final held-out images that are such."""
    from PIL import Image, ImageOps

    from stagerl.eval import _load_prompt_dir, shapes_items
    from stagerl.tracking import image_grid
    from stagerl.worlds.shapes.evaluate import evaluate_image

    plan = summary.plan
    items = shapes_items("test", plan.eval_prompts)
    picked: list[tuple[Image.Image, str]] = []
    frac: dict[str, float] = {}
    # the base model's evaluation lives beside the runs: OUT/base (study.run.run_study)
    base_dir = Path(summary.runs[0].run_dir).parents[1] / "base"
    folders = {BASE: [base_dir]} if (base_dir / "eval" / "test").is_dir() else {}
    folders.update({row: [Path(ro.run.run_dir) for ro in sorted(m.runs, key=lambda r: r.run.seed)]
                    for row, m in methods.items()})
    for row, dirs in folders.items():
        found, n_images, n_hacked = [], 0, 0
        for run_dir in dirs:
            folder = run_dir / "eval" / "test"
            for i, it in enumerate(items):
                imgs = _load_prompt_dir(folder, i, plan.eval_images)
                if imgs is None:
                    continue
                out = reward(imgs, [it.prompt] * len(imgs), [it.metadata] * len(imgs))
                for img, score, ok in zip(imgs, out.scores.tolist(), out.valid.tolist()):
                    v = evaluate_image(img, it.metadata)
                    n_images += 1
                    if ok and score > 0.5 and not v.strict:
                        n_hacked += 1
                        img = ImageOps.expand(img, border=1, fill=(150, 150, 150))  # a frame
                        reason = v.reason.splitlines()[0] if v.reason else ""
                        found.append((img, f"{LABELS.get(row, row)}: {it.prompt} | gold: "
                                           f"{reason}"))
        frac[row] = n_hacked / n_images if n_images else float("nan")
        picked += found[:per_method] if row != BASE else []
    if not picked:
        return None, frac
    image_grid([p[0] for p in picked], [p[1] for p in picked], cols=per_method, scale=5,
               label_height=60).save(path)
    return path, frac


def _fit_peak(values: list[float]) -> str:
    """How many seeds' fits turn over within their run, and the median KL there."""
    inside = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    return f"{len(inside)}/{len(values)}" + (f", median {np.median(inside):.2f}" if inside else "")


def _table(methods: dict[str, MethodOveropt], levels: dict[str, list[float]],
           hacked: dict[str, float], base: dict[str, Any]) -> list[str]:
    first = next(iter(methods.values())).runs[0]
    lines = ["| method | over-optimised | peak gold | step at peak | KL at peak | drop to the end | "
             "α | β | fit turns over (median KL there) | final gold | final lenient | "
             "final proxy | final KL | proxy passes, gold fails |", "|---" * 14 + "|",
             f"| {BASE} | – | {first.gold[0]:.3f} | 0 | 0 | – | – | – | – | {first.gold[0]:.3f} | "
             f"{first.lenient[0]:.3f} | {first.proxy[0]:.3f} | 0 | "
             f"{hacked.get(BASE, float('nan')):.3f} |"]
    for row, m in methods.items():
        lines.append(
            f"| {LABELS.get(row, row)} | {m.overoptimised}/{len(m.runs)} | {_fmt(m.peak_gold)} | "
            f"{_fmt(m.peak_step, 0)} | {_fmt(m.kl_at_peak, 2)} | {_fmt(m.drop)} | "
            f"{_fmt(m.alpha)} | {_fmt(m.beta)} | {_fit_peak(m.fit_kl_peak)} | "
            f"{_fmt(m.final_gold)} | {_fmt(m.final_lenient)} | {_fmt(m.final_proxy)} | "
            f"{_fmt(m.final_kl, 2)} | {hacked.get(row, float('nan')):.3f} |")
    out = lines
    for what, title, unit in (("at_proxy", "Gold strict at matched proxy score", "proxy"),
                              ("at_kl", "Gold strict at matched KL", "KL")):
        lv = levels["proxy" if what == "at_proxy" else "kl"]
        if not lv:
            continue
        out += ["", f"**{title}** (each seed's gold where its {unit} first reaches the level, "
                "linear between evaluations):", "",
                "| method | " + " | ".join(f"{unit} {v:.3g}" for v in lv) + " |",
                "|---" * (len(lv) + 1) + "|"]
        for row, m in methods.items():
            vals = getattr(m, what)
            out.append(f"| {LABELS.get(row, row)} | " + " | ".join(_fmt(vals.get(v, []))
                                                                  for v in lv) + " |")
    q_rows = [(row, m) for row, m in methods.items() if m.quality]
    if q_rows:
        keys = sorted({k for _, m in q_rows for k in m.quality})
        out += ["", "**Quality and diversity of the final models** (the evaluation images of all "
                "three suites; docs/study.md, \"Quality and drift\"):", "",
                "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        if base:
            out.append(f"| {BASE} | " + " | ".join(
                f"{base[k]:.3f}" if k in base else "–" for k in keys) + " |")
        for row, m in q_rows:
            out.append(f"| {LABELS.get(row, row)} | " + " | ".join(
                _fmt(m.quality.get(k, [])) for k in keys) + " |")
    return out


def _verdict(methods: dict[str, MethodOveropt]) -> list[str]:
    lines = []
    for row, m in methods.items():
        steps = [ro.steps[ro.peak] for ro in m.runs if ro.overoptimised]
        lines.append(f"- **{LABELS.get(row, row)}** over-optimised in {m.overoptimised} of "
                     f"{len(m.runs)} seeds (smoothed gold fell > {DROP} from its peak while the "
                     f"proxy did not)" + (f"; peaks at steps "
                                          f"{', '.join(str(int(s)) for s in steps)}."
                                          if steps else "."))
    if "stage" in methods and "vanilla_grpo" in methods:
        for what, name in (("peak_gold", "peak gold"), ("kl_at_peak", "KL at the peak"),
                           ("final_gold", "final gold")):
            mean, sd, n = paired_difference(methods["stage"], methods["vanilla_grpo"], what)
            if n:
                moved = n > 1 and abs(mean) > 2 * sd / math.sqrt(n)
                lines.append(f"- STAGE − vanilla GRPO, {name}: {mean:+.3f} ± {sd:.3f} (sd over "
                             f"{n} paired seeds; {'beyond' if moved else 'within'} two standard "
                             f"errors).")
    return lines


def write_overopt_report(summary: StudySummary, docs: str | Path, command: str,
                         prefix: str = DEFAULT_PREFIX) -> list[Path]:
    """docs/<prefix>.md with its figures, and, for the default prefix, the block at the top of
    docs/results.md (a study under another ``--prefix``, e.g. a weaker proxy, leaves it alone)."""
    from stagerl.rewards import build_reward

    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    methods, levels = analyse(summary)
    if not methods:
        return []
    reward_name = summary.runs[0].reward[0]
    proxy_kwargs = _proxy_kwargs(summary, reward_name)
    fig = gold_proxy_figure(methods, docs / f"{prefix}_gold_proxy.png", reward_name)
    grid, hacked = hacked_grid(summary, methods, build_reward(reward_name, **proxy_kwargs),
                               docs / f"{prefix}_hacked.png")
    cfg = summary.config
    head = [f"# Reward over-optimisation: {reward_name} as the proxy, the exact evaluator as gold",
            "", f"Generated by `{command}` from commit `{_git_commit()}` on "
            f"{datetime.date.today().isoformat()}; do not edit by hand. How to read it: "
            "docs/study.md, \"Reward over-optimisation\".", "",
            f"- {len(summary.runs)} runs of {cfg.steps} steps x P={cfg.P} x G={cfg.G}, lr "
            f"{cfg.lr:g}, β {cfg.beta:g} (rows with KL), CFG {cfg.cfg_scale:g}; trained on "
            f"`{reward_name}` only (weights `{proxy_kwargs.get('weights', 'builtin')}`).",
            f"- time: {summary.wall_seconds / 60:.1f} min wall for this invocation "
            f"({summary.reused_runs} of {len(summary.runs)} runs reused), "
            f"{summary.train_seconds / 60:.1f} min of training summed over the runs.", "",
            f"![gold and proxy against sqrt(KL)]({fig.name})", ""]
    body = ["Per method, mean ± sd over seeds. Held-out evaluations every "
            f"{max(1, summary.config.steps // (summary.plan.curve_points + 1))} steps "
            f"({summary.plan.curve_prompts} `{summary.plan.curve_suite}` prompts x "
            f"{summary.plan.curve_images} images); KL = a whole image's KL to the base (sum over "
            "its 64 tokens of k3, mean of the 12 logged training steps around the evaluation). "
            f"Peak, drop and final values use gold smoothed over {SMOOTH} consecutive "
            "evaluations (one evaluation's standard error is about 0.036). The fit is "
            "gold(d) − gold(0) = d(α − β ln d), d = sqrt(KL), per seed; it turns over at "
            "KL = exp(2(α/β − 1)), counted when that lies within the run's KL.", "",
            *_table(methods, levels, hacked, (summary.base or {}).get("quality", {})), "",
            *_verdict(methods), ""]
    if grid is not None:
        body += ["Images the proxy passes and gold fails (final models, in-distribution "
                 "held-out prompts; gold's first reason):", "", f"![proxy passes, gold fails]"
                 f"({grid.name})", ""]
    page = docs / f"{prefix}.md"
    page.write_text("\n".join(head + body))
    paths = [page, fig] + ([grid] if grid else [])
    results = docs / "results.md"
    if results.is_file() and prefix == DEFAULT_PREFIX:  # other conditions keep their own page
        insert_block(results, "\n".join([
            f"## Reward over-optimisation (learned proxy `{reward_name}`, exact gold)", "",
            f"{', '.join(LABELS.get(r, r) for r in methods)} trained on the proxy only (weights "
            f"`{proxy_kwargs.get('weights', 'builtin')}`), {len(summary.runs)} runs of "
            f"{cfg.steps} steps; gold and proxy on the same held-out images.", "",
            f"![gold and proxy against sqrt(KL)]({fig.name})", "",
            *_verdict(methods), "", f"The whole section: [{page.name}]({page.name}); "
            "how to read it: docs/study.md, \"Reward over-optimisation\"."
            + "".join(f" Another proxy: [{p.name}]({p.name})." for p in
                      sorted(docs.glob(f"{prefix}_*.md")))]))
        paths.append(results)
    return paths


def _proxy_kwargs(summary: StudySummary, name: str) -> dict[str, Any]:
    """The proxy's reward.kwargs from the plan's overrides (the first run's config)."""
    from stagerl.config import load_config

    cfg = load_config(None, list(summary.plan.overrides))
    return dict(cfg.reward.kwargs.get(name) or {})


def insert_block(path: Path, block: str) -> None:
    """Put ``block`` between the markers after the page's title line (replacing an old one)."""
    text = path.read_text()
    wrapped = f"{BLOCK_START}\n{block}\n{BLOCK_END}\n"
    if BLOCK_START in text:
        text = re.sub(re.escape(BLOCK_START) + ".*?" + re.escape(BLOCK_END) + "\n?",
                      lambda _: wrapped, text, flags=re.S)
    else:
        lines = text.split("\n")
        at = 1 if lines and lines[0].startswith("# ") else 0
        text = "\n".join(lines[:at] + ["", wrapped.rstrip("\n")] + lines[at:])
    path.write_text(text)

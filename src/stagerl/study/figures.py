"""The study's figures (training curves, reward-KL frontiers, drift curves, the image grid) and
:func:`write_report`, which writes them beside the page :mod:`stagerl.study.report` renders.
"""

from __future__ import annotations

import hashlib

import math
from typing import Any
from pathlib import Path

import numpy as np

from stagerl.data import EVAL_SEED
from stagerl.policies.tiny import resolve_model_path
from stagerl.study.common import (StudyRun, StudySummary, _lr_label, _lr_order, load_policy,
                                  sweep_runs)
from stagerl.study.report import LABELS, REWARD_CONDITIONS, render_markdown


def _reward_key(rows: list[dict]) -> str | None:
    keys = {k for r in rows for k in r if k.startswith("reward/") and k.endswith("/mean")}
    keys.discard("reward/total/mean")
    return sorted(keys)[0] if keys else None


def _curves(run_dirs: list[str], key: str | None, smooth: int) -> tuple[np.ndarray, np.ndarray,
                                                                        np.ndarray] | None:
    """Mean and std over runs of a metric's series (steps where every run logged it)."""
    from stagerl.tracking import read_metrics

    per_run = []
    for d in run_dirs:
        rows = read_metrics(d)
        k = key if key != "@reward" else _reward_key(rows)
        pts = {r["step"]: float(r[k]) for r in rows if k and r.get(k) is not None}
        if not pts:
            return None
        per_run.append(pts)
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    if not steps:
        return None
    vals = np.array([[p[s] for s in steps] for p in per_run])  # [runs, steps]
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        vals = np.array([np.convolve(np.pad(v, (smooth - 1, 0), mode="edge"), kernel, "valid")
                         for v in vals])
    return np.array(steps), vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else 0 * vals[0]


PLOTS = [("reward", "Training reward (raw column, smoothed)", [("@reward", "")], True),
         ("heldout", "Held-out strict score during training", [("eval/overall", "")], False),
         ("entropy", "Entropy: policy (solid) vs reference (dashed)",
          [("policy/entropy", "-"), ("ref/entropy", "--")], True),
         ("kl", "KL to the reference (k3, per token)", [("policy/kl_k3", "")], True)]


def _figure(size: tuple[float, float]) -> Any:
    """A new (figure, axes) on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=110)


def _save(fig: Any, ax: Any, path: Path, **legend: Any) -> None:
    """Grid, legend (when something is labelled), tight layout; write ``path``; free the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(summary: StudySummary, docs: Path, prefix: str = "results") -> dict[str, str]:
    """One PNG per curve, one line per row (main study only). Returns {title: file name}."""
    dirs: dict[str, list[str]] = {}
    for r in summary.runs:
        if r.condition is None and r.at_plan_lr_and_steps:
            dirs.setdefault(r.row, []).append(r.run_dir)
    steps = summary.config.steps
    written = {}
    for name, title, keys, smooth in PLOTS:
        fig, ax = _figure((6.4, 3.8))
        for i, (row, run_dirs) in enumerate(dirs.items()):
            color = f"C{i}"
            for key, style in keys:
                c = _curves(run_dirs, key, max(1, steps // 10) if smooth else 1)
                if c is None:
                    continue
                x, m, s = c
                ax.plot(x, m, style or "-", color=color, marker="o" if len(x) < 12 else None,
                        ms=3, label=LABELS.get(row, row) if style in ("", "-") else None)
                ax.fill_between(x, m - s, m + s, color=color, alpha=0.12)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        fname = f"{prefix}_{name}.png"
        _save(fig, ax, docs / fname, fontsize=7)
        written[title] = fname
    return written


def write_frontiers(summary: StudySummary, docs: Path, prefix: str = "results") -> dict[str, str]:
    """One reward-KL frontier PNG per swept setting: every in-training evaluation of every run as a
    faint point, the mean over seeds per (method, lr) as a line. Returns {"frontier:<setting>":
    file name}."""
    written = {}
    # The base model's in-training evaluation (step 0, the same for every run): the same prompts
    # and images per prompt as every point of the plot.
    firsts = [p.heldout for r in summary.runs for p in r.curve if p.step == 0]
    base_score = float(np.mean(firsts)) if firsts else None
    styles = ["-", "--", ":", "-."]
    for setting, by_row in sweep_runs(summary).items():
        fig, ax = _figure((6.8, 4.2))
        for i, (row, by_lr) in enumerate(by_row.items()):
            color = f"C{i}"
            for j, m in enumerate(sorted(by_lr, key=_lr_order)):
                runs = by_lr[m]
                for r in runs:
                    pts = [(p.kl, p.heldout) for p in r.curve if p.kl > 0]
                    if pts:
                        ax.scatter(*zip(*pts), s=6, color=color, alpha=0.25, lw=0)
                steps = sorted(set.intersection(*({p.step for p in r.curve} for r in runs)))
                mean = [(np.mean([p.kl for r in runs for p in r.curve if p.step == st]),
                         np.mean([p.heldout for r in runs for p in r.curve if p.step == st]))
                        for st in steps if st > 0]
                mean = [(x, y) for x, y in mean if x > 0 and math.isfinite(x)]
                if mean:
                    long = isinstance(m, str)
                    ax.plot(*zip(*mean), "-" if long else styles[j % len(styles)], color=color,
                            marker="s" if long else "o", ms=3, lw=2.4 if long else 1.2,
                            label=f"{LABELS.get(row, row)}, lr {_lr_label(m)}")
        if base_score is not None:
            ax.axhline(base_score, color="gray", lw=0.8, ls="--", label="base model (step 0)")
        ax.set_xscale("log")
        ax.set_xlabel("training KL to the base (k3 / token, log scale)")
        ax.set_ylabel(f"held-out strict ({summary.plan.curve_suite})")
        name = "main setting" if setting is None else setting
        ax.set_title(f"Reward-KL frontier, {name}: in-training evaluations", fontsize=10)
        fname = f"{prefix}_frontier{'' if setting is None else '_' + setting}.png"
        _save(fig, ax, docs / fname, fontsize=6, ncol=2)
        written[f"frontier:{setting}"] = fname
    return written


def write_drift_curves(summary: StudySummary, docs: Path,
                       prefix: str = "results") -> dict[str, str]:
    """Per reward condition: the in-training held-out score under the strict rule (solid) and the
    lenient rule (dashed), mean over seeds per method. Returns {"drift:<condition>": file name}."""
    written = {}
    for cond in [c for c in summary.plan.conditions if c in REWARD_CONDITIONS]:
        by_row: dict[str, list[StudyRun]] = {}
        for r in summary.runs:
            if r.condition == cond and r.at_plan_lr_and_steps and r.curve:
                by_row.setdefault(r.row, []).append(r)
        if not by_row:
            continue
        fig, ax = _figure((6.4, 3.8))
        for i, (row, runs) in enumerate(by_row.items()):
            steps = sorted(set.intersection(*({p.step for p in r.curve} for r in runs)))
            for rule, style in (("strict", "-"), ("lenient", "--")):
                vals = np.array([[next(p.heldout if rule == "strict" else p.heldout_lenient
                                       for p in r.curve if p.step == st)
                                  for st in steps] for r in runs])
                ax.plot(steps, vals.mean(0), style, color=f"C{i}", marker="o", ms=3,
                        label=f"{LABELS.get(row, row)}, {rule}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out score ({summary.plan.curve_suite})")
        ax.set_title(f"Trained on `{cond}`: held-out strict (solid) and lenient (dashed)",
                     fontsize=10)
        fname = f"{prefix}_drift_{cond}.png"
        _save(fig, ax, docs / fname, fontsize=6, ncol=2)
        written[f"drift:{cond}"] = fname
    return written


def write_grid(summary: StudySummary, docs: Path, out: Path, prefix: str = "results") -> str | None:
    """Base / vanilla GRPO / STAGE (first seed) on the same prompts and sampling seeds."""
    from PIL import Image, ImageDraw, ImageFont

    from stagerl.eval import generate_images, shapes_items
    from stagerl.policies.base import SamplingParams

    plan = summary.plan
    seed0 = plan.seeds[0]
    models = [("base model", plan.model)]
    for r in summary.runs:
        if r.condition is None and r.at_plan_lr_and_steps and r.seed == seed0 \
                and r.row in ("vanilla_grpo", "stage"):
            models.append((f"{LABELS[r.row]} (seed {seed0})", str(Path(r.run_dir) / "final")))
    if len(models) < 2:
        return None
    half = max(1, plan.grid_prompts // 2)
    items = shapes_items("test", half, EVAL_SEED + 7) + shapes_items("compositions", half,
                                                                     EVAL_SEED + 7)
    k, scale, pad, head, left = plan.grid_images, 3, 4, 44, 120
    params = SamplingParams(cfg_scale=summary.config.cfg_scale)
    rows = [generate_images(load_policy(path), items, k, params, EVAL_SEED + 7,
                            out / "grid" / _weights_tag(path)) for _, path in models]
    cell = rows[0][0][0].width * scale
    width = left + len(items) * (k * cell + pad)
    canvas = Image.new("RGB", (width, head + len(models) * (cell + pad)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    import textwrap

    for j, it in enumerate(items):
        x = left + j * (k * cell + pad)
        suite = "test" if j < half else "compositions"
        text = "\n".join(textwrap.wrap(f"[{suite}] {it.prompt}", max(10, k * cell // 6))[:3])
        draw.text((x + 2, 2), text, fill="black", font=font)
    for i, ((label, _), per_prompt) in enumerate(zip(models, rows)):
        y = head + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), "\n".join(textwrap.wrap(label, 18)), fill="black",
                  font=font)
        for j, imgs in enumerate(per_prompt):
            for n, img in enumerate(imgs):
                x = left + j * (k * cell + pad) + n * cell
                canvas.paste(img.resize((cell, cell), Image.NEAREST), (x, y))
    fname = f"{prefix}_grid.png"
    canvas.save(docs / fname)
    return fname


def _weights_tag(path: str) -> str:
    """A cache folder name that changes when the model's weights do, so that a retrained run
    never shows the images of the run it replaced."""
    folder = resolve_model_path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return "".join(ch if ch.isalnum() else "_" for ch in path)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return f"weights-{digest.hexdigest()[:16]}"


def _overopt_block(md: Path) -> str | None:
    """The block ``stagerl study --proxy`` put into an existing page, without its markers."""
    from stagerl.study.overopt_report import BLOCK_END, BLOCK_START

    text = md.read_text() if md.is_file() else ""
    if BLOCK_START not in text or BLOCK_END not in text:
        return None
    return text.split(BLOCK_START, 1)[1].split(BLOCK_END, 1)[0].strip("\n")


def write_report(summary: StudySummary, docs: str | Path, out: str | Path, command: str,
                 prefix: str = "results") -> list[Path]:
    """docs/<prefix>.md + docs/<prefix>_*.png from a study summary. Returns the written paths."""
    docs, out = Path(docs), Path(out)
    docs.mkdir(parents=True, exist_ok=True)
    figures = {title: fname for title, fname in write_plots(summary, docs, prefix).items()}
    frontiers = {**write_frontiers(summary, docs, prefix),
                 **write_drift_curves(summary, docs, prefix)}
    grid = write_grid(summary, docs, out, prefix)
    text = render_markdown(summary, command, figures, frontiers)
    if grid:
        text += ("\n## Image grid\n\nSame prompts (three in-distribution, three held-out "
                 "compositions) and sampling seeds for every model; columns are "
                 f"{summary.plan.grid_images} samples per prompt.\n\n![grid]({grid})\n")
    md = docs / f"{prefix}.md"
    kept = _overopt_block(md)
    md.write_text(text)
    if kept:  # the over-optimisation study's block stays at the top of the page it was put on
        from stagerl.study.overopt_report import insert_block

        insert_block(md, kept)
    return [md] + [docs / f for f in [*figures.values(), *frontiers.values()]] + \
        ([docs / grid] if grid else [])

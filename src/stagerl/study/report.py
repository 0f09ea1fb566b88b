"""docs/results.md, plots and the image grid of a ``stagerl study`` summary (docs/study.md).

Everything here is generated from ``OUT/summary.json`` and the run folders; no number is typed in by
hand. Rows are compared over seeds by :mod:`stagerl.study.stats` (a difference is *clear* when it
exceeds 2 se; with 3 seeds a rough screen, not a significance test; the text says which it is).
"""

from __future__ import annotations

import datetime
import subprocess
from typing import Any

import numpy as np

from stagerl.eval import SHAPES_SUITES, markdown_table
from stagerl.study.common import (CONDITIONS, ByLr, LrKey, StudySummary, _lr_label, _lr_order,
                                  frontier_levels, matched_kl, sweep_runs)
from stagerl.study.stats import Comparison, compare, digits, fmt

LABELS = {"base": "base model", "vanilla_grpo": "vanilla GRPO", "plus_ent": "+Ent",
          "stage": "STAGE", "wo_kl": "w/o KL", "wo_ent_kl": "w/o Ent & KL", "gcpo": "GCPO",
          "dr_grpo": "Dr. GRPO"}
# Peer methods beside the paper's table (docs/algorithm.md §10-11): each is compared with vanilla
# GRPO like STAGE is: in the findings, the drift setting and the sweep (docs/study.md, "Peer
# methods").
PEERS = ("gcpo", "dr_grpo")
SUITE_TITLES = {"test": "In-distribution (held-out prompts of the training distribution, `test`)",
                "compositions": "Held-out compositions (`compositions`)",
                "phrasings": "Held-out phrasings (`phrasings`)"}
# (key, label, higher is better?)
QUALITY = [("fragments_per_image", "fragments / image", False),
           ("speckle_px_per_image", "speckle px / image", False),
           ("clean_pixel_frac", "clean pixel frac", True),
           ("empty_image_frac", "empty images", False),
           ("code_jsd", "code JSD to pretraining (bits)", False),
           ("codes_used_frac", "codebook used", None),
           ("kl_k3", "KL to base (k3 / token)", False),
           ("entropy", "entropy (nats / token)", None),
           ("entropy_gap", "|entropy - base entropy|", False)]
# Within-prompt diversity: shown when the evaluation has it (>= 2 images per prompt; evaluations
# stored before it was measured do not).
DIVERSITY = [("diversity_code_distance", "within-prompt code distance", None),
             ("diversity_distinct_frac", "within-prompt distinct images", None)]
HEADLINE = [("test/strict/overall", "in-distribution strict", True),
            ("compositions/strict/overall", "held-out compositions strict", True),
            ("phrasings/strict/overall", "held-out phrasings strict", True),
            ("test/partial", "in-distribution partial credit", True),
            ("quality/clean_pixel_frac", "clean pixel fraction", True),
            ("quality/fragments_per_image", "fragments per image", False),
            ("quality/code_jsd", "code JSD to pretraining", False),
            ("quality/kl_k3", "KL to base", False),
            ("quality/entropy_gap", "entropy gap to base", False)]


# --------------------------------------------------------------------------------------------------
# Numbers


def flat_metrics(ev: dict[str, Any]) -> dict[str, float]:
    """One evaluation -> {"suite/strict/tag": v, "suite/partial": v, "quality/key": v, ...}."""
    out: dict[str, float] = {}
    for suite, res in ev["suites"].items():
        for kind in ("strict", "lenient"):
            for tag, v in res[kind].items():
                out[f"{suite}/{kind}/{tag}"] = float(v)
        out[f"{suite}/partial"] = float(res["partial"])
    q = ev["quality"]
    for k, v in q.items():
        out[f"quality/{k}"] = float(v)
    if "entropy" in q and "base_entropy" in q:
        out["quality/entropy_gap"] = abs(q["entropy"] - q["base_entropy"])
    return out


Groups = dict[tuple[str, str | None], list[dict[str, float]]]


def group_runs(summary: StudySummary) -> Groups:
    """(row, condition) -> per-seed flat metrics, at the plan's learning rate (no sweep runs)."""
    groups: Groups = {}
    for r in summary.runs:
        if r.at_plan_lr_and_steps:
            groups.setdefault((r.row, r.condition), []).append(flat_metrics(r.eval))
    return groups


def _with_main(groups: Groups, row: str, cond: str | None) -> list[dict[str, float]] | None:
    """A row's runs in a condition; a condition that does not retrain the row (it cannot change
    it, see study.CONDITIONS "rows") falls back on the main runs."""
    if (row, cond) in groups:
        return groups[(row, cond)]
    if cond is not None and row not in CONDITIONS[cond].get("rows", [row]):
        return groups.get((row, None))
    return None


# --------------------------------------------------------------------------------------------------
# Markdown


def _table_rows(summary: StudySummary, groups: Groups, keys: list[tuple[str, str]],
                condition: str | None = None) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    if condition is None:
        base = flat_metrics(summary.base)
        rows[LABELS["base"]] = {lab: fmt([base.get(k, float("nan"))]) for k, lab in keys}
    for (row, cond), runs in groups.items():
        if cond != condition:
            continue
        rows[LABELS.get(row, row)] = {lab: fmt([r.get(k, float("nan")) for r in runs])
                                      for k, lab in keys}
    return rows


def suite_tables(summary: StudySummary, groups: Groups) -> list[str]:
    out = []
    for suite in SHAPES_SUITES:
        tags = list(summary.base["suites"][suite]["strict"])
        keys = [(f"{suite}/strict/{t}", t) for t in tags]
        keys += [(f"{suite}/lenient/overall", "lenient overall"), (f"{suite}/partial", "partial")]
        res = summary.base["suites"][suite]
        title = (f"{SUITE_TITLES[suite]}: strict accuracy per tag, {res['prompts']} prompts x "
                 f"{res['images_per_prompt']} images")
        out.append(f"### {SUITE_TITLES[suite]}\n\n" +
                   markdown_table(_table_rows(summary, groups, keys), title))
    return out


def quality_table(summary: StudySummary, groups: Groups) -> str:
    keys = [(f"quality/{k}", lab) for k, lab, _ in QUALITY]
    keys += [(f"quality/{k}", lab) for k, lab, _ in DIVERSITY if k in summary.base["quality"]]
    floor = summary.base["quality"].get("code_jsd_floor", float("nan"))
    return ("### Quality and drift (all three suites' images pooled)\n\n"
            + markdown_table(_table_rows(summary, groups, keys),
                             "Measures the reward does not see (src/stagerl/quality.py)")
            + f"\nCode-JSD floor (ground-truth renders of as many `test` prompts vs the "
              f"pretraining histogram; what a perfect model would score at this sample size): "
              f"{floor:.4f} bits.\n")


def _sentence(label: str, c: Comparison, a_name: str, b_name: str) -> str:
    k = max(digits(c.a), digits(c.b), digits(c.d))
    diff = (f"{c.a:.{k}f} vs {c.b:.{k}f} (difference {c.d:+.{k}f}, "
            f"2 se = {2 * c.se:.{k}f}; " + (f"{c.na} vs {c.nb} seeds)" if c.nb > 1
                                            else f"{c.na} seeds vs one evaluation)"))
    if c.word in ("better", "worse"):
        return f"- **{label}**: {a_name} is {c.word} than {b_name}: {diff}."
    return f"- **{label}**: no clear difference between {a_name} and {b_name}: {diff}."


def findings(summary: StudySummary, groups: Groups) -> list[str]:
    """The paper's claims checked one by one, with numbers (read in docs/study.md)."""
    base = flat_metrics(summary.base)
    lines = []
    grpo, stage = groups.get(("vanilla_grpo", None)), groups.get(("stage", None))
    if grpo:
        lines.append("**Claim 1: vanilla GRPO gains in-distribution but drifts.** Vanilla GRPO vs "
                     "the base model:")
        for key, label, hb in HEADLINE:
            c = compare([r.get(key, float("nan")) for r in grpo], [base.get(key, float("nan"))], hb)
            lines.append(_sentence(label, c, "vanilla GRPO", "the base model"))
        lines.append("")
    if grpo and stage:
        lines.append("**Claim 2: STAGE keeps the gain and holds out-of-distribution scores, "
                     "quality, entropy and KL.** STAGE vs vanilla GRPO:")
        for key, label, hb in HEADLINE:
            c = compare([r.get(key, float("nan")) for r in stage],
                        [r.get(key, float("nan")) for r in grpo], hb)
            lines.append(_sentence(label, c, "STAGE", "vanilla GRPO"))
        lines.append("")
    for row in PEERS:
        peer = groups.get((row, None))
        if grpo and peer:
            lines.append(f"**Peer method: {LABELS[row]} vs vanilla GRPO** (same budget, lr and "
                         f"steps; docs/study.md, \"Peer methods\"):")
            for key, label, hb in HEADLINE:
                c = compare([r.get(key, float("nan")) for r in peer],
                            [r.get(key, float("nan")) for r in grpo], hb)
                lines.append(_sentence(label, c, LABELS[row], "vanilla GRPO"))
            lines.append("")
    return lines


def curve_matched_kl_section(summary: StudySummary) -> list[str]:
    """Where the peer methods stand at matched KL along the main runs' training curves (lr x1
    only): the held-out score of each in-training evaluation where the training KL first reaches
    each level (the frontier's levels and interpolation, common.matched_kl)."""
    rows = [r for r in ("vanilla_grpo", "stage", *PEERS) if r in summary.plan.rows]
    if not any(r in PEERS for r in rows) or "vanilla_grpo" not in rows:
        return []
    by_row: dict[str, ByLr] = {}
    for r in summary.runs:
        if r.condition is None and r.at_plan_lr_and_steps and r.row in rows:
            by_row.setdefault(r.row, {}).setdefault(1.0, []).append(r)
    plan = summary.plan
    levels = frontier_levels(by_row) if len(by_row) == len(rows) else []
    if not levels:
        return []
    table: dict[str, dict[str, str]] = {}
    for k in levels:
        got = matched_kl(by_row, k)
        cells = {LABELS[row]: fmt(got[row][1]) if row in got else "n/a" for row in rows}
        for row in rows[1:]:
            if row in got and "vanilla_grpo" in got:
                cells[f"{LABELS[row]} − vanilla"] = _diff_cell(got[row][1],
                                                              got["vanilla_grpo"][1], True)
        table[f"KL {k:.4f}"] = cells
    return ["## Peer methods at matched KL (main runs' training curves)", "",
            f"The held-out strict score of the in-training evaluations ({plan.curve_prompts} "
            f"`{plan.curve_suite}` prompts x {plan.curve_images} images) where each run's training "
            f"KL to the base model first reaches a level, interpolated between evaluations; the "
            f"levels are fractions of the smallest KL every method's seeds all reach. These are "
            f"the main runs at lr x1 only: no learning-rate sweep, so this is a slice of each "
            f"method's reward-KL frontier, not the frontier (docs/study.md, \"Peer methods\").",
            "", markdown_table(table, "Held-out strict score at matched KL, lr x1 (mean ± std "
                                      "over seeds; differences ± 2 se)"), ""]


def _diff_cell(a: list[float], b: list[float], hb: bool | None) -> str:
    c = compare(a, b, hb)
    mark = f" ({c.word})" if c.clear else ""
    k = digits(c.d)
    return f"{c.d:+.{k}f} ± {2 * c.se:.{k}f}{mark}"


def conditions_section(summary: StudySummary, groups: Groups) -> list[str]:
    conds = [c for c in summary.plan.conditions if c not in REWARD_CONDITIONS]
    if not conds:
        return []
    lines = ["## Conditions: when does a difference appear?", "",
             "Each condition retrains the compared rows with one change; the table shows STAGE "
             "minus vanilla GRPO (mean over seeds, ± 2 se). A condition that cannot change "
             "vanilla GRPO (w = 1 makes every loss aggregation the token mean, "
             "docs/algorithm.md §5) retrains STAGE only and is compared with the main vanilla "
             "runs.", ""]
    rows: dict[str, dict[str, str]] = {}
    for cond in [None, *conds]:
        g, s = _with_main(groups, "vanilla_grpo", cond), _with_main(groups, "stage", cond)
        if not g or not s:
            continue
        name = "main study" if cond is None else f"{cond}: {CONDITIONS[cond]['help']}"
        rows[name] = {label: _diff_cell(_vals(s, key), _vals(g, key), hb)
                      for key, label, hb in HEADLINE}
    lines.append(markdown_table(rows, "STAGE − vanilla GRPO per condition"))
    for cond in conds:
        keys2 = [(k, lab) for k, lab, _ in HEADLINE]
        lines.append(f"\n**{cond}** ({CONDITIONS[cond]['help']}): absolute values\n")
        lines.append(markdown_table(_table_rows(summary, groups, keys2, condition=cond)))
    return lines


def _vals(runs: list[dict[str, float]], key: str) -> list[float]:
    return [r.get(key, float("nan")) for r in runs]


# --------------------------------------------------------------------------------------------------
# The drift setting: trained on a reward the world can game, evaluated strictly


REWARD_CONDITIONS = ("lenient", "lenient_long", "partial")
DRIFT = [("test/strict/overall", "in-distribution strict", True),
         ("test/lenient/overall", "in-distribution lenient (trained)", True),
         ("test/partial", "in-distribution partial credit", True),
         ("compositions/strict/overall", "held-out compositions strict", True),
         ("phrasings/strict/overall", "held-out phrasings strict", True),
         ("quality/clean_pixel_frac", "clean pixel fraction", True),
         ("quality/fragments_per_image", "fragments per image", False),
         ("quality/speckle_px_per_image", "speckle px per image", False),
         ("quality/code_jsd", "code JSD to pretraining", False),
         ("quality/kl_k3", "KL to base", False),
         ("quality/entropy_gap", "entropy gap to base", False)]


def drift_section(summary: StudySummary, groups: Groups, figures: dict[str, str]) -> list[str]:
    """For each reward condition: absolute values, the drift of vanilla GRPO (vs the base model and
    vs vanilla GRPO trained on the strict reward) and each method against vanilla GRPO."""
    conds = [c for c in summary.plan.conditions if c in REWARD_CONDITIONS]
    lines: list[str] = []
    base = flat_metrics(summary.base)
    for cond in conds:
        van = groups.get(("vanilla_grpo", cond))
        if not van:
            continue
        lines += [f"## Drift setting `{cond}`: {CONDITIONS[cond]['help']}", "",
                  "Trained on this reward, evaluated with the strict rule and every quality "
                  "measure (docs/study.md, \"The drift setting\").", ""]
        if f"drift:{cond}" in figures:
            lines += [f"![held-out strict and lenient scores during training, `{cond}`]"
                      f"({figures[f'drift:{cond}']})", ""]
        keys = [(k, lab) for k, lab, _ in DRIFT]
        rows = {LABELS["base"]: {lab: fmt([base.get(k, float("nan"))]) for k, lab in keys}}
        main_van = groups.get(("vanilla_grpo", None))
        steps = summary.plan.steps
        if main_van:
            rows[f"vanilla GRPO, strict reward (main, {steps} steps)"] = {
                lab: fmt(_vals(main_van, k)) for k, lab in keys}
        # A longer run of another reward condition: that condition's vanilla GRPO as well, so
        # the table shows what the extra steps did.
        shorter = CONDITIONS[cond].get("longer_of")
        short_van = groups.get(("vanilla_grpo", shorter)) if shorter else None
        if short_van:
            rows[f"vanilla GRPO, `{shorter}` ({steps} steps)"] = {
                lab: fmt(_vals(short_van, k)) for k, lab in keys}
        rows.update(_table_rows(summary, groups, keys, condition=cond))
        lines.append(markdown_table(rows, f"Absolute values, trained on `{cond}`"))
        diffs: dict[str, dict[str, str]] = {
            "vanilla GRPO − base model": {lab: _diff_cell(_vals(van, k), [base.get(k)], hb)
                                          for k, lab, hb in DRIFT}}
        if main_van:
            diffs[f"vanilla GRPO: {cond} − strict reward"] = {
                lab: _diff_cell(_vals(van, k), _vals(main_van, k), hb) for k, lab, hb in DRIFT}
        if short_van:
            diffs[f"vanilla GRPO: {cond} − `{shorter}`"] = {
                lab: _diff_cell(_vals(van, k), _vals(short_van, k), hb) for k, lab, hb in DRIFT}
        for row in ("plus_ent", "stage", *PEERS):
            other = groups.get((row, cond))
            if other:
                diffs[f"{LABELS[row]} − vanilla GRPO"] = {
                    lab: _diff_cell(_vals(other, k), _vals(van, k), hb) for k, lab, hb in DRIFT}
        lines.append("")
        lines.append(markdown_table(diffs, f"Differences (mean ± 2 se), trained on `{cond}`; "
                                           f"(better)/(worse) only beyond 2 se"))
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------------------
# The learning-rate sweep and the reward-KL frontier


def best_lr(by_lr: ByLr, key: str) -> LrKey:
    """The lr multiple with the highest mean final ``key`` over seeds."""
    return max((m for m in by_lr if not isinstance(m, str)),
               key=lambda m: np.mean([flat_metrics(r.eval).get(key, -1.0) for r in by_lr[m]]))


def sweep_section(summary: StudySummary, figures: dict[str, str]) -> list[str]:
    sweeps = sweep_runs(summary)
    if not sweeps:
        return []
    plan, cfg = summary.plan, summary.config
    curve_key = f"{plan.curve_suite}/strict/overall"
    sweep_steps = plan.sweep_steps or cfg.steps
    n_seeds = max(len(runs) for by_row in sweeps.values() for by_lr in by_row.values()
                  for runs in by_lr.values())
    which = ("the x1 runs are the main runs" if sweep_steps == cfg.steps else
             "shorter than the main runs, so the x1 runs are separate runs")
    lines = ["## Learning-rate sweep and the reward-KL frontier", "",
             f"Vanilla GRPO, +Ent and STAGE, {sweep_steps} steps per run ({which}), "
             f"at {n_seeds} seeds x "
             f"learning rates {', '.join(f'{m:g}' for m in sorted({1.0, *plan.lr_sweep}))} x "
             f"{cfg.lr:g}. The frontier plots, for every run, the held-out strict score of each "
             f"in-training evaluation ({plan.curve_prompts} `{plan.curve_suite}` prompts x "
             f"{plan.curve_images} images) against the training KL to the base model at that "
             f"step (docs/study.md, \"The reward-KL frontier\"). \"Best lr\" is the one with the "
             f"highest mean final `{plan.curve_suite}` strict score (full evaluation); picking "
             f"it on the evaluation it is judged on favours every method equally.", ""]
    keys = [(k, lab) for k, lab, _ in HEADLINE]
    for setting, by_row in sweeps.items():
        name = "main setting (strict reward)" if setting is None else f"`{setting}`"
        lines += [f"### Sweep in the {name}", ""]
        fig = figures.get(f"frontier:{setting}")
        if fig:
            lines += [f"![reward-KL frontier, {name}]({fig})", ""]
        rows: dict[str, dict[str, str]] = {}
        for row, by_lr in by_row.items():
            for m in sorted(by_lr, key=_lr_order):
                rows[f"{LABELS[row]}, lr {_lr_label(m)}"] = {
                    lab: fmt([flat_metrics(r.eval).get(k, float("nan")) for r in by_lr[m]])
                    for k, lab in keys}
        lines.append(markdown_table(rows, f"Final evaluations per learning rate, {name}"))
        best = {row: best_lr(by_lr, curve_key) for row, by_lr in by_row.items()}
        at_best = {row: [flat_metrics(r.eval) for r in by_row[row][m]]
                   for row, m in best.items()}
        if "vanilla_grpo" in at_best:
            diffs = {}
            for row in ("plus_ent", "stage", *PEERS):
                if row in at_best:
                    diffs[f"{LABELS[row]} (lr x{best[row]:g}) − vanilla GRPO (lr "
                          f"x{best['vanilla_grpo']:g})"] = {
                        lab: _diff_cell(_vals(at_best[row], k), _vals(at_best["vanilla_grpo"], k),
                                        hb) for k, lab, hb in HEADLINE}
            lines += ["", markdown_table(diffs, f"Each method at its best learning rate, {name} "
                                                f"(mean ± 2 se)")]
        levels = frontier_levels(by_row)
        if levels:
            table: dict[str, dict[str, str]] = {}
            for k in levels:
                got = matched_kl(by_row, k)
                cells = {}
                for row in by_row:
                    if row in got:
                        m, vals = got[row]
                        cells[LABELS[row]] = f"{fmt(vals)} (lr {_lr_label(m)})"
                    else:
                        cells[LABELS[row]] = "n/a"
                for row in ("plus_ent", "stage", *PEERS):
                    if row in got and "vanilla_grpo" in got:
                        cells[f"{LABELS[row]} − vanilla"] = _diff_cell(got[row][1],
                                                                      got["vanilla_grpo"][1], True)
                table[f"KL {k:.4f}"] = cells
            lines += ["", markdown_table(
                table, f"Held-out strict score at matched KL, {name}: per method the learning "
                       f"rate with the highest mean there (mean ± std over seeds; differences "
                       f"± 2 se)")]
        lines.append("")
    return lines


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _timing(summary: StudySummary) -> str:
    """Wall time of the invocation that wrote the report, and the training time of the runs (summed
    over runs, measured when each was trained, so it stays true for reused runs)."""
    n, reused = len(summary.runs), summary.reused_runs
    text = (f"- time: training summed over the {n} runs {summary.train_seconds / 60:.1f} min; "
            f"the invocation that wrote this page took {summary.wall_seconds / 60:.1f} min wall")
    if reused:
        text += (f" and reused {reused} of {n} runs (and their cached evaluations) from an "
                 f"earlier invocation")
    return text + ("; the 2 CPU cores were shared with other jobs, so times are upper bounds.")


def render_markdown(summary: StudySummary, command: str, figures: dict[str, str],
                    frontiers: dict[str, str] | None = None) -> str:
    groups = group_runs(summary)
    plan, cfg = summary.plan, summary.config
    samples = cfg.steps * cfg.P * cfg.G
    quick = "--quick" in command
    lines = [f"# STAGE vs GRPO on the shapes world{' (quick variant)' if quick else ''}", "",
             f"Generated by `{command}` from commit `{_git_commit()}` on "
             f"{datetime.date.today().isoformat()}; do not edit by hand (docs/study.md explains "
             f"every suite and measure, and how to rerun).", ""]
    if quick:
        lines += ["> This is the **quick** variant: short runs and small evaluations. Its numbers "
                  "are noisier and its runs shorter than the full study's.", ""]
    lines += ["## Setup", "",
              f"- rows: {', '.join(LABELS.get(r, r) for r in plan.rows)}; seeds "
              f"{plan.seeds} each; base model `{plan.model}`.",
              f"- equal sample budget: {cfg.steps} steps x P={cfg.P} prompts x G={cfg.G} "
              f"samples = {samples} samples per run; lr {cfg.lr:g}, beta {cfg.beta:g} (rows "
              f"with KL), CFG {cfg.cfg_scale:g}; extra overrides: "
              f"{plan.overrides or 'none'}.",
              f"- evaluation: {plan.eval_prompts} prompts x {plan.eval_images} images per "
              f"suite, the same prompts and sampling seeds for every model; during training, "
              f"{plan.curve_prompts} `{plan.curve_suite}` prompts x {plan.curve_images} "
              f"images every {max(1, cfg.steps // (plan.curve_points + 1))} steps.",
              _timing(summary),
              "",
              "Tables show mean ± sample std over seeds (the base model is one deterministic "
              "model: no std). Strict = GenEval's rules plus no unrequested objects and no "
              "fragments (the training reward); overall = mean of the per-tag accuracies.", "",
              "## Findings (generated from the numbers below)", "",
              "A difference is called better/worse only when it exceeds twice its standard error "
              "over seeds; otherwise it is reported as within seed noise. The base model is one "
              "evaluation (same prompts and sampling seeds as every other model); its own sampling "
              "noise is not in the se, so comparisons with it are the less certain ones.", ""]
    lines += findings(summary, groups)
    lines += ["## Results per suite", ""] + suite_tables(summary, groups)
    lines += [quality_table(summary, groups), "## Training curves", ""]
    for name, path in figures.items():
        lines += [f"![{name}]({path})", ""]
    lines += ["Curves are means over seeds with a ± 1 std band; the reward is the raw reward "
              "column (without the entropy bonus), smoothed with a moving average. Rows without "
              "a reference model (w/o Ent & KL) log no KL or reference entropy during training; "
              "their final KL is in the quality table.", ""]
    lines += curve_matched_kl_section(summary)
    lines += drift_section(summary, groups, frontiers or {})
    lines += sweep_section(summary, frontiers or {})
    lines += conditions_section(summary, groups)
    return "\n".join(lines) + "\n"

"""``stagerl study``'s options (one typed dataclass, given as flags, an options YAML file and
``key=value`` overrides like every command's) and their checks: the plan from the options, then the
study and its report (:mod:`stagerl.study.run`, :mod:`stagerl.study.figures`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from stagerl.cli_eval import config_dirs
from stagerl.cli_options import add_option_flags, field_default, flag, options_from_args
from stagerl.config import FieldError, load_config
from stagerl.config_schema import _f
from stagerl.errors import UserError
from stagerl.study.run import plan_jobs, run_study
from stagerl.study.common import COMPARE_ROWS, CONDITIONS, MAIN, ROWS, StudyPlan, StudySummary
from stagerl.study.figures import write_report


@dataclass
class StudyOptions:
    """``stagerl study``'s options (docs/study.md): what to train, how to compare, where to write."""

    quick: bool = _f(False, "Short variant (<= 10 min on 2 cores): 12 steps, P=4, small evals.")
    seeds: int = _f(3, "Seeds per row.", min=1)
    out: str = _f("runs/study", "Runs and evaluations go here.")
    docs: str = _f("docs", "results.md and its figures go here.")
    prefix: str = _f("results", "File names in docs: <prefix>.md and <prefix>_*.png.")
    rows: list[str] = _f(list(ROWS), "Ablation rows to train (docs/study.md).")
    steps: Optional[int] = _f(None, "Training steps of every run (default: 80; 12 with quick).",
                              min=1)
    model: str = _f("builtin:shapes", "Base model directory.")
    configs: str = _f("configs/ablations", "Folder with one <row>.yaml per ablation row.")
    eval_prompts: Optional[int] = _f(None, "Prompts per suite (default: 96; 48 with quick).", min=1)
    eval_images: Optional[int] = _f(None, "Images per prompt (default: 4; 2 with quick).", min=1)
    conditions: list[str] = _f([], f"Extra settings ({', '.join(CONDITIONS)}) or all; each "
                               f"retrains the compare_rows once more per seed.", empty_ok=True)
    condition_seeds: Optional[int] = _f(None, "Seeds per condition run, at most seeds "
                                        "(default: seeds).", min=1)
    compare_rows: list[str] = _f(list(COMPARE_ROWS), "Rows the conditions and the lr sweep "
                                 "retrain.")
    lr_sweep: list[float] = _f([], "Learning-rate multiples besides 1, e.g. 0.5 2 4: each retrains "
                               "the compare_rows in every sweep_in setting.", empty_ok=True)
    sweep_in: list[str] = _f([MAIN], f"Settings the sweep runs in: '{MAIN}' and/or conditions.")
    sweep_seeds: Optional[int] = _f(None, "Seeds per sweep run, at most seeds (default: seeds).",
                                    min=1)
    sweep_steps: Optional[int] = _f(None, "Steps of every sweep run, x1 included (default: steps; "
                                    "the x1 runs are then the main runs).", min=1)
    curve_points: Optional[int] = _f(None, "Held-out evaluations during training, 0 = none "
                                     "(default: 7; 2 with quick).", min=0)
    curve_prompts: Optional[int] = _f(None, "Prompts of each in-training evaluation, at most "
                                      "eval_prompts (default: 96; 24 with quick).", min=1)
    jobs: int = _f(1, "Runs trained at once, one process and one thread each.", min=1)
    shard: Optional[str] = _f(None, "I/N: do only every N-th run from the I-th, write no report; "
                              "a later invocation without shard reuses the runs.")
    set: list[str] = _f([], "Config overrides for every run, e.g. algo.beta=0.01.",
                        metavar="KEY=VALUE", empty_ok=True, raw=True)
    proxy: Optional[str] = _f(None, "The over-optimisation study (docs/study.md): train against "
                              "this learned proxy reward (shapes_detector, shapes_scorer) with "
                              "gold logged beside it. Defaults then become rows vanilla_grpo "
                              "plus_ent stage wo_kl, steps 200, curve_points 14, curve suite "
                              "heldout, prefix results_overopt.")
    proxy_weights: str = _f("builtin", "The proxy's weights: builtin, builtin:<shipped name> or a "
                            "folder written by stagerl pretrain-reward.")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_option_flags(parser, StudyOptions)


def _shard(opts: StudyOptions) -> tuple[int, int] | None:
    if opts.shard is None:
        return None
    try:
        i, n = (int(t) for t in opts.shard.split("/"))
    except ValueError:
        raise UserError(f"--shard: expected I/N, e.g. 0/2, got {opts.shard!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard: expected 0 <= I < N, got {opts.shard!r}")
    return i, n


def _check_options(opts: StudyOptions) -> None:
    bad = [m for m in opts.lr_sweep if not (math.isfinite(m) and m > 0)]
    if bad:
        raise FieldError("lr_sweep", f"expected positive numbers, got {opts.lr_sweep}")


def options(args: argparse.Namespace) -> StudyOptions:
    """The parsed command line as typed options (flags, an options file, key=value overrides)."""
    return options_from_args(StudyOptions, args, getattr(args, "options", []), _check_options)


def _configs_dir(path: str) -> str:
    """A row-config folder as given, or, when a relative one is not found from here, the same
    folder among the shipped presets (so the default works outside a source checkout)."""
    p = Path(path)
    if p.is_dir() or p.is_absolute():
        return path
    rel = Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else p
    found = next((d / rel for d in config_dirs() if (d / rel).is_dir()), None)
    return str(found) if found is not None else path


def plan_from_options(opts: StudyOptions) -> StudyPlan:
    """The plan of the options, checked before any work (:func:`check_plan`)."""
    plan = StudyPlan.quick() if opts.quick else StudyPlan()
    plan.seeds = list(range(opts.seeds))
    plan.rows, plan.compare_rows = list(opts.rows), list(opts.compare_rows)
    plan.model, plan.config_dir = opts.model, _configs_dir(opts.configs)
    plan.overrides = plan.overrides + list(opts.set)
    for name in ("steps", "eval_prompts", "eval_images", "curve_points", "curve_prompts",
                 "sweep_steps"):
        if getattr(opts, name) is not None:
            setattr(plan, name, getattr(opts, name))
    plan.curve_prompts = min(plan.curve_prompts, plan.eval_prompts)
    plan.conditions = list(CONDITIONS) if opts.conditions == ["all"] else list(opts.conditions)
    plan.condition_seeds = opts.condition_seeds or opts.seeds
    plan.lr_sweep = [m for m in opts.lr_sweep if m != 1.0]
    plan.sweep_in = list(opts.sweep_in) if plan.lr_sweep else []
    plan.sweep_seeds = opts.sweep_seeds or opts.seeds
    if opts.proxy is not None:
        _proxy_plan(plan, opts)
    check_plan(plan, opts)
    return plan


def _proxy_plan(plan: StudyPlan, opts: StudyOptions) -> None:
    """The over-optimisation study's plan: its rows, longer runs with dense held-out
    evaluations on in-distribution prompts, and the proxy as every run's only reward."""
    from stagerl.study.overopt import OVEROPT_ROWS
    from stagerl.proxies.proxy import PROXY_KINDS

    if opts.proxy not in PROXY_KINDS:
        raise UserError(f"--proxy: unknown proxy reward {opts.proxy!r}; choose from "
                        f"{', '.join(PROXY_KINDS)}")
    defaults = StudyOptions()
    if opts.rows == defaults.rows:
        plan.rows = list(OVEROPT_ROWS)
    plan.compare_rows = list(plan.rows)
    plan.steps = opts.steps or 200
    plan.curve_points = 14 if opts.curve_points is None else opts.curve_points
    plan.curve_suite = "heldout"
    plan.overrides = [f"reward.names=[{opts.proxy}]",
                      f"reward.kwargs={{{opts.proxy}: {{weights: '{opts.proxy_weights}'}}}}",
                      *plan.overrides]
    if opts.prefix == defaults.prefix:
        opts.prefix = "results_overopt"


def check_plan(plan: StudyPlan, args: StudyOptions) -> None:
    """Rows, conditions, seeds, folders, the base model and the overrides, before any work."""
    from stagerl.preflight import check_model_path, check_output_dir

    bad_rows = [r for r in plan.rows + plan.compare_rows if r not in ROWS]
    if bad_rows or not plan.rows:
        raise UserError(f"--rows/--compare-rows: unknown rows {bad_rows}; choose from "
                        f"{', '.join(ROWS)}")
    bad = [c for c in plan.conditions if c not in CONDITIONS]
    if bad:
        raise UserError(f"--conditions: unknown {bad}; choose from {', '.join(CONDITIONS)} or all")
    bad = [s for s in plan.sweep_in if s != MAIN and s not in CONDITIONS]
    if bad:
        raise UserError(f"--sweep-in: unknown {bad}; choose from {MAIN}, {', '.join(CONDITIONS)}")
    for what, n in (("--condition-seeds", plan.condition_seeds), ("--sweep-seeds",
                                                                  plan.sweep_seeds)):
        if n > len(plan.seeds):
            raise UserError(f"{what} {n}: at most --seeds ({len(plan.seeds)})")
    missing = [r for r in dict.fromkeys(plan.rows + plan.compare_rows)
               if not (Path(plan.config_dir) / f"{r}.yaml").is_file()]
    if missing:
        raise UserError(f"--configs {plan.config_dir}: no {missing[0]}.yaml (one <row>.yaml per "
                        f"row is needed)")
    if not args.prefix or Path(args.prefix).name != args.prefix:
        raise UserError(f"--prefix {args.prefix!r}: expected a plain file-name prefix")
    check_output_dir(args.out, "--out")
    check_output_dir(args.docs, "--docs")
    check_model_path(load_config(None, [f"model.path={plan.model}"]).model, "--model")
    cfg = load_config(None, list(plan.overrides))  # --set: a bad override fails now, not in run 1
    if args.proxy is not None:  # the proxy's folder, kind and world, before any work
        from stagerl.rewards.base import RewardSet

        RewardSet(list(cfg.reward.names), dict(cfg.reward.kwargs)).preflight()
    plan_jobs(plan)  # a sweep in a condition that cannot be swept fails now


def command_line(opts: StudyOptions) -> str:
    """The ``stagerl study`` invocation that reproduces ``opts`` (for the results header)."""
    parts = ["stagerl study"] + (["--quick"] if opts.quick else []) + [f"--seeds {opts.seeds}"]
    for f in dataclasses.fields(StudyOptions):
        value = getattr(opts, f.name)
        if f.name in ("quick", "seeds", "jobs", "shard") or value == field_default(f) \
                or value in (None, [], ""):
            continue
        text = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
            if isinstance(value, list) else str(value)
        parts.append(f"{flag(f.name)} {text}")
    return " ".join(parts)


def run_from_args(args: argparse.Namespace,
                  progress: Callable[[str], None]) -> tuple[StudySummary, list[Path]]:
    """Run the study from the parsed command line and write the report (not with ``shard``);
    returns (summary, written paths). ``stagerl study`` in cli.py reports progress and the
    result."""
    opts = options(args)
    plan = plan_from_options(opts)
    shard = _shard(opts)
    torch.set_num_threads(1)  # one thread per process on the shared 2 cores
    summary = run_study(plan, opts.out, progress=progress, jobs=opts.jobs, shard=shard)
    if shard is not None:
        return summary, []
    if opts.proxy is not None:
        from stagerl.study.overopt_report import write_overopt_report

        return summary, write_overopt_report(summary, opts.docs, command_line(opts), opts.prefix)
    paths = write_report(summary, opts.docs, opts.out, command=command_line(opts),
                         prefix=opts.prefix)
    return summary, paths

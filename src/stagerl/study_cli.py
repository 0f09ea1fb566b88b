"""``stagerl study``'s options and their checks: the plan from the command line, then the study and
its report (:mod:`stagerl.study`, :mod:`stagerl.study_figures`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import torch

from stagerl.config import load_config
from stagerl.errors import UserError
from stagerl.study import plan_jobs, run_study
from stagerl.study_common import COMPARE_ROWS, CONDITIONS, MAIN, ROWS, StudyPlan, StudySummary
from stagerl.study_figures import write_report


def _floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") \
            from None
    if any(not (math.isfinite(v) and v > 0) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(t) for t in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/2, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text!r}")
    return i, n


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    from stagerl.preflight import int_arg

    parser.add_argument("--quick", action="store_true",
                        help="short variant (<= 10 min on 2 cores): 12 steps, P=4, small evals")
    parser.add_argument("--seeds", type=int_arg(1), default=3,
                        help="seeds per row (default: %(default)s)")
    parser.add_argument("--out", default="runs/study",
                        help="runs and evaluations go here (default: %(default)s)")
    parser.add_argument("--docs", default="docs",
                        help="results.md and its figures go here (default: %(default)s)")
    parser.add_argument("--prefix", default="results",
                        help="file names in --docs: <prefix>.md and <prefix>_*.png (default: "
                             "%(default)s)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="comma list of ablation rows (default: all five)")
    parser.add_argument("--steps", type=int_arg(1), default=None,
                        help="training steps of every run (default: 80; 12 with --quick)")
    parser.add_argument("--model", default="builtin:shapes",
                        help="base model directory (default: %(default)s)")
    parser.add_argument("--configs", default="configs/ablations",
                        help="folder with one <row>.yaml per ablation row (default: %(default)s)")
    parser.add_argument("--eval-prompts", type=int_arg(1), default=None,
                        help="prompts per suite (default: 96; 48 with --quick)")
    parser.add_argument("--eval-images", type=int_arg(1), default=None,
                        help="images per prompt (default: 4; 2 with --quick)")
    parser.add_argument("--conditions", default="",
                        help=f"comma list of extra settings ({', '.join(CONDITIONS)}) or 'all'; "
                             f"each retrains the --compare-rows once more per seed (default: none)")
    parser.add_argument("--condition-seeds", type=int_arg(1), default=None,
                        help="seeds per condition run, at most --seeds (default: --seeds)")
    parser.add_argument("--compare-rows", default=",".join(COMPARE_ROWS),
                        help="rows the conditions and the lr sweep retrain (default: "
                             "%(default)s)")
    parser.add_argument("--lr-sweep", type=_floats, default=None,
                        help="comma list of learning-rate multiples besides 1, e.g. 0.5,2,4: "
                             "each retrains the --compare-rows in every --sweep-in setting "
                             "(default: none)")
    parser.add_argument("--sweep-in", default=MAIN,
                        help=f"comma list of settings the sweep runs in: '{MAIN}' and/or "
                             f"conditions (default: %(default)s)")
    parser.add_argument("--sweep-seeds", type=int_arg(1), default=None,
                        help="seeds per sweep run, at most --seeds (default: --seeds)")
    parser.add_argument("--sweep-steps", type=int_arg(1), default=None,
                        help="steps of every sweep run, x1 included (default: --steps; the x1 "
                             "runs are then the main runs)")
    parser.add_argument("--curve-points", type=int_arg(0), default=None,
                        help="held-out evaluations during training, 0 = none (default: 7; 2 with "
                             "--quick)")
    parser.add_argument("--curve-prompts", type=int_arg(1), default=None,
                        help="prompts of each in-training evaluation, at most --eval-prompts "
                             "(default: 96; 24 with --quick)")
    parser.add_argument("--jobs", type=int_arg(1), default=1,
                        help="runs trained at once, one process and one thread each (default: "
                             "%(default)s)")
    parser.add_argument("--shard", type=_shard, default=None,
                        help="I/N: do only every N-th run from the I-th, write no report; a later "
                             "invocation without --shard reuses the runs (default: all runs)")
    parser.add_argument("--set", nargs="*", default=[],
                        help="config overrides for every run (default: none)")


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    """The plan of the parsed options, checked before any work (:func:`check_plan`)."""
    plan = StudyPlan.quick() if args.quick else StudyPlan()
    plan.seeds = list(range(args.seeds))
    plan.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    plan.compare_rows = [r.strip() for r in args.compare_rows.split(",") if r.strip()]
    plan.model, plan.config_dir = args.model, args.configs
    plan.overrides = plan.overrides + list(args.set or [])
    if args.steps is not None:
        plan.steps = args.steps
    if args.eval_prompts is not None:
        plan.eval_prompts = args.eval_prompts
    if args.eval_images is not None:
        plan.eval_images = args.eval_images
    if args.curve_points is not None:
        plan.curve_points = args.curve_points
    if args.curve_prompts is not None:
        plan.curve_prompts = args.curve_prompts
    plan.curve_prompts = min(plan.curve_prompts, plan.eval_prompts)
    conds = [c.strip() for c in args.conditions.split(",") if c.strip()]
    plan.conditions = list(CONDITIONS) if conds == ["all"] else conds
    plan.condition_seeds = args.condition_seeds or args.seeds
    plan.lr_sweep = [m for m in (args.lr_sweep or []) if m != 1.0]
    plan.sweep_in = [s.strip() for s in args.sweep_in.split(",") if s.strip()] \
        if plan.lr_sweep else []
    plan.sweep_seeds = args.sweep_seeds or args.seeds
    if args.sweep_steps is not None:
        plan.sweep_steps = args.sweep_steps
    check_plan(plan, args)
    return plan


def check_plan(plan: StudyPlan, args: argparse.Namespace) -> None:
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
    load_config(None, list(plan.overrides))  # --set: a bad override fails now, not in run 1
    plan_jobs(plan)  # a sweep in a condition that cannot be swept fails now


def command_line(args: argparse.Namespace) -> str:
    """The ``stagerl study`` invocation that reproduces ``args`` (for the results header)."""
    defaults = vars(_defaults())
    parts = ["stagerl study"] + (["--quick"] if args.quick else []) + [f"--seeds {args.seeds}"]
    for key, value in vars(args).items():
        if key in ("quick", "seeds", "fn", "_module", "command", "verbose", "jobs", "shard") \
                or key not in defaults:
            continue
        if value != defaults[key] and value not in (None, [], ""):
            flag = "--" + key.replace("_", "-")
            text = " ".join(value) if key == "set" else \
                ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)
            parts.append(f"{flag} {text}")
    return " ".join(parts)


def _defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return parser.parse_args([])


def run_from_args(args: argparse.Namespace,
                  progress: Callable[[str], None]) -> tuple[StudySummary, list[Path]]:
    """Run the study from parsed CLI args and write the report (not with ``--shard``); returns
    (summary, written paths). ``stagerl study`` in cli.py reports progress and the result."""
    plan = plan_from_args(args)
    torch.set_num_threads(1)  # one thread per process on the shared 2 cores
    summary = run_study(plan, args.out, progress=progress, jobs=args.jobs, shard=args.shard)
    if args.shard is not None:
        return summary, []
    paths = write_report(summary, args.docs, args.out, command=command_line(args),
                         prefix=args.prefix)
    return summary, paths

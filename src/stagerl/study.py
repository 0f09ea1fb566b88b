"""``stagerl study``: the STAGE-vs-GRPO reproduction study on the shapes world (issue 7 §3).

The five rows of the paper's Table 4 (method.md §5; configs/ablations/*.yaml) are trained at an
equal sample budget (same steps, prompts per step P and group size G) with >= 3 seeds each, then
every run and the base model are evaluated on every shapes suite (in-distribution "test", held-out
"compositions", held-out "phrasings") and on the quality/drift measures of :mod:`stagerl.quality`.
:mod:`stagerl.study_report` turns the summary into docs/results.md, plots and an image grid.

Runs are independent: each is a pure function of (row, seed, condition, plan), written to its own
folder ``OUT/runs/<row>[-<condition>]-s<seed>``. A run whose folder holds a finished model with the
same resolved config is reused, and cached evaluations (GenEval layout + ``study_eval.json``) are
reused too, so a rerun after an interruption only does what is missing, in any order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from stagerl.config import Config, load_config, to_yaml
from stagerl.errors import UserError
from stagerl.eval import SHAPES_SUITES, evaluate_shapes, generate_images, shapes_items
from stagerl.policies import build_policy
from stagerl.policies.base import SamplingParams
from stagerl.trainer import train

log = logging.getLogger(__name__)

ROWS = ("vanilla_grpo", "plus_ent", "stage", "wo_kl", "wo_ent_kl")
EVAL_SEED = 1234  # prompts and sampling seed of every evaluation (same images for every model)
# Conditions probe *when* a STAGE-vs-GRPO difference appears (issue 7 §4). Each is applied to the
# two rows being compared; "steps_mult"/"lr_mult" scale the plan's values, "set" adds overrides.
CONDITIONS: dict[str, dict[str, Any]] = {
    "long": {"steps_mult": 3, "help": "3x the training steps (and samples)"},
    "lr_x4": {"lr_mult": 4.0, "help": "4x the learning rate"},
    "no_kl": {"set": ["algo.beta=0"], "help": "no KL term (beta = 0) in both rows"},
    # STAGE's weighted token mean divides by Σw, which is small when most tokens (the background)
    # look alike across the group, so its effective step on the weighted tokens is ~1/mean(w)
    # times vanilla's. This condition normalises by the token count instead (w still weights).
    "token_mean": {"set": ["algo.loss_agg=token_mean"],
                   "help": "plain token-mean aggregation (divide by #tokens, not by Σw)"},
}
CONDITION_ROWS = ("vanilla_grpo", "stage")


@dataclass
class StudyPlan:
    """Everything that defines a study; saved with its results."""

    rows: list[str] = field(default_factory=lambda: list(ROWS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Training steps of every run; 0 = the config's run.steps. The full study uses 100 steps of the
    # main job's P=8 x G=8 (half its 200 steps): 15 runs of 200 steps take ~60-70 min of training
    # alone on 2 cores, over issue 7's 60-minute budget for the whole study.
    steps: int = 100
    overrides: list[str] = field(default_factory=list)  # applied to every run
    model: str = "builtin:shapes"
    config_dir: str = "configs/ablations"
    eval_prompts: int = 96  # per suite; a multiple of 12 keeps the tags balanced in every suite
    eval_images: int = 4
    curve_suite: str = "compositions"  # the held-out suite evaluated during training
    curve_points: int = 4  # in-run evaluations (plus before and after)
    curve_prompts: int = 48
    curve_images: int = 2
    quality_ref_examples: int = 2000  # ground-truth "train" renders for the code histogram
    grid_prompts: int = 6
    grid_images: int = 3
    conditions: list[str] = field(default_factory=list)
    condition_seeds: int = 3

    @classmethod
    def quick(cls) -> "StudyPlan":
        """<= 10 min on 2 cores: short runs, small evaluations, still 3 seeds."""
        return cls(steps=12, overrides=["sampling.prompts_per_step=4"], eval_prompts=48,
                   eval_images=2, curve_points=2, curve_prompts=24, quality_ref_examples=1000)


# --------------------------------------------------------------------------------------------------
# Runs


def run_name(row: str, seed: int, condition: str | None = None) -> str:
    return f"{row}-{condition}-s{seed}" if condition else f"{row}-s{seed}"


def run_config(plan: StudyPlan, out: Path, row: str, seed: int,
               condition: str | None = None) -> Config:
    """The resolved config of one run: the row's YAML + the study's bookkeeping + the plan."""
    path = Path(plan.config_dir) / f"{row}.yaml"
    if not path.is_file():
        raise UserError(f"study: no config for row {row!r} at {path} (rows: {', '.join(ROWS)})")
    base = load_config(str(path), [f"model.path={plan.model}", *plan.overrides])
    steps = plan.steps or base.run.steps
    extra: list[str] = []
    if condition:
        cond = CONDITIONS[condition]
        steps *= int(cond.get("steps_mult", 1))
        if "lr_mult" in cond:
            extra.append(f"optim.lr={base.optim.lr * float(cond['lr_mult'])}")
        extra += list(cond.get("set", []))
    every = max(1, steps // max(1, plan.curve_points + 1)) if plan.curve_points else 0
    ov = [f"model.path={plan.model}", f"run.seed={seed}", f"run.steps={steps}",
          f"run.out_dir={out / 'runs'}", f"run.name={run_name(row, seed, condition)}",
          "run.resume=false", "run.save_every=0", "log.tensorboard=false", "log.wandb=false",
          "log.progress=false", "log.image_every=0", f"log.eval_suite={plan.curve_suite}",
          f"log.eval_prompts={plan.curve_prompts if plan.curve_points else 0}",
          f"log.eval_images_per_prompt={plan.curve_images}", f"log.eval_every={every}",
          *plan.overrides, *extra]
    return load_config(str(path), ov)


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_or_reuse(cfg: Config) -> tuple[Path, float, bool]:
    """Train unless the run folder holds a finished run of this exact config.
    Returns (run_dir, training seconds, reused)."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    marker = run_dir / "study_train.json"
    want = _fingerprint(to_yaml(cfg))
    if marker.is_file() and (run_dir / "final").is_dir():
        info = json.loads(marker.read_text())
        if info.get("config") == want:
            return run_dir, float(info["seconds"]), True
    if run_dir.exists():  # unfinished or from other settings: start clean (metrics append)
        shutil.rmtree(run_dir)
    result = train(cfg)
    # The study never resumes a run half-way; the accelerate checkpoint (optimizer state included)
    # would only take disk space next to final/.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    marker.write_text(json.dumps({"config": want, "seconds": result.seconds,
                                  "steps": result.steps, "skipped": result.skipped}) + "\n")
    return run_dir, result.seconds, False


def _load(path: str | Path) -> Any:
    cfg = load_config(None, [f"model.path={path}"])
    return build_policy(cfg.model, need_reference=False).policy


# --------------------------------------------------------------------------------------------------
# Evaluation of one model on every suite + quality


def evaluate_model(policy: Any, base: Any | None, out_dir: Path, plan: StudyPlan,
                   cfg_scale: float) -> dict[str, Any]:
    """Every suite (strict/lenient per tag, partial credit) and the quality measures, cached in
    ``out_dir/study_eval.json`` keyed by the evaluation settings."""
    from stagerl.quality import pretraining_code_histogram, quality_measures

    key = _fingerprint(json.dumps([plan.eval_prompts, plan.eval_images, cfg_scale, EVAL_SEED,
                                   plan.quality_ref_examples, base is not None]))
    cache = out_dir / "study_eval.json"
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())
    result: dict[str, Any] = {"key": key, "suites": {}}
    prompts, images = [], []
    for suite in SHAPES_SUITES:
        d = out_dir / "eval" / suite
        result["suites"][suite] = evaluate_shapes(policy, suite, plan.eval_prompts,
                                                  plan.eval_images, cfg_scale, EVAL_SEED,
                                                  out_dir=d)
        # The images are on disk now; reading them back costs no sampling.
        items = shapes_items(suite, plan.eval_prompts, EVAL_SEED)
        per_prompt = generate_images(policy, items, plan.eval_images,
                                     SamplingParams(cfg_scale=cfg_scale), EVAL_SEED, d)
        prompts += [it.prompt for it in items for _ in range(plan.eval_images)]
        images += [im for ims in per_prompt for im in ims]
    ref_hist, floor = pretraining_code_histogram(policy, plan.quality_ref_examples,
                                                 n_floor=len(images))
    result["quality"] = quality_measures(policy, base, prompts, images, ref_hist)
    result["quality"]["code_jsd_floor"] = floor
    cache.write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------------
# The study


def _run_row(plan: StudyPlan, out: Path, base: Any, row: str, seed: int,
             condition: str | None) -> dict[str, Any]:
    cfg = run_config(plan, out, row, seed, condition)
    t0 = time.perf_counter()
    run_dir, seconds, reused = train_or_reuse(cfg)
    policy = _load(run_dir / "final")
    ev = evaluate_model(policy, base, run_dir, plan, cfg.sampling.cfg_scale)
    log.info("%s: trained in %.0f s%s, evaluated in %.0f s", run_dir.name, seconds,
             " (reused)" if reused else "", time.perf_counter() - t0 - (0 if reused else seconds))
    return {"row": row, "seed": seed, "condition": condition, "run_dir": str(run_dir),
            "train_seconds": seconds, "reused": reused, "eval": ev,
            "steps": cfg.run.steps, "samples": cfg.run.steps * cfg.sampling.prompts_per_step
            * cfg.sampling.group_size, "lr": cfg.optim.lr, "beta": cfg.algo.beta}


def run_study(plan: StudyPlan, out: str | Path, progress: Any = None) -> dict[str, Any]:
    """Train and evaluate every (row, seed) and condition run; returns (and saves) the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    unknown = [r for r in plan.rows if r not in ROWS]
    bad_cond = [c for c in plan.conditions if c not in CONDITIONS]
    if unknown or bad_cond:
        raise UserError(f"study: unknown rows {unknown} or conditions {bad_cond}; rows: "
                        f"{', '.join(ROWS)}; conditions: {', '.join(CONDITIONS)}")
    if len(plan.seeds) < 1:
        raise UserError("study: --seeds must be at least 1")
    first = run_config(plan, out, plan.rows[0], plan.seeds[0])
    if plan.steps == 0:
        plan.steps = first.run.steps  # record the default actually used
    base = _load(plan.model)
    base_eval = evaluate_model(base, base, out / "base", plan, first.sampling.cfg_scale)
    jobs = [(r, s, None) for r in plan.rows for s in plan.seeds]
    jobs += [(r, s, c) for c in plan.conditions for r in CONDITION_ROWS
             for s in plan.seeds[:plan.condition_seeds]]
    runs = []
    for k, (row, seed, cond) in enumerate(jobs):
        if progress:
            progress(f"[{k + 1}/{len(jobs)}] {run_name(row, seed, cond)}")
        runs.append(_run_row(plan, out, base, row, seed, cond))
    summary = {"plan": asdict(plan), "base": base_eval, "runs": runs,
               "config": {"P": first.sampling.prompts_per_step, "G": first.sampling.group_size,
                          "lr": first.optim.lr, "beta": first.algo.beta,
                          "cfg_scale": first.sampling.cfg_scale, "steps": plan.steps},
               "wall_seconds": time.perf_counter() - t_start,
               "train_seconds": sum(r["train_seconds"] for r in runs),
               "reused_runs": sum(r["reused"] for r in runs)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# --------------------------------------------------------------------------------------------------
# CLI


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
                        help="training steps of every run (default: 100; 12 with --quick)")
    parser.add_argument("--model", default="builtin:shapes",
                        help="base model directory (default: %(default)s)")
    parser.add_argument("--configs", default="configs/ablations",
                        help="folder with one <row>.yaml per ablation row (default: %(default)s)")
    parser.add_argument("--eval-prompts", type=int_arg(1), default=None,
                        help="prompts per suite (default: 96; 48 with --quick)")
    parser.add_argument("--eval-images", type=int_arg(1), default=None,
                        help="images per prompt (default: 4; 2 with --quick)")
    parser.add_argument("--conditions", default="",
                        help=f"comma list of extra conditions ({', '.join(CONDITIONS)}) or 'all'; "
                             f"each trains {' and '.join(CONDITION_ROWS)} once more per seed "
                             f"(default: none)")
    parser.add_argument("--condition-seeds", type=int_arg(1), default=None,
                        help="seeds per condition run, at most --seeds (default: --seeds)")
    parser.add_argument("--curve-points", type=int_arg(0), default=None,
                        help="held-out evaluations during training, 0 = none (default: 4; 2 with "
                             "--quick)")
    parser.add_argument("--set", nargs="*", default=[],
                        help="config overrides for every run (default: none)")


def plan_from_args(args: argparse.Namespace) -> StudyPlan:
    """The plan of the parsed options, checked before any work (:func:`check_plan`)."""
    plan = StudyPlan.quick() if args.quick else StudyPlan()
    plan.seeds = list(range(args.seeds))
    plan.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
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
        plan.curve_prompts = min(plan.curve_prompts, plan.eval_prompts)
    conds = [c.strip() for c in args.conditions.split(",") if c.strip()]
    plan.conditions = list(CONDITIONS) if conds == ["all"] else conds
    plan.condition_seeds = args.condition_seeds or args.seeds
    check_plan(plan, args)
    return plan


def check_plan(plan: StudyPlan, args: argparse.Namespace) -> None:
    """Rows, conditions, seeds, folders, the base model and the overrides, before any work."""
    from stagerl.preflight import check_model_path, check_output_dir

    bad_rows = [r for r in plan.rows if r not in ROWS]
    if bad_rows or not plan.rows:
        raise UserError(f"--rows: unknown rows {bad_rows}; choose from {', '.join(ROWS)}")
    bad = [c for c in plan.conditions if c not in CONDITIONS]
    if bad:
        raise UserError(f"--conditions: unknown {bad}; choose from {', '.join(CONDITIONS)} or all")
    if plan.condition_seeds > len(plan.seeds):
        raise UserError(f"--condition-seeds {plan.condition_seeds}: at most --seeds "
                        f"({len(plan.seeds)})")
    missing = [r for r in plan.rows if not (Path(plan.config_dir) / f"{r}.yaml").is_file()]
    if missing:
        raise UserError(f"--configs {plan.config_dir}: no {missing[0]}.yaml (one <row>.yaml per "
                        f"row is needed)")
    if not args.prefix or Path(args.prefix).name != args.prefix:
        raise UserError(f"--prefix {args.prefix!r}: expected a plain file-name prefix")
    check_output_dir(args.out, "--out")
    check_output_dir(args.docs, "--docs")
    check_model_path(load_config(None, [f"model.path={plan.model}"]).model, "--model")
    load_config(None, list(plan.overrides))  # --set: a bad override fails now, not in run 1


def command_line(args: argparse.Namespace) -> str:
    """The ``stagerl study`` invocation that reproduces ``args`` (for the results header)."""
    defaults = vars(_defaults())
    parts = ["stagerl study"] + (["--quick"] if args.quick else []) + [f"--seeds {args.seeds}"]
    for key, value in vars(args).items():
        if key in ("quick", "seeds", "fn", "_module", "command", "verbose") or key not in defaults:
            continue
        if value != defaults[key] and value not in (None, [], ""):
            flag = "--" + key.replace("_", "-")
            text = " ".join(value) if isinstance(value, list) else str(value)
            parts.append(f"{flag} {text}")
    return " ".join(parts)


def _defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return parser.parse_args([])


def run_from_args(args: argparse.Namespace,
                  progress: Callable[[str], None]) -> tuple[dict[str, Any], list[Path]]:
    """Run the study from parsed CLI args and write the report; returns (summary, written paths).
    ``stagerl study`` in cli.py reports progress and the result."""
    from stagerl.study_report import write_report

    plan = plan_from_args(args)
    torch.set_num_threads(1)  # platform.md: one thread per process on the shared 2 cores
    summary = run_study(plan, args.out, progress=progress)
    paths = write_report(summary, args.docs, args.out, command=command_line(args),
                         prefix=args.prefix)
    return summary, paths

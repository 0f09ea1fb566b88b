"""``stagerl study``: the STAGE-vs-GRPO reproduction study on the shapes world (docs/study.md).

The five rows of the paper's Table 4 (docs/algorithm.md §7) and two peer methods, GCPO and Dr. GRPO
scaling (§10-11; configs/ablations/*.yaml), are trained
at an equal sample budget (same steps, prompts per step P and group size G) with >= 3 seeds each,
then every run and the base model are evaluated on every shapes suite (in-distribution "test",
held-out "compositions", held-out "phrasings") and on the quality/drift measures of
:mod:`stagerl.quality`.
Two extensions make the comparison a matched one (docs/study.md, "Settings and the LR sweep"):

- **conditions** retrain the compared rows (vanilla GRPO, +Ent, STAGE) in another setting, e.g.
  ``lenient``: trained on a reward the shapes world can game, evaluated with the strict rule;
- **the learning-rate sweep** retrains the compared rows at multiples of the learning rate, in the
  main setting and/or in conditions; every run's in-training evaluations (held-out strict score) and
  its training KL to the base give the reward-KL frontier of :mod:`stagerl.study.figures`.

:mod:`stagerl.study.report` renders docs/results.md; :mod:`stagerl.study.figures` writes its plots and grid.

Runs are independent: each is a pure function of (row, seed, condition, lr multiple, plan), written
to its own folder ``OUT/runs/<row>[-<condition>][-lr<m>]-s<seed>``. A run whose folder holds a
finished model with the same resolved config is reused, and cached evaluations (GenEval layout +
``study_eval.json``) are reused too, so a rerun after an interruption only does what is missing, in
any order, in any number of processes (``--jobs``) or separate invocations (``--shard``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stagerl.config import Config, load_config, to_yaml
from stagerl.errors import UserError
from stagerl.data import EVAL_SEED
from stagerl.eval import SHAPES_SUITES, evaluate_suite
from stagerl.policies.base import Policy, SamplingParams
# ROWS, COMPARE_ROWS, MAIN, StudyPlan and CONDITIONS are re-exported: the study's public names.
from stagerl.study.common import (COMPARE_ROWS, CONDITIONS, MAIN, ROWS,  # noqa: F401
                                  CurvePoint, StudyPlan, StudyRun, StudySettings, StudySummary,
                                  load_policy)
from stagerl.trainer import train

log = logging.getLogger(__name__)

# In-training KL at an evaluation step: the mean of the logged training KL (k3 to the reference =
# the base model) over this many logged steps around it (docs/study.md, "The reward-KL frontier").
KL_WINDOW = 2
# The same for a whole image's KL (the over-optimisation study's axis, docs/study.md): 12 logged
# steps, because the per-step KL of 64 images varies by a factor of two from step to step.
KL_SEQ_WINDOW = 6


@dataclass(frozen=True)
class Job:
    """One run of the study: a row in a setting (condition or main) at a multiple of the lr."""

    row: str
    seed: int
    condition: str | None = None
    lr_mult: float = 1.0
    steps: int = 0  # 0 = the plan's steps

    @property
    def name(self) -> str:
        return run_name(self.row, self.seed, self.condition, self.lr_mult, self.steps)


# --------------------------------------------------------------------------------------------------
# Runs


def run_name(row: str, seed: int, condition: str | None = None, lr_mult: float = 1.0,
             steps: int = 0) -> str:
    parts = [row] + ([condition] if condition else []) + \
        ([f"lr{lr_mult:g}"] if lr_mult != 1.0 or steps else []) + ([f"{steps}st"] if steps else [])
    return "-".join(parts) + f"-s{seed}"


def run_config(plan: StudyPlan, out: Path, row: str, seed: int,
               condition: str | None = None, lr_mult: float = 1.0,
               job_steps: int = 0) -> Config:
    """The resolved config of one run: the row's YAML + the study's bookkeeping + the plan."""
    path = Path(plan.config_dir) / f"{row}.yaml"
    if not path.is_file():
        raise UserError(f"study: no config for row {row!r} at {path} (rows: {', '.join(ROWS)})")
    base = load_config(str(path), [f"model.path={plan.model}", *plan.overrides])
    steps = job_steps or plan.steps or base.run.steps
    extra: list[str] = []
    if condition:
        cond = CONDITIONS[condition]
        steps *= int(cond.get("steps_mult", 1))
        extra += list(cond.get("set", []))
    if lr_mult != 1.0:
        extra.append(f"optim.lr={base.optim.lr * lr_mult!r}")
    every = max(1, steps // max(1, plan.curve_points + 1)) if plan.curve_points else 0
    name = run_name(row, seed, condition, lr_mult, job_steps)
    ov = [f"model.path={plan.model}", f"run.seed={seed}", f"run.steps={steps}",
          f"run.out_dir={out / 'runs'}", f"run.name={name}",
          "run.resume=false", "run.save_every=0", "log.tensorboard=false", "log.wandb=false",
          "log.progress=false", "log.image_every=0", f"log.eval_suite={plan.curve_suite}",
          f"log.eval_prompts={plan.curve_prompts if plan.curve_points else 0}",
          f"log.eval_images_per_prompt={plan.curve_images}", f"log.eval_every={every}",
          *plan.overrides, *extra]
    return load_config(str(path), ov)


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"run.out_dir": value, ...}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# Where a run lives is not what it is: the same study reached through another path (a relative
# --out, a moved folder) reuses its runs.
_LOCATION_KEYS = {"run.out_dir"}


def _same_run(saved: dict[str, Any], cfg: Config) -> bool:
    """Does a finished run's saved config describe ``cfg``? Every field both know must agree; a
    field only one side knows (added to or removed from the config since) is ignored, because a
    new field's default keeps the old behaviour, and so is the folder the runs live in
    (docs/study.md, "Reuse and order")."""
    from omegaconf import OmegaConf

    if "resolved" not in saved:
        return saved.get("config") == _fingerprint(to_yaml(cfg))
    old = _flat(saved["resolved"])
    new = _flat(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))
    return all(old[k] == new[k] for k in (old.keys() & new.keys()) - _LOCATION_KEYS)


def train_or_reuse(cfg: Config) -> tuple[Path, float, bool]:
    """Train unless the run folder holds a finished run of this config.
    Returns (run_dir, training seconds, reused)."""
    from omegaconf import OmegaConf

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    marker = run_dir / "study_train.json"
    if marker.is_file() and (run_dir / "final").is_dir():
        info = json.loads(marker.read_text())
        if _same_run(info, cfg):
            return run_dir, float(info["seconds"]), True
    if run_dir.exists():  # unfinished or from other settings: start clean (metrics append)
        shutil.rmtree(run_dir)
    result = train(cfg)
    # The study never resumes a run half-way; the accelerate checkpoint (optimizer state included)
    # would only take disk space next to final/.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    resolved = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    marker.write_text(json.dumps({"config": _fingerprint(to_yaml(cfg)), "resolved": resolved,
                                  "seconds": result.seconds, "steps": result.steps,
                                  "skipped": result.skipped}) + "\n")
    return run_dir, result.seconds, False


def run_curve(run_dir: str | Path, steps: int) -> list[CurvePoint]:
    """The run's in-training evaluations, by step.

    ``kl`` is the training KL to the reference (the base model; logged per step for rows with a
    reference, k3 per token on the rollout's samples): the policy evaluated after s updates sampled
    the rollout logged at step s + 1, so the point takes the mean of the logged KL over steps
    s + 1 - KL_WINDOW .. s + KL_WINDOW (those that exist); at step 0 the policy is the base: 0.
    Rows without a reference log no KL: ``kl`` is NaN there."""
    from stagerl.tracking import mean_around, read_metrics

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    kl, kl_seq = ({int(r["step"]): float(r[key]) for r in rows if r.get(key) is not None}
                  for key in ("policy/kl_k3", "policy/kl_seq_k3"))

    points = []
    for f in run_dir.glob("eval_*.json"):
        tag = f.stem[len("eval_"):]
        step = 0 if tag == "before" else steps if tag == "after" else int(tag[len("step"):])
        res = json.loads(f.read_text())
        proxy = list((res.get("proxy") or {}).values())
        points.append(CurvePoint(step=step, heldout=float(res["strict"]["overall"]),
                                 heldout_lenient=float(res["lenient"]["overall"]),
                                 kl=mean_around(kl, step, KL_WINDOW),
                                 kl_seq=mean_around(kl_seq, step, KL_SEQ_WINDOW),
                                 proxy=float(proxy[0]) if proxy else float("nan")))
    return sorted(points, key=lambda p: p.step)


# --------------------------------------------------------------------------------------------------
# Evaluation of one model on every suite + quality


def evaluate_model(policy: Policy, base: Policy | None, out_dir: Path, plan: StudyPlan,
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
        res = evaluate_suite(policy, suite, plan.eval_prompts, plan.eval_images,
                             SamplingParams(cfg_scale=cfg_scale), EVAL_SEED,
                             out_dir=out_dir / "eval" / suite)
        result["suites"][suite] = res.to_dict()
        prompts += [it.prompt for it in res.items for _ in range(plan.eval_images)]
        images += [im for ims in res.images for im in ims]
    ref_hist, floor = pretraining_code_histogram(policy, plan.quality_ref_examples,
                                                 n_floor=len(images))
    result["quality"] = quality_measures(policy, base, prompts, images, ref_hist,
                                         group_size=plan.eval_images)
    result["quality"]["code_jsd_floor"] = floor
    cache.write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------------
# The study


def plan_jobs(plan: StudyPlan) -> list[Job]:
    """Every run of the plan, each once, most needed first (an interrupted study has finished
    those): the compared rows, the conditions, the sweep, then the other rows; within each, seed
    by seed, so that an interrupted part has the same seeds for every row."""
    jobs = [Job(r, s) for s in plan.seeds for r in plan.rows if r in plan.compare_rows]
    for c in plan.conditions:
        rows = [r for r in plan.compare_rows if r in CONDITIONS[c].get("rows", plan.compare_rows)]
        jobs += [Job(r, s, c) for s in plan.seeds[:plan.condition_seeds] for r in rows]
    for setting in plan.sweep_in:
        cond = None if setting == MAIN else setting
        if cond is not None and "rows" in CONDITIONS[cond]:
            raise UserError(f"--sweep-in {cond}: this condition changes only "
                            f"{', '.join(CONDITIONS[cond]['rows'])}; sweep in main instead")
        steps = 0 if plan.sweep_steps in (0, plan.steps) else plan.sweep_steps
        jobs += [Job(r, s, cond, m, steps) for s in plan.seeds[:plan.sweep_seeds]
                 for m in [1.0, *plan.lr_sweep] for r in plan.compare_rows]
    jobs += [Job(r, s) for s in plan.seeds for r in plan.rows]
    return list(dict.fromkeys(jobs))


def _run_job(plan: StudyPlan, out: Path, base: Any, job: Job) -> StudyRun:
    cfg = run_config(plan, out, job.row, job.seed, job.condition, job.lr_mult, job.steps)
    t0 = time.perf_counter()
    run_dir, seconds, reused = train_or_reuse(cfg)
    policy = load_policy(run_dir / "final")
    ev = evaluate_model(policy, base, run_dir, plan, cfg.sampling.cfg_scale)
    log.info("%s: trained in %.0f s%s, evaluated in %.0f s", run_dir.name, seconds,
             " (reused)" if reused else "", time.perf_counter() - t0 - (0 if reused else seconds))
    return StudyRun(row=job.row, seed=job.seed, condition=job.condition, lr_mult=job.lr_mult,
                    job_steps=job.steps, run_dir=str(run_dir), train_seconds=seconds,
                    reused=reused, eval=ev, curve=run_curve(run_dir, cfg.run.steps),
                    steps=cfg.run.steps,
                    samples=cfg.run.steps * cfg.sampling.prompts_per_step * cfg.sampling.group_size,
                    lr=cfg.optim.lr, beta=cfg.algo.beta, reward=list(cfg.reward.names))


def _worker(plan: StudyPlan, out: str, job: Job) -> StudyRun:
    """One job in a worker process of ``--jobs``: one thread, its own copy of the base model."""
    torch.set_num_threads(1)
    return _run_job(plan, Path(out), load_policy(plan.model), job)


def _ignore_sigint() -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_job(args: tuple[StudyPlan, str, Job]) -> StudyRun:
    return _worker(*args)


def run_study(plan: StudyPlan, out: str | Path, progress: Any = None, jobs: int = 1,
              shard: tuple[int, int] | None = None) -> StudySummary:
    """Train and evaluate every run of the plan; returns (and saves) the summary.

    ``jobs`` > 1 runs that many runs at once in worker processes. ``shard`` = (i, n) does only
    every n-th run starting at i and neither evaluates the base model nor writes summary.json: a
    later invocation without ``shard`` reuses the runs and writes the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    unknown = [r for r in plan.rows + plan.compare_rows if r not in ROWS]
    bad_cond = [c for c in plan.conditions if c not in CONDITIONS]
    if unknown or bad_cond:
        raise UserError(f"study: unknown rows {unknown} or conditions {bad_cond}; rows: "
                        f"{', '.join(ROWS)}; conditions: {', '.join(CONDITIONS)}")
    if len(plan.seeds) < 1:
        raise UserError("study: --seeds must be at least 1")
    first = run_config(plan, out, plan.rows[0], plan.seeds[0])
    if plan.steps == 0:
        plan.steps = first.run.steps  # record the default actually used
    todo = plan_jobs(plan)
    if shard is not None:
        todo = todo[shard[0]::shard[1]]
    base = load_policy(plan.model)
    base_eval = None if shard else evaluate_model(base, base, out / "base", plan,
                                                   first.sampling.cfg_scale)
    runs: list[StudyRun] = []
    if jobs <= 1:
        for k, job in enumerate(todo):
            if progress:
                progress(f"[{k + 1}/{len(todo)}] {job.name}")
            runs.append(_run_job(plan, out, base, job))
    else:
        import multiprocessing

        # A Pool, not a ProcessPoolExecutor: leaving the `with` block terminates the workers. The
        # executor's exit waits for every submitted job, so an interrupted study went on training
        # (and could race a rerun writing the same run folders) after printing "interrupted".
        # Ctrl-C reaches the workers too: they ignore it, and the main process ends them.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=jobs, initializer=_ignore_sigint) as pool:
            results = pool.imap(_worker_job, [(plan, str(out), job) for job in todo])
            for k, (job, run) in enumerate(zip(todo, results)):
                runs.append(run)
                if progress:
                    progress(f"[{k + 1}/{len(todo)}] {job.name} done")
    settings = StudySettings(P=first.sampling.prompts_per_step, G=first.sampling.group_size,
                             lr=first.optim.lr, beta=first.algo.beta,
                             cfg_scale=first.sampling.cfg_scale, steps=plan.steps)
    summary = StudySummary(plan=plan, base=base_eval, runs=runs, config=settings,
                           wall_seconds=time.perf_counter() - t_start,
                           train_seconds=sum(r.train_seconds for r in runs),
                           reused_runs=sum(r.reused for r in runs), shard=shard)
    if shard is None:
        (out / "summary.json").write_text(summary.to_json())
    return summary

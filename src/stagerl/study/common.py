"""What the study, its report and its figures share: the plan and the result types
(:class:`StudyPlan`, :class:`StudySummary`), the conditions a study can retrain in, loading a model
by path, and the learning-rate sweep's bookkeeping (runs by lr, the reward-KL matching). Apart from
all three so that none imports the one that calls it.

The results are dataclasses everywhere in memory; ``OUT/summary.json`` is their JSON form
(:meth:`StudySummary.to_json` and :meth:`StudySummary.from_json`, the only place that reads or
writes it as a dict).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from stagerl.config import load_config
from stagerl.policies import build_policy

# The Table 4 rows, then the peer methods (GCPO, Dr. GRPO scaling; docs/algorithm.md §10-11).
ROWS = ("vanilla_grpo", "plus_ent", "stage", "wo_kl", "wo_ent_kl", "gcpo", "dr_grpo")
# The rows every condition and the learning-rate sweep retrain: the three methods whose matched
# comparison docs/study.md asks for.
COMPARE_ROWS = ("vanilla_grpo", "plus_ent", "stage")
MAIN = "main"  # the name of the main setting in --sweep-in

# A condition retrains the compared rows in another setting (docs/study.md, "Conditions"):
# "steps_mult" scales the plan's steps, "set" adds overrides, "rows" narrows the rows (a condition
# that cannot change a row is not retrained for it; the report then uses the main run).
CONDITIONS: dict[str, dict[str, Any]] = {
    # The drift setting: GenEval's rules alone reward an image with unrequested objects and
    # fragments, as the paper's detector reward does; evaluation stays strict.
    "lenient": {"set": ["reward.names=[shapes_lenient]"],
                "help": "trained on the lenient GenEval rule (extra objects and fragments pass)"},
    "partial": {"set": ["reward.names=[shapes_partial]"],
                "help": "trained on GenEval's partial credit"},
    # The drift setting trained 3x longer: whether vanilla GRPO drifts given more steps on the
    # gameable reward (the paper's runs are far longer than the study's main runs).
    "lenient_long": {"set": ["reward.names=[shapes_lenient]"], "steps_mult": 3,
                     "longer_of": "lenient",
                     "help": "trained on the lenient GenEval rule for 3x the training steps"},
    "long": {"steps_mult": 3, "help": "3x the training steps (and samples)"},
    "no_kl": {"set": ["algo.beta=0"], "help": "no KL term (beta = 0)"},
    # docs/algorithm.md §5: with w = 1 (vanilla GRPO, +Ent) every aggregation below is the plain
    # token mean, so only STAGE changes. token_norm divides STAGE's policy term by the token count
    # instead of each group's Σw: β then weighs against the policy term as in vanilla GRPO.
    # batch_norm is the previous default, one Σw over the whole batch.
    "token_norm": {"set": ["algo.loss_agg=token_mean"], "rows": ["stage"],
                   "help": "STAGE's policy term divided by the token count, not per-group Σw"},
    "batch_norm": {"set": ["algo.loss_agg=batch_weighted_mean"], "rows": ["stage"],
                   "help": "STAGE's policy term divided by one Σw over the whole batch"},
}


# --------------------------------------------------------------------------------------------------
# The plan and the results


@dataclass
class StudyPlan:
    """Everything that defines a study; saved with its results."""

    rows: list[str] = field(default_factory=lambda: list(ROWS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Training steps of every run; 0 = the config's run.steps. The full study uses 80 steps of the
    # main job's P=8 x G=8 (its 200 steps would not fit): 15 runs and their evaluations then fit
    # the 60-minute budget on 2 cores, and the sweep fits beside them (docs/study.md).
    steps: int = 80
    overrides: list[str] = field(default_factory=list)  # applied to every run
    model: str = "builtin:shapes"
    config_dir: str = "configs/ablations"
    eval_prompts: int = 96  # per suite; a multiple of 12 keeps the tags balanced in every suite
    eval_images: int = 4
    # The held-out suite evaluated during training (the frontier's y axis). "phrasings" measures
    # all six tags; on "compositions" colors and color_attr are 0 for every model (docs/study.md).
    curve_suite: str = "phrasings"
    # In-run evaluations (plus before and after): the points of the reward-KL frontier.
    curve_points: int = 7
    curve_prompts: int = 96
    curve_images: int = 2
    quality_ref_examples: int = 2000  # ground-truth "train" renders for the code histogram
    grid_prompts: int = 6
    grid_images: int = 3
    conditions: list[str] = field(default_factory=list)
    condition_seeds: int = 3
    compare_rows: list[str] = field(default_factory=lambda: list(COMPARE_ROWS))
    lr_sweep: list[float] = field(default_factory=list)  # lr multiples besides 1
    sweep_in: list[str] = field(default_factory=lambda: [MAIN])  # settings the sweep runs in
    sweep_seeds: int = 3
    # Steps of every sweep run, x1 included; 0 = the plan's steps (the x1 runs are then the main
    # runs). Fewer steps buy seeds and learning rates when time is short (docs/study.md).
    sweep_steps: int = 0

    @classmethod
    def quick(cls) -> "StudyPlan":
        """<= 10 min on 2 cores: short runs, small evaluations, still 3 seeds."""
        return cls(steps=12, overrides=["sampling.prompts_per_step=4"], eval_prompts=48,
                   eval_images=2, curve_points=2, curve_prompts=24, quality_ref_examples=1000)


@dataclass
class CurvePoint:
    """One in-training evaluation of a run: a point of the reward-KL frontier (docs/study.md,
    "The reward-KL frontier")."""

    step: int  # updates done; 0 = the base model
    heldout: float  # strict overall score on the plan's curve_suite
    heldout_lenient: float  # the same images under the lenient rule
    kl: float  # training KL to the base around this step; 0 at step 0, NaN without a reference
    # The same around this step for a whole image (the sum of its tokens' KLs), and the mean score
    # of the learned proxy trained on (NaN when the run trains on an exact reward) on the images
    # of ``heldout``: the over-optimisation study's axes (docs/study.md).
    kl_seq: float = float("nan")
    proxy: float = float("nan")


@dataclass(kw_only=True)
class StudyRun:
    """One trained and evaluated run of the study (the fields in summary.json's order)."""

    row: str
    seed: int
    condition: str | None = None  # None = the main setting
    lr_mult: float = 1.0  # multiple of the row's learning rate
    job_steps: int = 0  # steps the job asked for, 0 = the plan's (only sweep runs set it)
    run_dir: str
    train_seconds: float  # measured when the run was trained, so also true for a reused run
    reused: bool
    # The evaluation on every suite plus quality, as the study caches it in study_eval.json:
    # {"key", "suites": {suite: ShapesEval.to_dict()}, "quality": {measure: value}}.
    eval: dict[str, Any]
    curve: list[CurvePoint] = field(default_factory=list)
    steps: int  # training steps actually run (conditions may scale them)
    samples: int  # steps x P x G
    lr: float
    beta: float
    reward: list[str]

    @property
    def at_plan_lr_and_steps(self) -> bool:
        """Trained at the plan's learning rate and steps: a main or condition run, not a run of
        the learning-rate sweep."""
        return self.lr_mult == 1.0 and not self.job_steps


@dataclass
class StudySettings:
    """The training settings of the study's runs, from the first run's resolved config."""

    P: int  # prompts per step
    G: int  # group size
    lr: float
    beta: float
    cfg_scale: float
    steps: int


@dataclass
class StudySummary:
    """A study's results: OUT/summary.json in memory."""

    plan: StudyPlan
    base: dict[str, Any] | None  # the base model's evaluation (as StudyRun.eval); None in a shard
    runs: list[StudyRun]
    config: StudySettings
    wall_seconds: float  # of the invocation that wrote the summary
    train_seconds: float  # summed over the runs
    reused_runs: int
    shard: tuple[int, int] | None = None  # (i, n) when only every n-th run from the i-th was done

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudySummary":
        """The summary of a ``to_dict`` result, also one written before a field existed (that
        field takes its default) or after one was removed (ignored)."""
        runs = [StudyRun(**{**_known(StudyRun, r),
                            "curve": [CurvePoint(**_known(CurvePoint, p))
                                      for p in r.get("curve", [])]}) for r in d["runs"]]
        return cls(plan=StudyPlan(**_known(StudyPlan, d["plan"])), base=d["base"], runs=runs,
                   config=StudySettings(**_known(StudySettings, d["config"])),
                   wall_seconds=d["wall_seconds"], train_seconds=d["train_seconds"],
                   reused_runs=d["reused_runs"],
                   shard=tuple(d["shard"]) if d.get("shard") else None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "StudySummary":
        return cls.from_dict(json.loads(text))


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# --------------------------------------------------------------------------------------------------
# Models and the learning-rate sweep


def load_policy(path: str | Path) -> Any:
    """The policy saved at ``path`` (a run's ``final/`` or ``builtin:shapes``), without a reference."""
    cfg = load_config(None, [f"model.path={path}"])
    return build_policy(cfg.model, need_reference=False).policy


LrKey = float | str  # an lr multiple, or the label of the full-length x1 runs of a shorter sweep
ByLr = dict[LrKey, list[StudyRun]]


def sweep_runs(summary: StudySummary) -> dict[str | None, dict[str, ByLr]]:
    """setting (condition or None) -> row -> lr multiple -> runs, for the settings swept."""
    plan = summary.plan
    settings = [None if s == MAIN else s for s in plan.sweep_in]
    steps = 0 if plan.sweep_steps in (0, plan.steps) else plan.sweep_steps
    out: dict[str | None, dict[str, ByLr]] = {}
    for r in summary.runs:
        if r.condition in settings and r.row in plan.compare_rows and r.job_steps == steps:
            out.setdefault(r.condition, {}).setdefault(r.row, {}).setdefault(
                float(r.lr_mult), []).append(r)
    # A shorter sweep: the setting's full-length x1 runs join the frontier as one more option,
    # keyed by a label (they are not candidates for "best lr", which compares equal budgets).
    for r in summary.runs if steps else []:
        if r.condition in out and r.row in out[r.condition] and r.at_plan_lr_and_steps:
            out[r.condition][r.row].setdefault(f"x1, {r.steps} steps", []).append(r)
    return {s: out[s] for s in settings if s in out}


def _lr_label(m: LrKey) -> str:
    return m if isinstance(m, str) else f"x{m:g}"


def _lr_order(m: LrKey) -> tuple[bool, str]:
    return isinstance(m, str), str(m)


def first_reach(xs: list[float], ys: list[float], level: float) -> float | None:
    """y where x first reaches ``level`` (linear between consecutive points); None when it never
    does."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= level <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
        if x0 == level:
            return y0
    return None


def _score_at_kl(curve: list[CurvePoint], k: float) -> float | None:
    """The held-out score where the run's training KL first reaches k (linear between evaluation
    points); None when it never does."""
    pts = [p for p in curve if math.isfinite(p.kl)]
    return first_reach([p.kl for p in pts], [p.heldout for p in pts], k)


def frontier_levels(by_row: dict[str, ByLr]) -> list[float]:
    """KL levels every method reaches: for each method, the largest KL that all seeds of one of
    its learning rates reach; the levels are 1/16, 1/8, 1/4, 1/2 and all of the smallest of those
    (halvings, to cover the low-KL end where the smaller learning rates live)."""
    reach = []
    for by_lr in by_row.values():
        best = 0.0
        for runs in by_lr.values():
            tops = [max((p.kl for p in r.curve if math.isfinite(p.kl)), default=0.0)
                    for r in runs]
            best = max(best, min(tops) if tops else 0.0)
        reach.append(best)
    top = min(reach) if reach else 0.0
    return [top * f for f in (0.0625, 0.125, 0.25, 0.5, 1.0)] if top > 0 else []


def matched_kl(by_row: dict[str, ByLr], k: float) -> dict[str, tuple[LrKey, list[float]]]:
    """row -> (best lr multiple, per-seed held-out scores at KL k): the lr whose seeds all reach k
    with the highest mean score there."""
    out = {}
    for row, by_lr in by_row.items():
        best = None
        for m, runs in sorted(by_lr.items(), key=lambda kv: _lr_order(kv[0])):
            vals = [_score_at_kl(r.curve, k) for r in runs]
            if len(vals) < 2 or any(v is None for v in vals):
                continue
            if best is None or np.mean(vals) > np.mean(best[1]):
                best = (m, [float(v) for v in vals])
        if best is not None:
            out[row] = best
    return out

"""What the study, its report and its figures share: the conditions a study can retrain in, loading
a model by path, and the learning-rate sweep's bookkeeping (runs by lr, the reward-KL matching).
Apart from all three so that none imports the one that calls it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from stagerl.config import load_config
from stagerl.policies import build_policy

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


def load_policy(path: str | Path) -> Any:
    """The policy saved at ``path`` (a run's ``final/`` or ``builtin:shapes``), without a reference."""
    cfg = load_config(None, [f"model.path={path}"])
    return build_policy(cfg.model, need_reference=False).policy


def sweep_runs(summary: dict) -> dict[str | None, dict[str, dict[float, list[dict]]]]:
    """setting (condition or None) -> row -> lr multiple -> runs, for the settings swept."""
    plan = summary["plan"]
    settings = [None if s == "main" else s for s in plan.get("sweep_in") or []]
    rows = plan.get("compare_rows") or []
    steps = 0 if plan.get("sweep_steps", 0) in (0, plan["steps"]) else plan["sweep_steps"]
    out: dict[str | None, dict[str, dict[Any, list[dict]]]] = {}
    for r in summary["runs"]:
        if r["condition"] in settings and r["row"] in rows and r.get("job_steps", 0) == steps:
            out.setdefault(r["condition"], {}).setdefault(r["row"], {}).setdefault(
                float(r.get("lr_mult", 1.0)), []).append(r)
    # A shorter sweep: the setting's full-length x1 runs join the frontier as one more option,
    # keyed by a label (they are not candidates for "best lr", which compares equal budgets).
    for r in summary["runs"] if steps else []:
        if r["condition"] in out and r["row"] in out[r["condition"]] \
                and r.get("lr_mult", 1.0) == 1.0 and not r.get("job_steps"):
            out[r["condition"]][r["row"]].setdefault(f"x1, {r['steps']} steps", []).append(r)
    return {s: out[s] for s in settings if s in out}


def _lr_label(m: Any) -> str:
    return m if isinstance(m, str) else f"x{m:g}"


def _lr_order(m: Any) -> tuple[bool, str]:
    return isinstance(m, str), str(m)


def _score_at_kl(curve: list[dict[str, float]], k: float) -> float | None:
    """The held-out score where the run's training KL first reaches k (linear between evaluation
    points); None when it never does."""
    pts = [(p["kl"], p["heldout"]) for p in curve if math.isfinite(p["kl"])]
    for (k0, s0), (k1, s1) in zip(pts, pts[1:]):
        if k0 <= k <= k1 and k1 > k0:
            return s0 + (s1 - s0) * (k - k0) / (k1 - k0)
        if k0 == k:
            return s0
    return None


def frontier_levels(by_row: dict[str, dict[float, list[dict]]]) -> list[float]:
    """KL levels every method reaches: for each method, the largest KL that all seeds of one of
    its learning rates reach; the levels are 1/16, 1/8, 1/4, 1/2 and all of the smallest of those
    (halvings, to cover the low-KL end where the smaller learning rates live)."""
    reach = []
    for by_lr in by_row.values():
        best = 0.0
        for runs in by_lr.values():
            tops = [max((p["kl"] for p in r["curve"] if math.isfinite(p["kl"])), default=0.0)
                    for r in runs]
            best = max(best, min(tops) if tops else 0.0)
        reach.append(best)
    top = min(reach) if reach else 0.0
    return [top * f for f in (0.0625, 0.125, 0.25, 0.5, 1.0)] if top > 0 else []


def matched_kl(by_row: dict[str, dict[float, list[dict]]], k: float
               ) -> dict[str, tuple[float, list[float]]]:
    """row -> (best lr multiple, per-seed held-out scores at KL k): the lr whose seeds all reach k
    with the highest mean score there."""
    out = {}
    for row, by_lr in by_row.items():
        best = None
        for m, runs in sorted(by_lr.items(), key=lambda kv: _lr_order(kv[0])):
            vals = [_score_at_kl(r["curve"], k) for r in runs]
            if len(vals) < 2 or any(v is None for v in vals):
                continue
            if best is None or np.mean(vals) > np.mean(best[1]):
                best = (m, [float(v) for v in vals])
        if best is not None:
            out[row] = best
    return out

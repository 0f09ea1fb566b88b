"""What the study and its report share: the conditions a study can retrain in, and loading a model
by path. Apart from both so that the report does not import the study that calls it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

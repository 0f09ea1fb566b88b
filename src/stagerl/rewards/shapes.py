"""Shapes-world rewards: the exact evaluator behind the common reward signature.

- ``shapes_strict`` (the default reward of ``stagerl train``): 1 if the strict verdict passes;
- ``shapes_lenient``: 1 if GenEval's rules alone pass;
- ``shapes_partial``: GenEval's partial credit, ``variant`` "fixed" (default) or "parity".

Keyword arguments other than ``variant`` configure the world (:class:`WorldSpec` fields, e.g.
``canvas: 48``). An image the evaluator cannot read (wrong size, malformed metadata) is marked
``valid=False`` with the error in its details, so the trainer can count it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards.base import RewardOutput, register_reward
from stagerl.geneval import VARIANTS
from stagerl.worlds.shapes.evaluate import evaluate_image
from stagerl.worlds.shapes.spec import spec_from_kwargs

log = logging.getLogger(__name__)


class ShapesReward:
    """Scores images with the exact shapes-world evaluator; ``key`` picks the verdict field."""

    def __init__(self, name: str, key: str, variant: str = "fixed", **spec_kwargs: Any):
        if variant not in VARIANTS:
            raise UserError(f"reward {name}: variant must be one of {VARIANTS}, got {variant!r}")
        self.name = name
        self.key = key
        self.variant = variant
        self.spec = spec_from_kwargs(**spec_kwargs)

    def __call__(self, images: list[Image.Image], prompts: list[str],
                 metadata: list[dict[str, Any]]) -> RewardOutput:
        if not len(images) == len(prompts) == len(metadata):
            raise ValueError(f"{self.name}: got {len(images)} images, {len(prompts)} prompts and "
                             f"{len(metadata)} metadata entries")
        scores = np.zeros(len(images), dtype=np.float32)  # [N]
        valid = np.ones(len(images), dtype=bool)  # [N]
        details: list[dict[str, Any]] = []
        for i, (image, md) in enumerate(zip(images, metadata)):
            if not md.get("include"):  # e.g. a plain prompt list: nothing to check, not a 0
                valid[i] = False
                details.append({"error": "prompt has no GenEval metadata (no include clauses)"})
                continue
            try:
                v = evaluate_image(image, md, self.spec, self.variant)
            except (ValueError, UserError) as err:
                log.warning("%s: cannot score image %d: %s", self.name, i, err)
                valid[i] = False
                details.append({"error": str(err)})
                continue
            scores[i] = float(getattr(v, self.key))
            details.append({"strict": v.strict, "lenient": v.lenient, "score": v.score,
                            "reason": v.reason})
        return RewardOutput(scores=scores, valid=valid, details=details)


@register_reward("shapes_strict")
def shapes_strict(**kwargs: Any) -> ShapesReward:
    """1 if the image passes GenEval's rules with no unrequested objects and no fragments."""
    return ShapesReward("shapes_strict", "strict", **kwargs)


@register_reward("shapes_lenient")
def shapes_lenient(**kwargs: Any) -> ShapesReward:
    """1 if the image passes GenEval's rules alone."""
    return ShapesReward("shapes_lenient", "lenient", **kwargs)


@register_reward("shapes_partial")
def shapes_partial(**kwargs: Any) -> ShapesReward:
    """GenEval partial credit; ``variant`` "fixed" (default) or "parity" (docs/geneval.md)."""
    return ShapesReward("shapes_partial", "score", **kwargs)

"""Learned proxy rewards of the shapes world, behind the common reward signature.

- ``shapes_detector``: a learned detector (the analogue of the paper's GenEval reward) whose
  detections go through the same rule engine as the exact evaluator's; ``key`` picks its strict
  verdict (default), its lenient verdict or its partial credit;
- ``shapes_scorer``: a learned (image, prompt) -> P(strict passes) model (the analogue of HPS).

``weights``: ``builtin`` (the shipped proxy, assets/shapes/proxies/<name>/, with its CARD.md),
``builtin:<shipped name>`` or a folder written by ``stagerl pretrain-reward``. Other keyword
arguments configure the world (:class:`WorldSpec` fields), and a proxy built for another world is
refused. The exact verdicts are the *gold* reward: a proxy names them in ``gold``, and the
trainer logs them on the same images beside the proxy (docs/rewards.md, "Learned proxy rewards").
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from stagerl.data import PromptItem
from stagerl.errors import UserError
from stagerl.rewards.base import RewardOutput, register_reward
from stagerl.worlds.shapes.spec import spec_from_kwargs

GOLD = ("shapes_strict", "shapes_lenient")
KEYS = {"detector": ("strict", "lenient", "score"), "scorer": ("score", "strict")}


class ShapesProxyReward:
    """A proxy loaded lazily on first call; ``preflight`` checks its folder without loading."""

    gold = GOLD  # the exact rewards that judge this one (logged beside it)

    def __init__(self, name: str, weights: str, key: str, threshold: float,
                 **spec_kwargs: Any) -> None:
        from stagerl.proxies.proxy import PROXY_KINDS

        self.name = name
        self.kind = PROXY_KINDS[name]
        if key not in KEYS[self.kind]:
            raise UserError(f"reward.kwargs.{name}.key: must be one of {KEYS[self.kind]}, got "
                            f"{key!r}")
        if not 0.0 < float(threshold) < 1.0:
            raise UserError(f"reward.kwargs.{name}.threshold: must be in (0, 1), got "
                            f"{threshold!r}")
        self.weights, self.key, self.threshold = str(weights), key, float(threshold)
        self.spec = spec_from_kwargs(**spec_kwargs)
        self.gold_kwargs = dict(spec_kwargs)  # gold judges the same world
        self._proxy = None

    def preflight(self) -> None:
        from stagerl.proxies.proxy import read_proxy_meta

        read_proxy_meta(self.name, self.weights, self.spec)

    def _load(self):
        if self._proxy is None:
            from stagerl.proxies.proxy import load_proxy

            self._proxy = load_proxy(self.name, self.weights, self.spec)
        return self._proxy

    def __call__(self, images: list[Image.Image], prompts: list[str],
                 metadata: list[dict[str, Any]]) -> RewardOutput:
        if not len(images) == len(prompts) == len(metadata):
            raise ValueError(f"{self.name}: got {len(images)} images, {len(prompts)} prompts and "
                             f"{len(metadata)} metadata entries")
        proxy = self._load()
        n = len(images)
        valid = np.array([bool(md.get("include")) for md in metadata])  # [N]
        scores = np.zeros(n, dtype=np.float32)  # [N]
        details: list[dict[str, Any]] = [{} if v else {"error": "prompt has no GenEval metadata"}
                                         for v in valid]
        arrays = [np.asarray(im.convert("RGB")) for im in images]
        size = (self.spec.canvas, self.spec.canvas, 3)
        for i, a in enumerate(arrays):
            if valid[i] and a.shape != size:
                valid[i] = False
                details[i] = {"error": f"expected a {size[0]}x{size[1]} image, got {a.shape}"}
        idx = np.flatnonzero(valid)
        if len(idx):
            batch = np.stack([arrays[i] for i in idx])
            got = proxy.scores(batch, [PromptItem(prompts[i], metadata[i]) for i in idx],
                               self.threshold)
            for j, i in enumerate(idx):
                scores[i] = float(got[self.key][j])
                details[i] = {k: float(v[j]) for k, v in got.items()}
        return RewardOutput(scores=scores, valid=valid, details=details)


@register_reward("shapes_detector")
def shapes_detector(weights: str = "builtin", key: str = "strict", threshold: float = 0.5,
                    **spec_kwargs: Any) -> ShapesProxyReward:
    """A learned detector + GenEval's rules (strict verdict by default); ``threshold``: the
    objectness a peak needs to count as an object."""
    return ShapesProxyReward("shapes_detector", weights, key, threshold, **spec_kwargs)


@register_reward("shapes_scorer")
def shapes_scorer(weights: str = "builtin", key: str = "score", threshold: float = 0.5,
                  **spec_kwargs: Any) -> ShapesProxyReward:
    """A learned P(strict passes | image, prompt); ``key: strict`` rewards p > ``threshold``."""
    return ShapesProxyReward("shapes_scorer", weights, key, threshold, **spec_kwargs)

"""LAION aesthetic predictor.

The LAION "improved aesthetic predictor" (C. Schuhmann, github.com/christophschuhmann/
improved-aesthetic-predictor) is a small MLP on the L2-normalised CLIP ViT-L/14 image embedding,
trained to predict 1-10 ratings (SAC + LAION-Logos + AVA). Its layer stack, rebuilt here so that the
published ``sac+logos+ava1-l14-linearMSE.pth`` state dict loads as is:
``Linear(D,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16) Linear(16,1)``.
The prompt is ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from stagerl.errors import UserError
from stagerl.rewards._common import BatchedReward
from stagerl.rewards.base import register_reward
from stagerl.rewards.clip import ClipEmbedder
from stagerl.rewards.hps import load_state_dict, resolve_file

DEFAULT_HEAD = "camenduru/improved-aesthetic-predictor:sac+logos+ava1-l14-linearMSE.pth"


class AestheticHead(nn.Module):
    """The MLP; indices match the published checkpoint's ``layers.{0,2,4,6,7}`` keys."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1),
                                    nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N]
        return self.layers(emb).squeeze(-1)


@register_reward("aesthetic")
class AestheticReward(BatchedReward):
    """``aesthetic``: kwargs ``head_checkpoint`` (the MLP .pth, local or ``repo:file``),
    ``checkpoint`` (CLIP, default openai/clip-vit-large-patch14), ``scale`` (multiplies the 1-10
    score; 0.1 maps it to about [0, 1]), ``device``, ``dtype``, ``batch_size``."""

    name = "aesthetic"

    def __init__(self, head_checkpoint: str = DEFAULT_HEAD,
                 checkpoint: str = "openai/clip-vit-large-patch14", scale: float = 1.0,
                 device: str | None = "auto", dtype: str | None = "float32", batch_size: int = 32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.head_checkpoint, self.scale = head_checkpoint, float(scale)
        self.embedder = ClipEmbedder(checkpoint, None, self.device, self.dtype, self.name)
        self.head: AestheticHead | None = None

    requires = ("transformers",)

    def checkpoints(self) -> list[tuple[str, str, str]]:
        return [("head_checkpoint", self.head_checkpoint, "file"),
                ("checkpoint", self.embedder.checkpoint, "model")]

    def _load(self) -> None:
        sd = load_state_dict(resolve_file(self.head_checkpoint, self.name), self.name)
        self.embedder.load()
        dim = int(self.embedder.model.config.projection_dim)
        head = AestheticHead(dim)
        try:
            head.load_state_dict(sd)
        except RuntimeError as e:
            raise UserError(f"reward 'aesthetic': {self.head_checkpoint!r} does not fit an "
                            f"aesthetic head on {dim}-d CLIP embeddings: {e}") from e
        self.head = head.to(self.device).eval()

    @torch.no_grad()
    def _score_batch(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        assert self.head is not None
        emb = self.embedder.image_embeds(images)  # [N, D], unit norm (as the predictor expects)
        scores = self.head(emb.to(self.device)).float().cpu() * self.scale  # [N]
        return scores.tolist(), [{} for _ in images]

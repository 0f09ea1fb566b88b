"""CLIP-family scorers on transformers' ``CLIPModel``.

- ``clip_score``: cosine similarity of CLIP image and prompt embeddings, times ``scale`` (default 1,
  so the reward lies in [-1, 1]; Hessel et al.'s CLIPScore is ``2.5 * max(cos, 0)``).
- ``pickscore``: PickScore (Kirstain et al. 2023) = ``logit_scale.exp() * cos`` with the PickScore_v1
  weights and the CLIP-ViT-H-14 processor it was trained with. Typical values are about 18-23;
  Flow-GRPO divides by 26, which ``scale: 0.03846`` reproduces.

:class:`ClipEmbedder` is also used by the aesthetic predictor and the GenEval colour classifier.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from stagerl.rewards._common import BatchedReward, local_or_hub, require
from stagerl.rewards.base import register_reward

log = logging.getLogger(__name__)


def _features(out: Any) -> torch.Tensor:
    """transformers 4.x returns projected features as a tensor, 5.x as ``pooler_output``."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipEmbedder:
    """Loads a CLIPModel + processor lazily and returns L2-normalised embeddings."""

    def __init__(self, checkpoint: str, processor: str | None, device: torch.device,
                 dtype: torch.dtype, reward: str):
        self.checkpoint = local_or_hub(checkpoint, reward)
        self.processor_id = local_or_hub(processor, reward) if processor else self.checkpoint
        self.device, self.dtype, self.reward = device, dtype, reward
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> None:
        transformers = require("transformers", self.reward)
        self.processor = transformers.AutoProcessor.from_pretrained(self.processor_id)
        self.model = transformers.CLIPModel.from_pretrained(self.checkpoint, dtype=self.dtype)
        self.model.to(self.device).eval()

    @property
    def max_text_len(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, D] fp32, unit norm."""
        px = self.processor(images=images, return_tensors="pt")["pixel_values"]  # [N, 3, H, W]
        feats = _features(self.model.get_image_features(
            pixel_values=px.to(self.device, self.dtype)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """[N, D] fp32, unit norm. Prompts longer than the text tower are truncated (CLIP: 77)."""
        tok = self.processor.tokenizer(texts, padding=True, truncation=True,
                                       max_length=self.max_text_len, return_tensors="pt")
        feats = _features(self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


class _ClipReward(BatchedReward):
    default_checkpoint = ""
    default_processor: str | None = None
    use_logit_scale = False

    def __init__(self, checkpoint: str | None = None, processor: str | None = None,
                 scale: float = 1.0, device: str | None = "auto", dtype: str | None = "float32",
                 batch_size: int = 32):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.scale = float(scale)
        ckpt = checkpoint or self.default_checkpoint
        proc = processor or (None if checkpoint else self.default_processor)
        self.embedder = ClipEmbedder(ckpt, proc, self.device, self.dtype, self.name)

    requires = ("transformers",)

    def checkpoints(self) -> list[tuple[str, str, str]]:
        e = self.embedder
        return [("checkpoint", e.checkpoint, "model")] + (
            [("processor", e.processor_id, "processor")] if e.processor_id != e.checkpoint else [])

    def _load(self) -> None:
        self.embedder.load()

    def _score_batch(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        img = self.embedder.image_embeds(images)  # [N, D]
        txt = self.embedder.text_embeds(prompts)  # [N, D]
        cos = (img * txt).sum(-1)  # [N]
        factor = self.embedder.logit_scale() if self.use_logit_scale else 1.0
        scores = (cos * factor * self.scale).tolist()
        return scores, [{"cosine": float(c)} for c in cos]


@register_reward("clip_score")
class ClipScore(_ClipReward):
    """``clip_score``: kwargs ``checkpoint`` (default openai/clip-vit-large-patch14),
    ``processor`` (default: the checkpoint), ``scale``, ``device``, ``dtype``, ``batch_size``."""

    name = "clip_score"
    default_checkpoint = "openai/clip-vit-large-patch14"


@register_reward("pickscore")
class PickScore(_ClipReward):
    """``pickscore``: kwargs ``checkpoint`` (default yuvalkirstain/PickScore_v1), ``processor``
    (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K), ``scale``, ``device``, ``dtype``,
    ``batch_size``."""

    name = "pickscore"
    default_checkpoint = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    use_logit_scale = True

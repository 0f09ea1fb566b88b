"""HPS v2.1 (Wu et al. 2023, "Human Preference Score v2") as a reward.

HPS v2.1 is an open_clip ViT-H-14 fine-tuned on human preferences. Its score is the cosine similarity
of the normalised image and prompt embeddings (no logit scale), typically 0.2-0.35. The STAGE paper
trains with it beside GIT VQA and GroundingDINO.

Checkpoint: ``HPS_v2.1_compressed.pt`` from the hub repo ``xswu/HPSv2`` (the whole CLIP model, so
no LAION weights are needed). ``checkpoint`` is a local file (.pt/.pth/.bin or .safetensors) or
``<repo id>:<filename>`` fetched with huggingface_hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards._common import BatchedReward, require
from stagerl.rewards.base import register_reward

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "xswu/HPSv2:HPS_v2.1_compressed.pt"


def resolve_file(checkpoint: str, reward: str) -> Path:
    """A local file, or ``repo_id:filename`` downloaded (or read from the cache) via the hub."""
    p = Path(checkpoint).expanduser()
    if p.is_file():
        return p
    if ":" in checkpoint and not p.exists():
        repo, filename = checkpoint.split(":", 1)
        hub = require("huggingface_hub", reward)
        try:
            return Path(hub.hf_hub_download(repo_id=repo, filename=filename))
        except Exception as e:  # noqa: BLE001 - offline, missing repo, ...
            raise UserError(f"reward {reward!r}: cannot fetch {filename!r} from hub repo {repo!r} "
                            f"({type(e).__name__}: {e}); download it and pass its local path as "
                            "checkpoint") from e
    raise UserError(f"reward {reward!r}: checkpoint {checkpoint!r} is neither a file nor "
                    "'<hub repo>:<filename>'")


def load_state_dict(path: Path, reward: str, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Tensors only by default (``weights_only=True``): a checkpoint is not allowed to run code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as e:  # noqa: BLE001 - pickle refusing non-tensor objects, corrupt file
        raise UserError(f"reward {reward!r}: cannot load {path} ({type(e).__name__}: {e}). If you "
                        "trust this file, set trust_checkpoint: true") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise UserError(f"reward {reward!r}: {path} holds no state dict")
    # Checkpoints saved from DistributedDataParallel prefix every key with 'module.'.
    return {k.removeprefix("module."): v for k, v in sd.items()}


@register_reward("hps")
class HpsReward(BatchedReward):
    """``hps``: kwargs ``checkpoint`` (default ``xswu/HPSv2:HPS_v2.1_compressed.pt``),
    ``model_name`` (open_clip architecture, default ViT-H-14), ``model_config`` (optional path of
    an open_clip JSON config to register first, for custom or test architectures),
    ``trust_checkpoint`` (allow non-tensor pickles), ``device``, ``dtype``, ``batch_size``."""

    name = "hps"

    def __init__(self, checkpoint: str = DEFAULT_CHECKPOINT, model_name: str = "ViT-H-14",
                 model_config: str | None = None, trust_checkpoint: bool = False,
                 device: str | None = "auto", dtype: str | None = "float32", batch_size: int = 16):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.checkpoint, self.model_name = checkpoint, model_name
        self.model_config, self.trust_checkpoint = model_config, bool(trust_checkpoint)
        self.model: Any = None
        self.preprocess: Any = None
        self.tokenizer: Any = None

    requires = ("open_clip",)

    def checkpoints(self) -> list[tuple[str, str, str]]:
        return [("checkpoint", self.checkpoint, "file")]

    def _load(self) -> None:
        open_clip = require("open_clip", self.name)
        path = resolve_file(self.checkpoint, self.name)  # fail fast, before building the model
        if self.model_config:
            if not Path(self.model_config).is_file():
                raise UserError(f"reward 'hps': model_config {self.model_config!r} is not a file")
            open_clip.add_model_config(self.model_config)
        # pretrained=None: the HPS checkpoint holds the whole model, so nothing else is fetched.
        model, _, preprocess = open_clip.create_model_and_transforms(self.model_name,
                                                                     pretrained=None)
        sd = load_state_dict(path, self.name, self.trust_checkpoint)
        model.load_state_dict(sd)
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(self.model_name)

    @torch.no_grad()
    def _score_batch(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        px = torch.stack([self.preprocess(im) for im in images])  # [N, 3, H, W]
        ids = self.tokenizer(prompts)  # [N, context_length]
        img = self.model.encode_image(px.to(self.device, self.dtype), normalize=True)  # [N, D]
        txt = self.model.encode_text(ids.to(self.device), normalize=True)  # [N, D]
        scores = (img.float() * txt.float()).sum(-1).cpu()  # [N] cosine = HPS score
        return scores.tolist(), [{} for _ in images]

"""Logging as a service (architecture.md, principle 9): namespaced metrics to JSONL + TensorBoard
(+ W&B when asked), and prompt-labelled image grids. Only the main process writes."""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)


class Tracker:
    """Writes ``metrics.jsonl`` (one object per logged step) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "stagerl", config: dict | None = None,
                 enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                from stagerl.errors import UserError

                raise UserError("log.wandb=true needs the 'wandb' extra: "
                                "pip install 'stagerl[wandb]'") from None
            self._wandb = wb.init(project=wandb_project, dir=str(self.run_dir), config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            if isinstance(v, (int, float)) and self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def image(self, step: int, tag: str, grid: Image.Image) -> Path | None:
        if not self.enabled:
            return None
        out = self.run_dir / "images" / f"{tag}_step{step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
        if self._tb is not None:
            import numpy as np

            self._tb.add_image(tag, np.asarray(grid), step, dataformats="HWC")
        return out

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def image_grid(images: list[Image.Image], labels: list[str], cols: int, scale: int = 4,
               label_height: int = 28) -> Image.Image:
    """Images in a grid, each upscaled ``scale``x (nearest) with a wrapped prompt label above."""
    if not images:
        return Image.new("RGB", (1, 1), "white")
    w, h = images[0].width * scale, images[0].height * scale
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * w, rows * (h + label_height)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    chars = max(8, w // 6)
    for k, (img, label) in enumerate(zip(images, labels)):
        x, y = (k % cols) * w, (k // cols) * (h + label_height)
        canvas.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (x, y + label_height))
        text = "\n".join(textwrap.wrap(label, chars)[:2])
        draw.text((x + 2, y + 1), text, fill="black", font=font)
    return canvas

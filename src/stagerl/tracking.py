"""Logging as a service (docs/design.md §9): namespaced metrics to JSONL + TensorBoard
(+ W&B when asked), and prompt-labelled image grids. Only the main process writes."""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)


WANDB_OFFLINE_MODES = ("offline", "disabled", "dryrun")


def check_tracker(wandb: bool) -> None:
    """Before the model loads: with ``log.wandb=true``, W&B is installed, and either runs without
    a server (WANDB_MODE=offline or disabled) or has an API key (WANDB_API_KEY, or one stored by
    ``wandb login``) and its server answers within a few seconds. One UserError saying how to run
    offline; otherwise ``wandb.init`` fails only after the model loaded (no key: a traceback; no
    network: minutes of retries)."""
    from stagerl.errors import UserError
    from stagerl.preflight import NETWORK_TIMEOUT, check_module, probe_url

    if not wandb:
        return
    check_module("wandb", "log.wandb=true", "wandb")
    offline = ("run offline with WANDB_MODE=offline (and upload later with wandb sync "
               "<run folder>/wandb/offline-run-*), or set log.wandb=false")
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in WANDB_OFFLINE_MODES:
        return
    if mode and mode != "online":
        raise UserError(f"log.wandb=true: WANDB_MODE={mode!r} is not one of online, "
                        f"{', '.join(WANDB_OFFLINE_MODES)}")
    base = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").rstrip("/")
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(base):
        raise UserError(f"log.wandb=true: no W&B API key (WANDB_API_KEY is unset and wandb login "
                        f"stored none for {base}); run wandb login, or {offline}")
    status, why = probe_url(base, timeout=NETWORK_TIMEOUT)
    if status is None:
        raise UserError(f"log.wandb=true: the W&B server {base} did not answer within "
                        f"{NETWORK_TIMEOUT:g} s ({why}); {offline}")


def _netrc_has(base_url: str) -> bool:
    """``wandb login`` stores the key in the netrc file ($NETRC or ~/.netrc) under the host."""
    import netrc
    from urllib.parse import urlparse

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(urlparse(base_url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """Writes ``metrics.jsonl`` (one object per logged step) and TensorBoard scalars.

    An existing metrics.jsonl belongs to the run being resumed: rows after its newest complete
    checkpoint (steps that will run again) and a torn last line are dropped before appending, so
    a resumed run never holds a step twice.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "stagerl", config: dict | None = None,
                 enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rewind_metrics(self.run_dir)
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


def mean_around(logged: dict[int, float], step: int, window: int) -> float:
    """Mean of the values logged at steps step + 1 - window .. step + window: the training-time
    value around an evaluation made after ``step`` updates (the policy evaluated after s updates
    sampled the rollout logged at step s + 1). 0 at step 0 (the base model), NaN when none."""
    near = [logged[t] for t in range(step + 1 - window, step + window + 1) if t in logged]
    return 0.0 if step == 0 else (sum(near) / len(near) if near else float("nan"))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl. A torn last line (a write cut short by a kill) is
    dropped with a warning; a bad line before it is a UserError naming the line."""
    from stagerl.errors import UserError

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:
            if i == last:
                log.warning("%s: dropping the torn last line %d", path, i + 1)
                break
            raise UserError(f"{path}:{i + 1}: not a metrics row ({err})") from None
        rows.append(row)
    return rows


def rewind_metrics(run_dir: Path) -> None:
    """Keep only the rows up to the newest complete checkpoint (none: no rows), rewritten
    atomically; the steps after it will be logged again by the resumed run."""
    from stagerl.checkpoint import checkpoint_step, latest_checkpoint

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    keep = checkpoint_step(ckpt) if ckpt is not None else -1
    rows = [r for r in read_metrics(run_dir) if r["step"] <= keep]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def image_grid(images: list[Image.Image], labels: list[str], cols: int, scale: int = 4,
               label_height: int = 28) -> Image.Image:
    """Images in a grid, each upscaled ``scale``x (nearest) with its whole label wrapped above it
    (the label band grows to fit the longest label; ``label_height`` is its minimum)."""
    if not images:
        return Image.new("RGB", (1, 1), "white")
    w, h = images[0].width * scale, images[0].height * scale
    font = ImageFont.load_default()
    char_w = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    line_h = font.getbbox("Ag")[3] + 2
    wrapped = [textwrap.wrap(label, max(8, int((w - 4) / char_w))) for label in labels]
    label_height = max(label_height, max(len(t) for t in wrapped) * line_h + 4)
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * w, rows * (h + label_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (img, text) in enumerate(zip(images, wrapped)):
        x, y = (k % cols) * w, (k // cols) * (h + label_height)
        canvas.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (x, y + label_height))
        for j, line in enumerate(text):
            draw.text((x + 2, y + 1 + j * line_h), line, fill="black", font=font)
    return canvas

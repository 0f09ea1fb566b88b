"""Shared plumbing for the learned reward back ends.

- :func:`require` imports an optional dependency and turns a missing one into a :class:`UserError`
  that names the extra (``pip install stagerl[rewards]``), so reward modules import without them.
- :class:`BatchedReward` implements the reward contract once: input checks, lazy loading, batching,
  and per-image failure isolation. A batch that raises is retried one image at a time, so one bad
  image becomes ``valid=False`` with the error in its details (and a log line), never a crash and
  never a silent 0.
- Device/dtype resolution and hub-or-local checkpoint helpers.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.preflight import check_hub_ref, check_module
from stagerl.rewards.base import RewardOutput

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'stagerl[rewards]'"


def require(module: str, reward: str, extra: str = "rewards") -> Any:
    """Import ``module`` or raise a UserError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # ModuleNotFoundError, or a broken binary dependency
        raise UserError(f"reward {reward!r} needs the Python package {module!r}, which could not be "
                        f"imported ({e}). Install it with: pip install 'stagerl[{extra}]'") from e


def check_choice(reward: str, kwarg: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a UserError naming the reward and the kwarg."""
    if value not in choices:
        raise UserError(f"reward {reward!r}: {kwarg} must be one of "
                        f"{', '.join(repr(c) for c in choices)}, got {value!r}")
    return str(value)


def resolve_device(device: str | None) -> torch.device:
    """'auto'/None -> cuda if visible else cpu; anything else is passed to torch.device."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"invalid reward device {device!r}: {e}") from e


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"invalid reward dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def local_or_hub(checkpoint: str, what: str) -> str:
    """Return ``checkpoint`` unchanged, after checking a path-looking value exists.

    transformers' ``from_pretrained`` accepts both local directories and hub ids; a value that
    looks like a filesystem path (absolute, ./, ~) but does not exist is a user error we can name
    now rather than a confusing hub lookup failure later.
    """
    p = Path(checkpoint).expanduser()
    looks_local = checkpoint.startswith(("/", "./", "../", "~")) or p.exists()
    if looks_local and not p.exists():
        raise UserError(f"{what} checkpoint {checkpoint!r} does not exist")
    return str(p) if looks_local else checkpoint


def to_rgb(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class BatchedReward:
    """Base class: subclasses implement ``_load()`` and ``_score_batch``.

    ``_score_batch(images, prompts, metadata) -> (scores: list[float], details: list[dict])``
    scores a chunk of at most ``batch_size`` items. It may raise; the chunk is then retried item by
    item and only the failing items are marked invalid.
    """

    name = "batched"
    requires: tuple[str, ...] = ()  # Python modules ``_load`` imports (checked by preflight)

    def __init__(self, batch_size: int = 16, device: str | None = "auto",
                 dtype: str | None = "float32"):
        if int(batch_size) < 1:
            raise UserError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self._loaded = False
        self._lock = threading.Lock()  # the reward server calls rewards from several threads

    # -- subclass API ------------------------------------------------------------------------
    def _load(self) -> None:  # pragma: no cover - trivial default
        """Load heavy models (called once, on first use)."""

    def _score_batch(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        raise NotImplementedError

    def checkpoints(self) -> list[tuple[str, str, str]]:
        """(kwarg, value, kind) of every checkpoint ``_load`` reads; kind is 'model' (a
        transformers folder or hub id), 'processor' (one with preprocessor_config.json) or 'file'
        (a file or ``<hub repo>:<filename>``). :meth:`preflight` resolves each one."""
        return []

    def preflight(self) -> None:
        """Before the policy loads: the ``requires`` packages are installed and every checkpoint
        resolves (a local path exists; a hub id is cached, or answered by the hub when it may be
        downloaded). Loads nothing."""
        what = f"reward {self.name!r}"
        for module in self.requires:
            check_module(module, what, "rewards")
        for kwarg, ref, kind in self.checkpoints():
            check_hub_ref(ref, f"reward.kwargs.{self.name}.{kwarg}", what, file=kind == "file",
                          needs="preprocessor_config.json" if kind == "processor"
                          else "config.json")

    # -- contract ----------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if not self._loaded:
            self._load()
            self._loaded = True

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str],
                 metadata: Sequence[dict[str, Any]] | None = None) -> RewardOutput:
        n = len(images)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"reward {self.name!r}: {n} images, {len(prompts)} prompts and "
                             f"{len(metadata)} metadata entries must match")
        with self._lock:
            # A load failure (missing extra, bad checkpoint) is a configuration error: raise it.
            self.ensure_loaded()
            scores = [0.0] * n
            valid = [True] * n
            details: list[dict[str, Any]] = [{} for _ in range(n)]
            for lo in range(0, n, self.batch_size):
                idx = list(range(lo, min(n, lo + self.batch_size)))
                self._score_chunk(idx, images, prompts, metadata, scores, valid, details)
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32),
                            valid=torch.tensor(valid), details=details)

    def _score_chunk(self, idx: list[int], images: Sequence[Any], prompts: Sequence[str],
                     metadata: list[dict[str, Any]], scores: list[float], valid: list[bool],
                     details: list[dict[str, Any]]) -> None:
        try:
            s, d = self._score_batch([to_rgb(images[i]) for i in idx], [prompts[i] for i in idx],
                                     [dict(metadata[i] or {}) for i in idx])
            for j, i in enumerate(idx):
                scores[i], details[i] = float(s[j]), d[j]
            return
        except Exception as e:  # noqa: BLE001 - isolate the failing item(s) below
            if len(idx) == 1:
                i = idx[0]
                log.warning("reward %s failed on image %d: %s: %s", self.name, i,
                            type(e).__name__, e)
                scores[i], valid[i] = 0.0, False
                details[i] = {"error": f"{type(e).__name__}: {e}"}
                return
        for i in idx:  # the batch failed: retry one at a time so only bad items are lost
            self._score_chunk([i], images, prompts, metadata, scores, valid, details)

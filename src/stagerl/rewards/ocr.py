"""OCR reward: does the image show the prompt's quoted text?

Back end: rapidocr, whose PP-OCR ONNX weights ship inside its wheel, so it runs offline
(docs/development.md, "Offline reward models").

Reward, following Flow-GRPO's ``flow_grpo/ocr.py`` (used by the STAGE paper for its OCR task):
- target = the quoted part of the prompt ('...', "..." or “...”); ``metadata["text"]`` wins if set;
- both the target and the recognised text (all lines joined) are normalised;
- if the target occurs inside the recognised text, the distance is 0 (Flow-GRPO's rule);
- reward = 1 - min(levenshtein(recognised, target), len(target)) / len(target), in [0, 1].

Normalisation: Flow-GRPO lower-cases and removes spaces. We also drop punctuation by default
(``strip_punctuation=True``) so an OCR engine's stray quote or full stop does not cost a character;
set it to False for the exact Flow-GRPO rule.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from typing import Any

import numpy as np
from PIL import Image

from stagerl.rewards._common import BatchedReward, require
from stagerl.rewards.base import register_reward

log = logging.getLogger(__name__)

# Straight double, straight single, curly double and curly single quotes (in that order of
# preference). The single-quote pattern requires a non-letter before the opening quote so that an
# apostrophe ("a cat's sign") does not open a quote.
_QUOTE_PATTERNS = (r'"([^"]+)"', r"\u201c([^\u201d]+)\u201d", r"(?:^|(?<=[^\w]))'([^']+)'",
                   r"\u2018([^\u2019]+)\u2019")


def extract_target_text(prompt: str) -> str | None:
    """The first quoted span of ``prompt``, or None when nothing is quoted."""
    for pat in _QUOTE_PATTERNS:
        m = re.search(pat, prompt)
        if m and m.group(1).strip():
            return m.group(1)
    return None


def normalize_text(text: str, strip_punctuation: bool = True) -> str:
    """Lower-case, drop all whitespace and (optionally) all punctuation."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if not ch.isspace())
    if strip_punctuation:
        text = "".join(ch for ch in text
                       if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return text


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert/delete/substitute cost 1); two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognized: str, target: str, *, strip_punctuation: bool = True,
              substring_is_exact: bool = True) -> float:
    """1 - min(dist, len)/len on normalised strings (Flow-GRPO's OCR reward)."""
    t = normalize_text(target, strip_punctuation)
    r = normalize_text(recognized, strip_punctuation)
    if not t:
        raise ValueError(f"target text {target!r} is empty after normalisation")
    dist = 0 if (substring_is_exact and t in r) else levenshtein(r, t)
    return 1.0 - min(dist, len(t)) / len(t)


@register_reward("ocr")
class OcrReward(BatchedReward):
    """``ocr``: edit-distance reward between rapidocr's reading and the prompt's quoted text.

    kwargs: ``strip_punctuation`` (True), ``substring_is_exact`` (True, Flow-GRPO),
    ``min_confidence`` (0: keep every recognised line), ``num_threads`` (onnxruntime intra-op
    threads; -1 = its default, all cores), ``det_limit_side_len`` (detector input's longest side,
    default 960; 0 keeps rapidocr's short-side-736 rule), ``batch_size``. rapidocr runs on CPU through
    onnxruntime; ``device``/``dtype`` are accepted and ignored.
    """

    name = "ocr"

    def __init__(self, strip_punctuation: bool = True, substring_is_exact: bool = True,
                 min_confidence: float = 0.0, num_threads: int = -1,
                 det_limit_side_len: int = 960, batch_size: int = 16,
                 device: str | None = "cpu",
                 dtype: str | None = "float32"):
        super().__init__(batch_size=batch_size, device="cpu", dtype="float32")
        self.strip_punctuation = bool(strip_punctuation)
        self.substring_is_exact = bool(substring_is_exact)
        self.min_confidence = float(min_confidence)
        self.num_threads = int(num_threads)
        self.det_limit_side_len = int(det_limit_side_len)
        self._engine: Any = None

    requires = ("rapidocr",)

    def _load(self) -> None:
        rapidocr = require("rapidocr", self.name)
        # No text-angle classifier, as Flow-GRPO (use_angle_cls=False): rendered prompts are
        # upright, and it saves a model call per line.
        # rapidocr's default resizes the *short* side up to 736 px before detection; generated
        # images are small, so cap the *long* side instead (``det_limit_side_len``, 0 = default).
        params: dict[str, Any] = {"Global.use_cls": False, "Global.log_level": "warning",
                  "EngineConfig.onnxruntime.intra_op_num_threads": self.num_threads}
        if self.det_limit_side_len > 0:
            params.update({"Det.limit_type": "max", "Det.limit_side_len": self.det_limit_side_len})
        self._engine = rapidocr.RapidOCR(params=params)

    def read(self, image: Image.Image) -> tuple[str, list[dict[str, Any]]]:
        """All recognised lines joined (reading order as rapidocr returns them) + per-line info."""
        self.ensure_loaded()
        out = self._engine(np.asarray(image.convert("RGB")))
        txts = list(out.txts or ())
        confs = [float(c) for c in (out.scores or ())] or [1.0] * len(txts)
        lines = [{"text": t, "conf": c} for t, c in zip(txts, confs)]
        return "".join(ln["text"] for ln in lines if ln["conf"] >= self.min_confidence), lines

    def _score_batch(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        scores, details = [], []
        for img, prompt, meta in zip(images, prompts, metadata):
            target = meta.get("text") or extract_target_text(prompt)
            if target is None:
                raise ValueError(f"no quoted target text in prompt {prompt!r} "
                                 "(quote it, or set metadata['text'])")
            text, _ = self.read(img)
            scores.append(ocr_score(text, target, strip_punctuation=self.strip_punctuation,
                                    substring_is_exact=self.substring_is_exact))
            details.append({"target": target, "recognized": text})
        return scores, details

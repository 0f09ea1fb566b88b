"""GenEval's learned back end without mmdet.

The original GenEval evaluator needs mmdet 2.x + mmcv-full + CUDA to run a Mask2Former COCO model
(reward-server issues #5 and #8, geneval #8 are installation failures). Here any transformers
detector does the detection, chosen by its config's ``model_type``:

- ``mask2former``: instance segmentation over the 80 COCO classes (closest to the original, which
  used Mask2Former Swin-S COCO instance); boxes are the masks' bounding boxes;
- ``owlv2`` / ``owlvit`` / ``grounding-dino``: open-vocabulary detectors queried with the classes
  named in the prompt's metadata (no masks: colours are read from the box crop).

Colours follow the original protocol: paste the object's mask on a #999 grey background, crop to the
box, and classify the crop zero-shot with CLIP over GenEval's 10 colours, averaging three text
templates per colour. The detections then go through :mod:`stagerl.geneval`, the same
rules the shapes world uses.

Scores are not identical to the mmdet original: every result records its back end
(``details["backend"]``) so a reported number can say where it came from.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards._common import BatchedReward, local_or_hub, require
from stagerl.rewards.base import register_reward
from stagerl.rewards.clip import ClipEmbedder
from stagerl.geneval import (Detection, evaluate_detections, filter_detections,
                             parse_clauses)

log = logging.getLogger(__name__)

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# GenEval's colour templates (evaluation/evaluate_images.py), one classifier per object class.
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}",
                   "a photo of a {c} object")
# transformers' COCO label names -> GenEval's class names (object_names.txt).
COCO_ALIASES = {"keyboard": "computer keyboard", "mouse": "computer mouse", "remote": "tv remote",
                "tvmonitor": "tv", "tv monitor": "tv", "sofa": "couch", "diningtable": "dining table",
                "pottedplant": "potted plant", "motorbike": "motorcycle", "aeroplane": "airplane",
                "hair dryer": "hair drier", "cellphone": "cell phone"}
OPEN_VOCAB = ("owlv2", "owlvit", "grounding-dino")
DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_COLOR_MODEL = "openai/clip-vit-large-patch14"


def canonical_label(label: str) -> str:
    key = label.strip().lower().replace("_", " ")
    return COCO_ALIASES.get(key, key)


def box_of_mask(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a [H, W] bool mask, exclusive max like a pixel box."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def match_phrase(phrase: str, classes: Sequence[str]) -> str | None:
    """Map a grounded phrase back to one queried class (exact, else the longest contained name)."""
    p = phrase.strip().lower()
    if p in classes:
        return p
    hits = [c for c in classes if c in p or (p and p in c)]
    return max(hits, key=len) if hits else None


class ObjectDetector:
    """A transformers detector behind one call: ``detect(images, classes) -> detections``."""

    def __init__(self, checkpoint: str, device: torch.device, dtype: torch.dtype, reward: str,
                 score_floor: float = 0.3, text_threshold: float = 0.25):
        self.checkpoint = local_or_hub(checkpoint, reward)
        self.device, self.dtype, self.reward = device, dtype, reward
        self.score_floor, self.text_threshold = float(score_floor), float(text_threshold)
        self.kind = ""
        self.model: Any = None
        self.processor: Any = None

    def load(self) -> None:
        tf = require("transformers", self.reward)
        self.kind = tf.AutoConfig.from_pretrained(self.checkpoint).model_type
        if self.kind == "mask2former":
            self.processor = tf.AutoImageProcessor.from_pretrained(self.checkpoint)
            model_cls = tf.Mask2FormerForUniversalSegmentation
        elif self.kind in OPEN_VOCAB:
            self.processor = tf.AutoProcessor.from_pretrained(self.checkpoint)
            model_cls = tf.AutoModelForZeroShotObjectDetection
        else:
            raise UserError(f"reward {self.reward!r}: detector {self.checkpoint!r} is a "
                            f"{self.kind!r} model; use mask2former or one of {OPEN_VOCAB}")
        self.model = model_cls.from_pretrained(self.checkpoint, dtype=self.dtype)
        self.model.to(self.device).eval()

    @property
    def open_vocabulary(self) -> bool:
        return self.kind in OPEN_VOCAB

    @torch.no_grad()
    def detect(self, images: list[Image.Image],
               classes: list[list[str]]) -> list[list[Detection]]:
        """Detections per image; ``classes[i]`` are the queries for open-vocabulary models."""
        if self.kind == "mask2former":
            return self._mask2former(images)
        return [self._open_vocab(im, cls) if cls else [] for im, cls in zip(images, classes)]

    def _mask2former(self, images: list[Image.Image]) -> list[list[Detection]]:
        inputs = self.processor(images=images, return_tensors="pt")
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        sizes = [(im.height, im.width) for im in images]
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.score_floor, target_sizes=sizes, return_binary_maps=True)
        id2label = self.model.config.id2label
        out = []
        for res in results:
            maps = res["segmentation"]  # [K, H, W] binary maps, one per segment (or None)
            dets = []
            for k, seg in enumerate(res["segments_info"]):
                mask = maps[k].cpu().numpy().astype(bool) if maps is not None else None
                if mask is None or not mask.any():
                    continue
                dets.append(Detection(label=canonical_label(id2label[int(seg["label_id"])]),
                                      box=box_of_mask(mask), score=float(seg["score"]), mask=mask))
            out.append(dets)
        return out

    def _open_vocab(self, image: Image.Image, classes: list[str]) -> list[Detection]:
        if self.kind == "grounding-dino":
            # GroundingDINO expects lower-case phrases each ending with a full stop.
            inputs = self.processor(images=image, text=". ".join(classes) + ".",
                                    return_tensors="pt")
        else:  # OWL-ViT convention: "a photo of a <class>"
            inputs = self.processor(images=image, text=[[f"a photo of a {c}" for c in classes]],
                                    return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if torch.is_tensor(v)}
        outputs = self.model(**inputs)
        if self.kind == "owlv2":
            # OWLv2 pads to a square at the bottom/right; boxes are relative to that square.
            side = max(image.height, image.width)
            size = (side, side)
        else:
            size = (image.height, image.width)
        if self.kind == "grounding-dino":
            res = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.score_floor,
                text_threshold=self.text_threshold, target_sizes=[size])[0]
            phrases = res["text_labels"] if "text_labels" in res else res["labels"]
            labels = [match_phrase(str(p), classes) for p in phrases]
        else:
            res = self.processor.post_process_grounded_object_detection(
                outputs, threshold=self.score_floor, target_sizes=[size])[0]
            labels = [classes[int(i)] for i in res["labels"]]
        dets = []
        for label, box, score in zip(labels, res["boxes"].tolist(), res["scores"].tolist()):
            if label is None:
                continue
            x0, y0, x1, y1 = (max(0.0, min(float(v), float(lim))) for v, lim in
                              zip(box, (image.width, image.height) * 2))
            if x1 > x0 and y1 > y0:
                dets.append(Detection(label=label, box=(x0, y0, x1, y1), score=float(score)))
        return dets


def color_crop(image: Image.Image, det: Detection) -> Image.Image:
    """GenEval's colour input: the mask pasted on #999 grey, cropped to the box."""
    if det.mask is not None:
        mask = Image.fromarray(det.mask.astype(np.uint8) * 255, mode="L")
        image = Image.composite(image, Image.new("RGB", image.size, "#999999"), mask)
    x0, y0, x1, y1 = (int(round(v)) for v in det.box)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    return image.crop((x0, y0, x1, y1))


class ColorClassifier:
    """CLIP zero-shot colour over :data:`COLORS` with GenEval's three templates per class."""

    def __init__(self, embedder: ClipEmbedder):
        self.embedder = embedder
        self._heads: dict[str, torch.Tensor] = {}  # class name -> [10, D] unit text embeddings

    def head(self, obj: str) -> torch.Tensor:
        if obj not in self._heads:
            per_template = [self.embedder.text_embeds([t.format(c=c, obj=obj) for c in COLORS])
                            for t in COLOR_TEMPLATES]  # T x [10, D]
            mean = torch.stack(per_template).mean(0)  # [10, D]
            self._heads[obj] = torch.nn.functional.normalize(mean, dim=-1)
        return self._heads[obj]

    def classify(self, crops: list[Image.Image], objs: list[str]) -> list[str]:
        if not crops:
            return []
        img = self.embedder.image_embeds(crops)  # [M, D]
        return [COLORS[int((self.head(o) @ img[k]).argmax())] for k, o in enumerate(objs)]


@register_reward("geneval")
class GenEvalReward(BatchedReward):
    """``geneval``: learned detector + CLIP colour -> GenEval rules.

    kwargs: ``checkpoint`` (detector; default Mask2Former Swin-S COCO instance),
    ``color_checkpoint`` (CLIP; default openai/clip-vit-large-patch14), ``mode`` ('partial' =
    training reward, 'strict' = the 0/1 benchmark verdict), ``variant`` ('fixed' or 'parity'),
    ``honour_exclude`` (fixed variant only), ``score_floor`` (detector threshold, default 0.3 as
    GenEval), ``text_threshold`` (GroundingDINO), ``device``, ``dtype``, ``batch_size``.
    """

    name = "geneval"

    def __init__(self, checkpoint: str = DEFAULT_DETECTOR,
                 color_checkpoint: str = DEFAULT_COLOR_MODEL, mode: str = "partial",
                 variant: str = "fixed", honour_exclude: bool = True, score_floor: float = 0.3,
                 text_threshold: float = 0.25, device: str | None = "auto",
                 dtype: str | None = "float32", batch_size: int = 8):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if mode not in ("partial", "strict"):
            raise UserError(f"reward 'geneval': mode must be 'partial' or 'strict', got {mode!r}")
        if variant not in ("fixed", "parity"):
            raise UserError(f"reward 'geneval': variant must be 'fixed' or 'parity', got {variant!r}")
        self.mode, self.variant, self.honour_exclude = mode, variant, bool(honour_exclude)
        self.detector = ObjectDetector(checkpoint, self.device, self.dtype, self.name,
                                       score_floor, text_threshold)
        self.colors = ColorClassifier(ClipEmbedder(color_checkpoint, None, self.device,
                                                   self.dtype, self.name))

    requires = ("transformers",)

    def checkpoints(self) -> list[tuple[str, str, str]]:
        return [("checkpoint", self.detector.checkpoint, "model"),
                ("color_checkpoint", self.colors.embedder.checkpoint, "model")]

    @property
    def backend(self) -> str:
        return f"{self.detector.kind or 'detector'}:{self.detector.checkpoint}"

    def _load(self) -> None:
        self.detector.load()
        self.colors.embedder.load()

    def _assign_colors(self, images: list[Image.Image], dets: list[list[Detection]],
                       metadata: list[dict[str, Any]]) -> None:
        """Classify, in one CLIP batch, every kept detection of a class some clause colours."""
        crops, objs, targets = [], [], []
        for im, ds, meta in zip(images, dets, metadata):
            coloured = {c.cls for c in parse_clauses(meta, "include") if c.color is not None}
            for cls, kept in filter_detections(ds, meta.get("tag")).items():
                if cls in coloured:
                    for det in kept:
                        crops.append(color_crop(im, det))
                        objs.append(cls)
                        targets.append(det)
        for det, color in zip(targets, self.colors.classify(crops, objs)):
            det.color = color

    def _score_batch(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        for meta in metadata:
            if not meta.get("include"):
                raise ValueError("the geneval reward needs GenEval metadata with 'include' "
                                 "clauses (see docs/geneval.md)")
        queries = [sorted({c.cls for k in ("include", "exclude") for c in parse_clauses(m, k)})
                   for m in metadata]
        dets = self.detector.detect(images, queries)
        self._assign_colors(images, dets, metadata)
        scores, details = [], []
        for ds, meta in zip(dets, metadata):
            res = evaluate_detections(ds, meta, variant=self.variant,
                                      honour_exclude=self.honour_exclude)
            scores.append(float(res.correct) if self.mode == "strict" else res.reward)
            details.append({"backend": self.backend, "correct": res.correct,
                            "reason": res.reason, "partial": res.reward, **res.details,
                            "detections": [(d.label, round(d.score, 4), d.color) for d in ds]})
        return scores, details

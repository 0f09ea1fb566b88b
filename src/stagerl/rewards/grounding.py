"""GroundingDINO object / count / spatial reward.

The STAGE paper trains one setting with HPS v2.1 + GIT VQA + GroundingDINO (the T2I-R1 reward mix).
This module re-implements the GroundingDINO part with two quirks of the authors' version fixed, as
the issue asks:
- "above" and "on top of" are scored (the original only scored some relations, so those prompts
  earned no spatial signal);
- "near" compares a *normalised* centre distance (pixels / image size) with a threshold, so the
  verdict does not depend on the image resolution.

Prompt -> targets: GenEval metadata when present (classes, counts, colours, the position clause);
otherwise a small parser for T2I-CompBench-style prompts ("two dogs and a cat", "a cup on top of a
table"). The reward is the mean of these terms:
- presence, per object: 1 if detected;
- count, per object with an explicit count n >= 2: 1 - |n - found|/n, clamped to [0, 1]
  (duplicates are first removed with class-wise NMS at IoU 0.5);
- relation, if any: 1 if it holds between the highest-scoring detections of the two objects.
  left/right/above/below hold when the centre offset points that way along the dominant axis
  (T2I-CompBench's rule); near holds when hypot(dx/W, dy/H)/sqrt(2) <= ``near_threshold``.

``scoring="parity"`` scores instead as the STAGE authors' reward code does, quirks included, so the
HPS+GIT+GroundingDINO recipe can be compared with the paper like for like (the rules are with
:func:`parity_score` below; docs/rewards.md tabulates where they differ from the default).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards._common import BatchedReward, check_choice
from stagerl.rewards.base import register_reward
from stagerl.geneval import Detection
from stagerl.rewards.detector import ObjectDetector

# Longest phrases first so "on the left of" wins over "left of".
RELATION_WORDS = (
    ("on the left of", "left"), ("to the left of", "left"), ("left of", "left"),
    ("on the right of", "right"), ("to the right of", "right"), ("right of", "right"),
    ("on the top of", "above"), ("on top of", "above"), ("above", "above"),
    ("on the bottom of", "below"), ("underneath", "below"), ("beneath", "below"),
    ("below", "below"), ("under", "below"),
    ("on side of", "near"), ("next to", "near"), ("close to", "near"), ("beside", "near"),
    ("near", "near"))
GENEVAL_RELATIONS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_PREFIX = re.compile(r"^(a|an)\s+(photo|image|picture|painting|drawing)\s+of\s+")


@dataclass
class Target:
    phrase: str  # the detector query, e.g. "red bench"
    count: int | None = None  # an explicit count (>= 2 is scored), None = "at least one"


@dataclass
class Spec:
    objects: list[Target]
    relation: tuple[str, int, int] | None = None  # (left|right|above|below|near, subject, object)


def _phrases(part: str) -> list[Target]:
    out = []
    for chunk in re.split(r",|\band\b", part):
        words = chunk.split()
        while words and words[0] == "the":
            words = words[1:]
        count = None
        if words and (words[0] in NUMBER_WORDS or words[0].isdigit()):
            count = int(words[0]) if words[0].isdigit() else NUMBER_WORDS[words[0]]
            words = words[1:]
        if words:
            out.append(Target(" ".join(words), count if count and count >= 2 else None))
    return out


def parse_prompt(prompt: str) -> Spec:
    """Targets and at most one relation from a free-text prompt."""
    text = _PREFIX.sub("", prompt.lower().strip().rstrip("."))
    for words, rel in RELATION_WORDS:
        m = re.search(rf"\b{re.escape(words)}\b", text)
        if m:
            left, right = _phrases(text[:m.start()]), _phrases(text[m.end():])
            if left and right:
                return Spec(left + right, (rel, len(left) - 1, len(left)))
    return Spec(_phrases(text))


def spec_from_metadata(meta: dict[str, Any]) -> Spec | None:
    """GenEval include clauses -> targets ("red bench" x count) and the position clause."""
    includes = meta.get("include") or []
    if not includes:
        return None
    objects, relation = [], None
    for i, c in enumerate(includes):
        phrase = f"{c['color']} {c['class']}" if c.get("color") else str(c["class"])
        count = int(c.get("count") or 1)
        objects.append(Target(phrase, count if count >= 2 else None))
        if c.get("position"):
            rel, k = c["position"]
            relation = (GENEVAL_RELATIONS[rel], i, int(k))
    return Spec(objects, relation)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(dets: list[Detection], iou: float = 0.5) -> list[Detection]:
    """Greedy non-maximum suppression, by score (best first)."""
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        if all(_iou(d.box, k.box) <= iou for k in kept):
            kept.append(d)
    return kept


def relation_holds(rel: str, a: Detection, b: Detection, size: tuple[int, int],
                   near_threshold: float) -> bool:
    w, h = size
    dx = ((a.box[0] + a.box[2]) - (b.box[0] + b.box[2])) / 2 / w  # normalised centre offset
    dy = ((a.box[1] + a.box[3]) - (b.box[1] + b.box[3])) / 2 / h  # y grows downward
    if rel == "near":
        return math.hypot(dx, dy) / math.sqrt(2) <= near_threshold
    horizontal = abs(dx) > abs(dy)
    return {"left": horizontal and dx < 0, "right": horizontal and dx > 0,
            "above": not horizontal and dy < 0, "below": not horizontal and dy > 0}[rel]


def score_spec(spec: Spec, dets: list[Detection], size: tuple[int, int],
               near_threshold: float) -> tuple[float, dict[str, Any]]:
    by_phrase = {t.phrase: nms([d for d in dets if d.label == t.phrase]) for t in spec.objects}
    terms: list[float] = []
    found = {}
    for t in spec.objects:
        n_found = len(by_phrase[t.phrase])
        found[t.phrase] = n_found
        terms.append(1.0 if n_found else 0.0)
        if t.count is not None:
            terms.append(min(1.0, max(0.0, 1.0 - abs(t.count - n_found) / t.count)))
    holds = None
    if spec.relation is not None:
        rel, i, k = spec.relation
        a, b = by_phrase[spec.objects[i].phrase], by_phrase[spec.objects[k].phrase]
        holds = bool(a and b and relation_holds(rel, a[0], b[0], size, near_threshold))
        terms.append(float(holds))
    return sum(terms) / len(terms), {"found": found, "relation": spec.relation,
                                     "relation_holds": holds, "terms": terms}


# --------------------------------------------------------------------------------------------------
# scoring="parity": the STAGE authors' GroundingDINO reward.
#
# Re-implemented (not copied) from krennic999/STAGE, src/grpo/src/utils/reward_gdino.py (the same
# file as CaraJ7/T2I-R1, src/t2i-r1/src/utils/reward_gdino.py), with the detection prompt of
# src/grpo/src/open_r1/grpo.py (make_detection_prompt). Targets come from the T2I-R1 metadata
# (nouns, task_type, spatial_info, numeracy_info). The quirks kept on purpose are listed in
# docs/rewards.md ("Parity scoring").

PARITY_BOX_THRESHOLD = 0.3  # on the phrase score (mean sigmoid over the phrase's tokens)
PARITY_NMS_IOU = 0.5  # numeracy duplicates
PARITY_IOU_SOFT = 0.1  # a directional relation whose boxes overlap more scores 0.1 / IoU
# Meant as pixels, but compared with offsets of normalised [0, 1] boxes: "near" is always 1.
PARITY_NEAR_DISTANCE = 150.0
PARITY_NEAR = ("next to", "on side of", "near")
PARITY_RIGHT = ("on the right of", "right of")
PARITY_LEFT = ("on the left of", "left of")
PARITY_BELOW = ("on the bottom of", "below")
PARITY_ABOVE = ("on the top of", "top of")  # "above" and "on top of" are not here: they score 0
SCORINGS = ("fixed", "parity")


@dataclass
class ParityDetection:
    phrase: str  # the grounded noun, as the authors label it (see detection_prompt)
    box: tuple[float, float, float, float]  # (cx, cy, w, h), normalised to the image
    score: float  # the phrase score that passed the box threshold


def detection_prompt(nouns: list[str]) -> tuple[str, list[list[tuple[int, int]]], list[str]]:
    """The authors' caption ("car . teddy bear."), per noun the character spans whose tokens score
    it, and the label a detection of it gets.

    A one-word noun is one span; a longer one is two spans, its first and last words, so a middle
    word is never scored and a noun of three or more words is labelled "first last", which never
    equals the noun: such a noun is never found."""
    spans, pointer = [], 0
    for noun in nouns:
        words = noun.strip().split(" ")
        if len(words) == 1:
            spans.append([(pointer, pointer + len(words[0]))])
            pointer += len(words[0]) + 3  # past " . "
        else:
            spans.append([(pointer, pointer + len(words[0])),
                          (pointer + len(noun) - len(words[-1]), pointer + len(noun))])
            pointer += len(noun) + 3
    caption = " . ".join(nouns) + "."
    labels = [" ".join(caption[a:b] for a, b in sp) for sp in spans]
    return caption, spans, labels


def span_token_positions(tokenizer: Any, caption: str, spans: list[tuple[int, int]]) -> list[int]:
    """Token positions (after [CLS]) covering the character spans: every token from the span's
    first to its last, like GroundingDINO's positive map. Spans start and end on word boundaries,
    so counting the tokens of the caption's prefix finds them, with a slow or a fast tokenizer."""
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out: set[int] = set()
    for a, b in spans:
        out.update(range(1 + n_tokens(caption[:a]), n_tokens(caption[:b]) + 1))
    return sorted(out)


def ground_phrases(probs: torch.Tensor, boxes: torch.Tensor, positions: list[list[int]],
                   labels: list[str], box_threshold: float) -> list[ParityDetection]:
    """Per phrase, the queries whose phrase score passes ``box_threshold``.

    ``probs`` [Q, T] are the sigmoid token scores of the Q queries, ``boxes`` [Q, 4] their
    normalised (cx, cy, w, h). A phrase score is the mean of a query's token scores over the
    phrase's positions (the authors' normalised positive map, with its 1e-6). A query may be
    detected under several phrases. Order: phrase by phrase, queries ascending."""
    probs = probs.float()
    dets = []
    for pos, label in zip(positions, labels):
        weights = torch.zeros(probs.shape[1])
        pos = [t for t in pos if t < probs.shape[1]]
        weights[pos] = 1.0
        phrase_scores = probs @ (weights / (weights.sum() + 1e-6)).to(probs.device)  # [Q]
        for q in torch.nonzero(phrase_scores > box_threshold).flatten().tolist():
            dets.append(ParityDetection(label, tuple(float(v) for v in boxes[q].tolist()),
                                        float(phrase_scores[q])))
    return dets


def cxcywh_to_xyxy(box: tuple[float, ...]) -> tuple[float, float, float, float]:
    cx, cy, w, h = box
    x0, y0 = cx - w / 2, cy - h / 2
    return x0, y0, x0 + w, y0 + h


def parity_position(locality: str, a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The authors' relation score for "a <locality> b", boxes (x0, y0, x1, y1) normalised.

    Offsets are centre(b) - centre(a). A directional relation needs its sign and the dominant
    axis, then scores 1 if IoU < 0.1, else 0.1 / IoU. "near"/"next to"/"on side of" is 1 when
    |dx| < 150 or |dy| < 150, always true for normalised boxes. "above" and "on top of" are in no
    branch and score 0 ("on the top of" is scored)."""
    dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2
    dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    if locality in PARITY_NEAR:
        if abs(dx) < PARITY_NEAR_DISTANCE or abs(dy) < PARITY_NEAR_DISTANCE:
            return 1.0
        return PARITY_NEAR_DISTANCE / max(abs(dx), abs(dy))
    if locality in PARITY_RIGHT:
        holds = dx < 0 and abs(dx) > abs(dy)
    elif locality in PARITY_LEFT:
        holds = dx > 0 and abs(dx) > abs(dy)
    elif locality in PARITY_BELOW:
        holds = dy < 0 and abs(dy) > abs(dx)
    elif locality in PARITY_ABOVE:
        holds = dy > 0 and abs(dy) > abs(dx)
    else:
        return 0.0
    if not holds:
        return 0.0
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union == 0:  # the authors' tensors give IoU = nan here, which passes neither test
        return 0.0
    iou = inter / union
    return 1.0 if iou < PARITY_IOU_SOFT else PARITY_IOU_SOFT / iou


def parity_nms_count(dets: list[ParityDetection], iou: float = PARITY_NMS_IOU) -> int:
    """How many detections the authors' NMS keeps. They pass the (cx, cy, w, h) boxes to
    torchvision's ``nms``, which reads them as (x0, y0, x1, y1); this is its greedy rule on the
    same numbers. Most such "boxes" have x1 < x0, so their overlap is 0 and few duplicates are
    removed."""
    order = sorted(range(len(dets)), key=lambda i: -dets[i].score)  # stable, best first
    boxes = [d.box for d in dets]
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    suppressed = [False] * len(dets)
    kept = 0
    for k, i in enumerate(order):
        if suppressed[i]:
            continue
        kept += 1
        for j in order[k + 1:]:
            if suppressed[j]:
                continue
            w = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            h = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            inter = w * h
            denom = area[i] + area[j] - inter
            overlap = inter / denom if denom != 0 else (math.inf if inter > 0 else 0.0)
            if overlap > iou:
                suppressed[j] = True
    return kept


def parity_score(meta: dict[str, Any],
                 dets: list[ParityDetection]) -> tuple[float, dict[str, Any]]:
    """The authors' score of one image from its detections, by ``task_type``:

    - "spatial": 0.2 per object of ``spatial_info`` detected; with both, + parity_position / 2 on
      each object's best detection (so at most 0.9). Missing spatial_info, or obj1 == obj2, scores
      0 (the authors' code raises there and catches it).
    - "numeracy": per ``numeracy_info`` item, weight 1/len: 1 if the NMS count equals ``num``,
      0.2 if it differs, 0 if nothing is detected.
    - anything else: the fraction of ``nouns`` detected.
    """
    nouns = list(meta["nouns"])
    found = [d.phrase for d in dets]
    task = meta.get("task_type")
    details: dict[str, Any] = {"task_type": task, "found": {n: found.count(n) for n in nouns}}
    if task == "spatial":
        info = meta.get("spatial_info")
        if not isinstance(info, dict) or not {"obj1", "obj2", "locality"} <= info.keys():
            return 0.0, {**details, "spatial_error": f"unusable spatial_info {info!r}"}
        obj1, obj2 = info["obj1"], info["obj2"]
        score = 0.0
        for obj in (obj1, obj2):
            if obj in found:
                score += 0.2
        details["relation"] = None
        if obj1 in found and obj2 in found:
            if obj1 == obj2:
                return 0.0, {**details, "spatial_error": "obj1 and obj2 are the same noun"}
            best1 = max((d for d in dets if d.phrase == obj1), key=lambda d: d.score)
            best2 = max((d for d in dets if d.phrase == obj2), key=lambda d: d.score)
            rel = parity_position(info["locality"], cxcywh_to_xyxy(best1.box),
                                  cxcywh_to_xyxy(best2.box))
            details["relation"] = rel
            score += rel / 2
        return score, details
    if task == "numeracy":
        items = meta.get("numeracy_info") or []
        if not items:
            raise ValueError("a numeracy prompt without numeracy_info")
        weight = 1 / len(items)
        score, counts = 0.0, []
        for item in items:
            mine = [d for d in dets if d.phrase == item["obj_name"]]
            n = parity_nms_count(mine) if mine else 0
            counts.append(n)
            if mine:
                score += weight if n == int(item["num"]) else 0.2 * weight
        return score, {**details, "counts": counts}
    weight = 1 / len(nouns)
    score = 0.0
    for noun in nouns:
        if noun in found:
            score += weight
    return score, details


@register_reward("grounding_dino")
class GroundingReward(BatchedReward):
    """``grounding_dino``: kwargs ``checkpoint`` (default IDEA-Research/grounding-dino-tiny; an
    OWLv2 checkpoint also works with the fixed scoring), ``scoring`` ('fixed', default, or
    'parity': the STAGE authors' rules, GroundingDINO only, T2I-R1 metadata), ``box_threshold``
    (0.35 fixed, 0.3 parity), ``text_threshold`` (0.25; fixed only), ``near_threshold`` (0.3;
    fixed only), ``device``, ``dtype``, ``batch_size``."""

    name = "grounding_dino"

    def __init__(self, checkpoint: str = "IDEA-Research/grounding-dino-tiny",
                 scoring: str = "fixed", box_threshold: float | None = None,
                 text_threshold: float = 0.25, near_threshold: float = 0.3,
                 device: str | None = "auto", dtype: str | None = "float32", batch_size: int = 8):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self.scoring = check_choice(self.name, "scoring", scoring, SCORINGS)
        if box_threshold is None:
            box_threshold = PARITY_BOX_THRESHOLD if self.scoring == "parity" else 0.35
        self.box_threshold = float(box_threshold)
        self.near_threshold = float(near_threshold)
        self.detector = ObjectDetector(checkpoint, self.device, self.dtype, self.name,
                                       self.box_threshold, text_threshold)

    requires = ("transformers",)

    def checkpoints(self) -> list[tuple[str, str, str]]:
        return [("checkpoint", self.detector.checkpoint, "model")]

    def _load(self) -> None:
        self.detector.load()
        if not self.detector.open_vocabulary:
            raise UserError(f"reward 'grounding_dino' needs an open-vocabulary detector "
                            f"(GroundingDINO or OWLv2), got a {self.detector.kind!r} model")
        if self.scoring == "parity" and self.detector.kind != "grounding-dino":
            raise UserError(f"reward 'grounding_dino': scoring='parity' scores GroundingDINO's "
                            f"token logits and needs a GroundingDINO checkpoint, got a "
                            f"{self.detector.kind!r} model")

    def _score_batch(self, images: list[Image.Image], prompts: list[str],
                     metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        if self.scoring == "parity":
            return self._score_parity(images, prompts, metadata)
        specs = [spec_from_metadata(m) or parse_prompt(p) for p, m in zip(prompts, metadata)]
        for p, s in zip(prompts, specs):
            if not s.objects:
                raise ValueError(f"found no objects to ground in prompt {p!r}")
        queries = [list(dict.fromkeys(t.phrase for t in s.objects)) for s in specs]
        dets = self.detector.detect(images, queries)
        scores, details = [], []
        for im, spec, ds in zip(images, specs, dets):
            s, d = score_spec(spec, ds, im.size, self.near_threshold)
            scores.append(s)
            details.append(d)
        return scores, details

    # -- scoring="parity" ----------------------------------------------------------------------
    def _score_parity(self, images: list[Image.Image], prompts: list[str],
                      metadata: list[dict[str, Any]]) -> tuple[list[float], list[dict[str, Any]]]:
        scores, details = [], []
        for im, p, meta in zip(images, prompts, metadata):
            if not isinstance(meta.get("nouns"), list):
                raise ValueError(f"scoring='parity' reads the T2I-R1 metadata (nouns, task_type, "
                                 f"spatial_info, numeracy_info); prompt {p!r} has no 'nouns' list")
            if not meta["nouns"]:  # the authors give a prompt without nouns reward 1
                scores.append(1.0)
                details.append({"scoring": "parity", "task_type": meta.get("task_type"),
                                "note": "no nouns: 1"})
                continue
            s, d = parity_score(meta, self._ground(im, [str(n) for n in meta["nouns"]]))
            scores.append(s)
            details.append({"scoring": "parity", **d})
        return scores, details

    def _ground(self, image: Image.Image, nouns: list[str]) -> list[ParityDetection]:
        """GroundingDINO on the authors' caption, one image at a time as they ran it."""
        caption, spans, labels = detection_prompt(nouns)
        proc, model = self.detector.processor, self.detector.model
        inputs = proc(images=image, text=caption, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if torch.is_tensor(v)}
        with torch.no_grad():
            out = model(**inputs)
        positions = [span_token_positions(proc.tokenizer, caption, sp) for sp in spans]
        return ground_phrases(out.logits[0].float().sigmoid().cpu(),  # [Q, T]
                              out.pred_boxes[0].float().cpu(), positions, labels,  # [Q, 4]
                              self.box_threshold)

"""GenEval's rules, written once, for any detection back end (docs/geneval.md).

Back ends turn an image into :class:`Detection` objects:
- exact: the shapes world (``stagerl.worlds.shapes.detect``) knows what it drew;
- learned: a detector plus a colour classifier for real images (``stagerl.rewards.detector``).

:func:`evaluate_detections` then applies, in one pass over the metadata:
- the strict benchmark verdict (GenEval's ``evaluate``: top-n per class, >= counts, colour,
  position, exclude);
- the partial-credit training reward the STAGE authors inherited from Flow-GRPO's reward server, in a
  ``fixed`` form and a ``parity`` form that keeps the original quirks (docs/geneval.md, "Training
  reward").

Metadata keys that are absent and keys that are ``null`` are treated the same everywhere; the
authors' server tested ``'color' in clause`` and so mis-scored Hugging Face rows (docs/geneval.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stagerl.errors import UserError

THRESHOLD = 0.3  # GenEval: keep detections with confidence > 0.3 ...
COUNTING_THRESHOLD = 0.9  # ... or > 0.9 when tag == counting
MAX_OBJECTS = 16  # at most 16 detections per class, by confidence; GenEval does no NMS
POSITION_THRESHOLD = 0.1  # offsets shrink by 0.1 * (size_A + size_B) per axis
RELATIONS = ("left of", "right of", "above", "below")
VARIANTS = ("fixed", "parity")


@dataclass
class Detection:
    """One detected object, as any back end reports it."""

    label: str  # class name (COCO name, or a shapes-world shape)
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, y grows downward
    score: float = 1.0  # detector confidence in [0, 1]
    color: str | None = None  # colour name if the back end knows it; else color_fn decides
    mask: np.ndarray | None = None  # [H, W] bool instance mask, if the back end has one


@dataclass
class GenEvalResult:
    """The verdict and reward for one image."""

    correct: bool  # strict GenEval benchmark verdict
    reason: str  # why it failed ("" when correct), one line per failed clause
    reward: float  # partial-credit training reward of the requested variant
    details: dict[str, Any] = field(default_factory=dict)  # per-clause counts, reward terms


@dataclass(frozen=True)
class Clause:
    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None


ColorFn = Callable[[Detection], str]


# -- metadata ------------------------------------------------------------------------------------
def parse_clauses(metadata: Mapping[str, Any], key: str) -> list[Clause]:
    """Normalise include/exclude clauses: absent key == null, counts and indices become ints."""
    out = []
    for raw in metadata.get(key) or []:
        if not isinstance(raw, Mapping) or raw.get("class") is None:
            raise UserError(f"GenEval metadata: every {key} clause needs a 'class', got {raw!r}")
        count = raw.get("count")
        count = 1 if count is None else int(count)
        if count < 1 and key == "include":
            raise UserError(f"GenEval metadata: include count must be >= 1, got {raw!r}")
        pos = raw.get("position")
        if pos is not None:
            if len(pos) != 2 or pos[0] not in RELATIONS:
                raise UserError(f"GenEval metadata: position must be [relation, index] with a "
                                f"relation in {RELATIONS}, got {pos!r}")
            pos = (str(pos[0]), int(pos[1]))
            if not 0 <= pos[1] < len(out):
                raise UserError(f"GenEval metadata: position target {pos[1]} must name an "
                                f"earlier include clause, got {raw!r}")
        out.append(Clause(str(raw["class"]), count, raw.get("color"), pos))
    return out


def filter_detections(detections: Sequence[Detection], tag: str | None) -> dict[str, list[Detection]]:
    """Per class: confidence > 0.3 (> 0.9 for counting), sorted by confidence, at most 16.

    The sort is stable, so equal scores keep the back end's order (GenEval's argsort does not
    promise any order for ties; the exact back end gives every object score 1).
    """
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    groups: dict[str, list[Detection]] = {}
    for det in detections:
        if det.score > threshold:
            groups.setdefault(det.label, []).append(det)
    return {k: sorted(v, key=lambda d: -d.score)[:MAX_OBJECTS] for k, v in groups.items()}


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations of A relative to B, GenEval's rule (docs/geneval.md, "Position").

    offset = centre_A - centre_B; each axis shrinks towards 0 by 0.1 * (size_A + size_B), never
    past 0; ~0 means no relation; else divide by the *original* offset's norm and threshold at 0.5.
    """
    # Plain floats: this runs per object pair inside the reward loop, where numpy's per-call
    # overhead on 2-vectors would dominate.
    ax0, ay0, ax1, ay1 = map(float, box_a)
    bx0, by0, bx1, by1 = map(float, box_b)
    off = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)  # centre_A - centre_B
    dims = (abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0))  # size_A + size_B
    shrunk = [math.copysign(max(abs(o) - POSITION_THRESHOLD * d, 0.0), o) for o, d in zip(off, dims)]
    if all(abs(v) < 1e-3 for v in shrunk):
        return set()
    norm = math.hypot(*off)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


class _Colours:
    """Colour of a detection: the back end's own ``color``, else ``color_fn``, computed once."""

    def __init__(self, color_fn: ColorFn | None):
        self.color_fn = color_fn
        self.cache: dict[int, str] = {}

    def __call__(self, det: Detection) -> str:
        if det.color is not None:
            return det.color
        if self.color_fn is None:
            raise ValueError(f"detection {det.label!r} has no colour and no color_fn was given")
        key = id(det)
        if key not in self.cache:
            self.cache[key] = self.color_fn(det)
        return self.cache[key]


def _relation_fails(found: list[Detection], targets: list[Detection], rel: str) -> str | None:
    """First failing (object, target) pair's relations as text, or None if every pair holds."""
    for obj in found:
        for target in targets:
            rels = relative_position(obj.box, target.box)
            if rel not in rels:
                return " and ".join(sorted(rels)) or "no relation"
    return None


# -- the strict benchmark verdict ----------------------------------------------------------------
def _benchmark(groups: dict[str, list[Detection]], includes: list[Clause],
               excludes: list[Clause], colours: _Colours) -> tuple[bool, list[str]]:
    """GenEval's evaluate(): top-n per include clause, colour, position; then exclude."""
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in includes:
        found = groups.get(req.cls, [])[:req.count]
        ok = len(found) >= req.count
        if not ok:
            reasons.append(f"expected {req.cls}>={req.count}, found {len(found)}")
        if ok and req.color is not None:
            n_col = sum(colours(d) == req.color for d in found)
            if n_col < req.count:
                ok = False
                reasons.append(f"expected {req.color} {req.cls}>={req.count}, found {n_col} "
                               f"{req.color}")
        if ok and req.position is not None:
            rel, k = req.position
            targets = matched_groups[k]
            if targets is None:
                ok = False
                reasons.append(f"no target for {req.cls} to be {rel}")
            else:
                got = _relation_fails(found, targets, rel)
                if got is not None:
                    ok = False
                    reasons.append(f"expected {req.cls} {rel} target, found {got} target")
        matched_groups.append(found if ok else None)
    for req in excludes:
        n_found = len(groups.get(req.cls, []))
        if n_found >= req.count:
            reasons.append(f"expected {req.cls}<{req.count}, found {n_found}")
    return not reasons, reasons


# -- the partial-credit training reward ----------------------------------------------------------
def _reward_terms(groups: dict[str, list[Detection]], includes: list[Clause],
                  excludes: list[Clause], colours: _Colours, variant: str,
                  honour_exclude: bool) -> tuple[list[float], bool]:
    """Per-clause terms of Flow-GRPO's reward; returns (terms, every clause matched exactly).

    Per include clause (all kept detections of its class count, not only the top n):
    - count 1 - |n - found|/n (``fixed`` clamps it to [0, 1]; ``parity`` lets it go negative);
    - found != n and a colour or position asked: one 0;
    - else colour: 1 - |n - found_with_colour|/n;
    - position (when the count matched): ``fixed`` 1 if the relation holds for every pair else 0;
      ``parity`` appends 0 *and* 1 on failure (only when colour also passed, as the original).
    ``fixed`` with ``honour_exclude`` appends a 0 per *violated* exclude clause (a satisfied one adds
    nothing, so an empty image earns no credit for "fewer than n+1"); ``parity`` ignores them.
    """
    fixed = variant == "fixed"
    terms: list[float] = []
    matched_groups: list[list[Detection] | None] = []
    for req in includes:
        found = groups.get(req.cls, [])
        count_term = 1.0 - abs(req.count - len(found)) / req.count
        terms.append(min(max(count_term, 0.0), 1.0) if fixed else count_term)
        matched = len(found) == req.count
        if not matched:
            if req.color is not None or req.position is not None:
                terms.append(0.0)
            matched_groups.append(None)
            continue
        if req.color is not None:
            n_col = sum(colours(d) == req.color for d in found)
            terms.append(1.0 - abs(req.count - n_col) / req.count)
            matched = n_col == req.count
        if req.position is not None and (fixed or matched):
            rel, k = req.position
            targets = matched_groups[k]
            holds = targets is not None and _relation_fails(found, targets, rel) is None
            if fixed:
                terms.append(1.0 if holds else 0.0)
            elif targets is None:
                terms.append(0.0)
            else:
                terms.extend([1.0] if holds else [0.0, 1.0])  # the original's quirk
            matched = matched and holds
        matched_groups.append(found if matched else None)
    if fixed and honour_exclude:
        terms.extend(0.0 for r in excludes if len(groups.get(r.cls, [])) >= r.count)
    all_exact = all(g is not None for g in matched_groups)
    return terms, all_exact


def evaluate_detections(detections: Sequence[Detection], metadata: Mapping[str, Any], *,
                        variant: str = "fixed", honour_exclude: bool = True,
                        color_fn: ColorFn | None = None) -> GenEvalResult:
    """Apply GenEval's rules to one image's detections.

    ``correct`` is the strict benchmark verdict; ``reward`` the partial credit of ``variant``
    ("fixed" or "parity"); ``color_fn(detection) -> colour name`` is called only for detections
    whose ``color`` is None and only when a clause asks for a colour.
    """
    if variant not in VARIANTS:
        raise UserError(f"GenEval reward variant must be one of {VARIANTS}, got {variant!r}")
    tag = metadata.get("tag")
    includes = parse_clauses(metadata, "include")
    excludes = parse_clauses(metadata, "exclude")
    groups = filter_detections(detections, tag)
    colours = _Colours(color_fn)
    correct, reasons = _benchmark(groups, includes, excludes, colours)
    terms, all_exact = _reward_terms(groups, includes, excludes, colours, variant, honour_exclude)
    details = {
        "variant": variant,
        "terms": terms,
        "found": {c.cls: len(groups.get(c.cls, [])) for c in includes + excludes},
        "exact_match": all_exact,  # the reward server's own "strict_correct" (found == n)
    }
    reward = float(sum(terms) / len(terms)) if terms else 0.0
    return GenEvalResult(correct=correct, reason="\n".join(reasons), reward=reward,
                         details=details)


def geneval_overall(per_tag_results: Mapping[str, Sequence[bool]]) -> dict[str, float]:
    """Per-tag accuracy and Overall = the mean of the per-tag accuracies (docs/geneval.md).

    Tags with no results are left out rather than counted as 0.
    """
    table = {tag: float(np.mean([bool(r) for r in res]))
             for tag, res in per_tag_results.items() if len(res)}
    table["overall"] = float(np.mean(list(table.values()))) if table else 0.0
    return table

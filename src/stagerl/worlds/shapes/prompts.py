"""Seeded (prompt, GenEval metadata, scene) generator for the shapes world.

Splits (each a separate seed stream):
- ``train``: the training distribution: training templates, training compositions;
- ``test``: the same distribution from another seed stream, for held-out in-distribution eval;
- ``compositions``: only counting / colors / position / color_attr prompts whose requested
  combination is held out of train and test by a fixed rule (``WorldSpec.heldout_*``): a
  (colour, shape) pair, a (count, shape) pair, or a (shape, relation, shape) triple. No train/test
  scene ever *draws* a held-out (colour, shape) pair, even where the colour was not requested;
- ``phrasings``: train compositions, worded with templates never used by train/test (two held out
  per category). Held-out templates only recombine words that training templates use, so a
  word-level prompt vocabulary built on train covers them.

Every example's scene satisfies its metadata exactly, and draws only the requested objects; the
generator checks each one with the GenEval rule engine on ground-truth detections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stagerl.errors import UserError
from stagerl.geneval import evaluate_detections, relative_position
from stagerl.worlds.shapes.detect import objects_to_detections
from stagerl.worlds.shapes.render import ShapeObject, render
from stagerl.worlds.shapes.spec import NUMBER_WORDS, WorldSpec

SPLITS: tuple[str, ...] = ("train", "test", "compositions", "phrasings")
_SPLIT_KEY = {s: i for i, s in enumerate(SPLITS)}
COMPOSITIONAL_TAGS = ("counting", "colors", "position", "color_attr")

# Per tag: (training templates, held-out templates). {a}/{b} are noun phrases with an article
# ("a circle", "an orange square"), {n} is a counted plural ("three triangles"), {rel} a relation.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "single_object": (("a photo of {a}", "an image showing {a}", "{a}"),
                      ("a picture of {a}", "there is {a} in the image")),
    "two_object": (("a photo of {a} and {b}", "an image showing {a} and {b}", "{a} with {b}"),
                   ("a picture of {a} and {b}", "{a} and {b}")),
    "counting": (("a photo of {n}", "an image showing {n}", "there are {n} in the picture"),
                 ("a picture of {n}", "{n}")),
    "colors": (("a photo of {a}", "an image showing {a}", "there is {a} in the picture"),
               ("a picture of {a}", "{a}")),
    "position": (("a photo of {a} {rel} {b}", "an image showing {a} {rel} {b}",
                  "there is {a} {rel} {b}"),
                 ("a picture of {a} {rel} {b}", "{a} is {rel} {b}")),
    "color_attr": (("a photo of {a} and {b}", "an image showing {a} and {b}", "{a} with {b}"),
                   ("a picture of {a} and {b}", "{a} and {b}")),
}


@dataclass
class Example:
    """One prompt with its GenEval metadata and the ground-truth scene that satisfies it."""

    prompt: str
    metadata: dict[str, Any]  # GenEval schema: tag, include[...], exclude[...]?, prompt
    objects: list[ShapeObject]  # ground-truth placement, in drawing order
    template: str = ""  # the template the prompt came from
    split: str = "train"

    @property
    def tag(self) -> str:
        return self.metadata["tag"]

    def image(self, spec: WorldSpec = WorldSpec()) -> np.ndarray:
        """The ground-truth render, uint8 [H, W, 3]."""
        return render(self.objects, spec)


# -- wording -------------------------------------------------------------------------------------
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _np(shape: str, color: str | None = None) -> str:
    return _article(f"{color} {shape}" if color else shape)


def prompt_vocabulary(spec: WorldSpec = WorldSpec()) -> list[str]:
    """Every word any split's prompt can contain (for word-level prompt encoders), sorted."""
    words = set()
    for train, held in TEMPLATES.values():
        for t in train + held:
            words.update(w for w in t.split() if not w.startswith("{"))
    words.update(("a", "an"))
    words.update(spec.shapes)
    words.update(_plural(s) for s in spec.shapes)
    words.update(spec.colors)
    words.update(NUMBER_WORDS[c] for c in spec.counts)
    words.update(w for r in spec.relations for w in r.split())
    return sorted(words)


# -- combinations per split ----------------------------------------------------------------------
class _Combos:
    """Which requested combinations a split may use, and colours for unrequested attributes."""

    def __init__(self, spec: WorldSpec, split: str):
        self.spec = spec
        self.novel = split == "compositions"
        self.pairs = spec.heldout_pair_set()
        self.counts = spec.heldout_count_set()
        self.rels = spec.heldout_relation_set()

    def free_color(self, rng: np.random.Generator, shape: str) -> str:
        """A colour for an object whose colour the prompt does not ask for: never held out."""
        options = [c for c in self.spec.colors if (c, shape) not in self.pairs]
        if not options:
            raise UserError(f"shapes world spec: every colour of {shape!r} is held out")
        return options[rng.integers(len(options))]

    def pair_ok(self, color: str, shape: str) -> bool:
        return ((color, shape) in self.pairs) == self.novel


def _pick(rng: np.random.Generator, options: list, what: str) -> Any:
    if not options:
        raise UserError(f"shapes world: no {what} available for this split; check the spec's "
                        f"held-out rules")
    return options[rng.integers(len(options))]


def _attributes(rng: np.random.Generator, tag: str, cb: _Combos) -> tuple[dict, list, dict]:
    """Sample one prompt's content -> (wording slots, [(shape, colour)], metadata skeleton)."""
    spec = cb.spec
    shapes = list(spec.shapes)
    if tag == "single_object":
        s = _pick(rng, shapes, "shape")
        return {"a": _np(s)}, [(s, cb.free_color(rng, s))], {"include": [{"class": s, "count": 1}]}
    if tag == "counting":
        opts = [(n, s) for n in spec.counts for s in shapes
                if ((n, s) in cb.counts) == cb.novel]
        n, s = _pick(rng, opts, "(count, shape)")
        slot = {"n": f"{NUMBER_WORDS[n]} {_plural(s)}"}
        meta = {"include": [{"class": s, "count": n}], "exclude": [{"class": s, "count": n + 1}]}
        return slot, [(s, cb.free_color(rng, s)) for _ in range(n)], meta
    if tag == "colors":
        c, s = _pick(rng, [(c, s) for c in spec.colors for s in shapes if cb.pair_ok(c, s)],
                     "(colour, shape)")
        return {"a": _np(s, c)}, [(s, c)], {"include": [{"class": s, "count": 1, "color": c}]}
    if tag == "two_object":
        s1, s2 = _pick(rng, [(a, b) for a in shapes for b in shapes if a != b], "shape pair")
        return ({"a": _np(s1), "b": _np(s2)},
                [(s1, cb.free_color(rng, s1)), (s2, cb.free_color(rng, s2))],
                {"include": [{"class": s1, "count": 1}, {"class": s2, "count": 1}]})
    if tag == "color_attr":
        return _color_attr(rng, cb, shapes)
    if tag == "position":
        opts = [(a, r, b) for a in shapes for b in shapes if a != b for r in spec.relations
                if ((a, r, b) in cb.rels) == cb.novel]
        a, r, b = _pick(rng, opts, "(shape, relation, shape)")
        # GenEval lists the reference object first: "A rel B" -> [B, A at [rel, 0]].
        meta = {"include": [{"class": b, "count": 1},
                            {"class": a, "count": 1, "position": [r, 0]}]}
        return ({"a": _np(a), "b": _np(b), "rel": r},
                [(b, cb.free_color(rng, b)), (a, cb.free_color(rng, a))], meta)
    raise UserError(f"shapes world: unknown category {tag!r}")


def _color_attr(rng: np.random.Generator, cb: _Combos, shapes: list[str]) -> tuple:
    """Two different shapes in two different colours; in compositions at least one novel pair."""
    colors = list(cb.spec.colors)
    pairs = [(c, s) for c in colors for s in shapes]
    first = _pick(rng, [p for p in pairs if cb.pair_ok(*p)], "(colour, shape)")
    second_ok = [p for p in pairs if p[0] != first[0] and p[1] != first[1]
                 and (cb.novel or cb.pair_ok(*p))]
    second = _pick(rng, second_ok, "second (colour, shape)")
    (c1, s1), (c2, s2) = (first, second) if rng.random() < 0.5 else (second, first)
    meta = {"include": [{"class": s1, "count": 1, "color": c1},
                        {"class": s2, "count": 1, "color": c2}]}
    return {"a": _np(s1, c1), "b": _np(s2, c2)}, [(s1, c1), (s2, c2)], meta


# -- placement -----------------------------------------------------------------------------------
def _place(rng: np.random.Generator, items: list[tuple[str, str]], spec: WorldSpec,
           tries: int = 200) -> list[ShapeObject] | None:
    """Random non-overlapping grid placement (gap >= spec.min_gap), or None if it did not fit."""
    sizes = spec.sizes
    placed: list[ShapeObject] = []
    boxes: list[tuple[int, int, int, int]] = []
    for shape, color in items:
        for _ in range(tries):
            size = sizes[rng.integers(len(sizes))]
            slots = (spec.canvas - size) // spec.grid_step + 1
            x0, y0 = (int(v) * spec.grid_step for v in rng.integers(slots, size=2))
            box = (x0, y0, x0 + size, y0 + size)
            g = spec.min_gap
            if all(box[2] + g <= b[0] or b[2] + g <= box[0] or box[3] + g <= b[1]
                   or b[3] + g <= box[1] for b in boxes):
                break
        else:
            return None
        boxes.append(box)
        placed.append(ShapeObject(shape, color, x0 + size / 2, y0 + size / 2, size))
    return placed


def _scene(rng: np.random.Generator, items: list, meta: dict, spec: WorldSpec) -> list[ShapeObject]:
    """Place until the layout satisfies the prompt; position prompts need an unambiguous relation."""
    rel = next((c["position"][0] for c in meta["include"] if c.get("position")), None)
    for _ in range(500):
        objs = _place(rng, items, spec)
        if objs is None:
            continue
        if rel is None or relative_position(objs[1].box, objs[0].box) == {rel}:
            return objs
    raise UserError(f"shapes world: could not place {len(items)} objects on a {spec.canvas}px "
                    f"canvas; use a bigger canvas or smaller object_size")


def generate(n: int, seed: int, spec: WorldSpec = WorldSpec(), split: str = "train") -> list[Example]:
    """``n`` examples of ``split``, deterministic in ``seed``; categories cycle in spec order.

    The stream is prefix-stable: ``generate(k, s)`` equals the first k of ``generate(n, s)``.
    """
    if split not in SPLITS:
        raise UserError(f"shapes world: unknown split {split!r}; choose one of {SPLITS}")
    tags = [t for t in spec.categories if split != "compositions" or t in COMPOSITIONAL_TAGS]
    if not tags:
        raise UserError(f"shapes world: the compositions split needs one of {COMPOSITIONAL_TAGS}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_KEY[split]]))
    combos = _Combos(spec, split)
    held = split == "phrasings"
    out = []
    for i in range(n):
        tag = tags[i % len(tags)]
        slots, items, meta = _attributes(rng, tag, combos)
        templates = TEMPLATES[tag][1 if held else 0]
        template = templates[rng.integers(len(templates))]
        prompt = template.format(**slots)
        meta = {"tag": tag, **meta, "prompt": prompt}
        objects = _scene(rng, items, meta, spec)
        _check(objects, meta)
        out.append(Example(prompt, meta, objects, template, split))
    return out


def _check(objects: list[ShapeObject], meta: dict) -> None:
    """Internal invariant: the drawn scene passes its own metadata exactly."""
    res = evaluate_detections(objects_to_detections(objects), meta)
    if not (res.correct and res.details["exact_match"]):
        raise RuntimeError(f"generator bug: scene fails its prompt {meta['prompt']!r}: {res.reason}")

"""The shapes world's configuration: canvas, palette, shapes, counts, relations, held-out rules.

The shapes world is the project's embedded benchmark: procedural images whose content is
known exactly, scored with GenEval's rules (docs/geneval.md) by an exact detector. Every knob
lives in :class:`WorldSpec`, so harder variants (bigger canvas, more colours, more objects) are one
config line away when the default saturates.

Defaults: a 32x32 canvas, objects on a 2-pixel grid, circle / square /
triangle, six saturated colours, 1-4 objects, a plain white background.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from stagerl.errors import UserError

# GenEval's ten colour names (docs/geneval.md, "Values") with the exact RGB we paint them in. The
# values are pure or CSS-like primaries chosen so that the six defaults are at least 127 RGB units
# apart (red-orange-yellow is the closest chain), which lets the detector snap pixels to the nearest
# palette entry with a tolerance well below half that distance.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "purple": (128, 0, 192),
    "pink": (255, 105, 180),
    "brown": (139, 69, 19),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}

# GenEval's six tags (docs/geneval.md), in the benchmark's usual order.
GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                                 "color_attr")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                 "eight", "nine", "ten")


@dataclass(frozen=True)
class WorldSpec:
    """Everything that defines a shapes world. All fields are validated on construction."""

    canvas: int = 32
    """Image side in pixels (square RGB canvas)."""
    grid_step: int = 2
    """Objects' top-left corners and sizes are multiples of this."""
    shapes: tuple[str, ...] = SHAPES
    """Object classes (GenEval "class"); each must be one the renderer knows."""
    colors: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
    """Object colours (GenEval "color"), names from :data:`COLOR_RGB`."""
    background: str = "white"
    """Plain background colour, a name from :data:`COLOR_RGB`; must not be an object colour."""
    min_objects: int = 1
    """Smallest object count in a scene."""
    max_objects: int = 4
    """Largest object count in a scene (counting prompts use 2..max_objects, like GenEval's 2-4)."""
    object_size: tuple[int, int] = (8, 12)
    """Inclusive (min, max) object side in pixels, multiples of grid_step."""
    min_gap: int = 2
    """Minimum empty pixels between two objects' boxes, so same-colour objects never merge."""
    relations: tuple[str, ...] = RELATIONS
    """Spatial relations used by position prompts (GenEval's four)."""
    categories: tuple[str, ...] = GENEVAL_TAGS
    """Prompt categories (GenEval tags) the generator cycles through."""
    heldout_pairs: tuple[tuple[str, str], ...] | None = None
    """(colour, shape) pairs reserved for the "compositions" split; None = the default rule:
    shape j is held out with colour (2j+1) mod n_colours."""
    heldout_counts: tuple[tuple[int, str], ...] | None = None
    """(count, shape) counting prompts reserved for "compositions"; None = shape j with count
    counts[j mod n_counts]."""
    heldout_relations: tuple[tuple[str, str, str], ...] | None = None
    """(shape A, relation, shape B) position prompts reserved for "compositions"; None = for
    relation k: (shapes[k mod S], relation, shapes[(k+1) mod S])."""
    color_tolerance: float = 50.0
    """Detector: a pixel takes its nearest palette colour if within this RGB Euclidean distance,
    else it is 'unknown' (off-palette)."""
    min_fragment_pixels: int = 4
    """Detector: components smaller than this are ignored as speckle; larger unclean ones are
    fragments and fail the strict verdict."""
    size_slack: int = 2
    """Detector: a clean object's box sides may deviate this many pixels from the size range and
    from each other."""
    min_shape_iou: float = 0.8
    """Detector: a component is a clean shape when its mask overlaps the ideal shape of its box
    with at least this IoU."""

    def __post_init__(self) -> None:
        for name in ("shapes", "colors", "relations", "categories"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "object_size", tuple(int(v) for v in self.object_size))
        for name in ("heldout_pairs", "heldout_counts", "heldout_relations"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(tuple(v) for v in value))
        _validate(self)

    # -- derived values -------------------------------------------------------------------------
    @property
    def palette(self) -> dict[str, tuple[int, int, int]]:
        """Object colour name -> RGB, in ``colors`` order."""
        return {c: COLOR_RGB[c] for c in self.colors}

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return COLOR_RGB[self.background]

    @property
    def sizes(self) -> tuple[int, ...]:
        """All allowed object sides."""
        lo, hi = self.object_size
        return tuple(range(lo, hi + 1, self.grid_step))

    @property
    def counts(self) -> tuple[int, ...]:
        """Object counts used by counting prompts (GenEval uses 2-4)."""
        return tuple(range(max(2, self.min_objects), self.max_objects + 1))

    def heldout_pair_set(self) -> frozenset[tuple[str, str]]:
        if self.heldout_pairs is not None:
            return frozenset(self.heldout_pairs)
        n = len(self.colors)
        return frozenset((self.colors[(2 * j + 1) % n], s) for j, s in enumerate(self.shapes))

    def heldout_count_set(self) -> frozenset[tuple[int, str]]:
        if self.heldout_counts is not None:
            return frozenset((int(c), s) for c, s in self.heldout_counts)
        counts = self.counts
        if not counts:
            return frozenset()
        return frozenset((counts[j % len(counts)], s) for j, s in enumerate(self.shapes))

    def heldout_relation_set(self) -> frozenset[tuple[str, str, str]]:
        if self.heldout_relations is not None:
            return frozenset(self.heldout_relations)
        s = self.shapes
        return frozenset((s[k % len(s)], r, s[(k + 1) % len(s)])
                         for k, r in enumerate(self.relations))


def _validate(spec: WorldSpec) -> None:
    def bad(field_name: str, why: str) -> UserError:
        return UserError(f"shapes world spec: {field_name}: {why}")

    if spec.grid_step < 1 or spec.canvas < 4:
        raise bad("canvas/grid_step", f"need canvas >= 4 and grid_step >= 1, got "
                  f"{spec.canvas}/{spec.grid_step}")
    for s in spec.shapes:
        if s not in SHAPES:  # the shapes render.py can draw
            raise bad("shapes", f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    for c in (*spec.colors, spec.background):
        if c not in COLOR_RGB:
            raise bad("colors", f"unknown colour {c!r}; known: {', '.join(COLOR_RGB)}")
    if spec.background in spec.colors:
        raise bad("background", f"{spec.background!r} is also an object colour")
    if len(set(spec.shapes)) != len(spec.shapes) or len(set(spec.colors)) != len(spec.colors):
        raise bad("shapes/colors", "duplicate names")
    if len(spec.shapes) < 2 or len(spec.colors) < 2:
        raise bad("shapes/colors", "need at least two shapes and two colours")
    for r in spec.relations:
        if r not in RELATIONS:
            raise bad("relations", f"unknown relation {r!r}; known: {', '.join(RELATIONS)}")
    for t in spec.categories:
        if t not in GENEVAL_TAGS:
            raise bad("categories", f"unknown category {t!r}; known: {', '.join(GENEVAL_TAGS)}")
    lo, hi = spec.object_size
    if not (spec.grid_step <= lo <= hi <= spec.canvas) or lo % spec.grid_step or hi % spec.grid_step:
        raise bad("object_size", f"need grid_step <= min <= max <= canvas, multiples of "
                  f"grid_step={spec.grid_step}; got {spec.object_size}")
    if not 1 <= spec.min_objects <= spec.max_objects < len(NUMBER_WORDS):
        raise bad("min_objects/max_objects", f"need 1 <= min <= max <= {len(NUMBER_WORDS) - 1}, "
                  f"got {spec.min_objects}/{spec.max_objects}")
    if spec.max_objects < 2 and any(t != "single_object" and t != "colors" for t in spec.categories):
        raise bad("max_objects", "categories with two or more objects need max_objects >= 2")
    if spec.min_gap < 1:
        raise bad("min_gap", "must be >= 1 so that objects never touch")
    if not 0.0 < spec.min_shape_iou <= 1.0 or spec.color_tolerance <= 0:
        raise bad("min_shape_iou/color_tolerance", "need 0 < min_shape_iou <= 1, tolerance > 0")


def spec_from_kwargs(**kwargs: Any) -> WorldSpec:
    """Build a WorldSpec from config kwargs (lists become tuples); unknown keys are a UserError."""
    known = {f.name for f in fields(WorldSpec)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserError(f"shapes world spec: unknown field(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known))}")
    return WorldSpec(**kwargs)

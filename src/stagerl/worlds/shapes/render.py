"""Rasterise shapes-world scenes: exact, aliasing-free masks on a pixel grid.

Each shape is defined by which pixel *centres* fall inside the ideal figure drawn in its box, so a
shape of box ``w x h`` always touches all four sides of that box. The detector (detect.py) compares
components against these same masks, which is what makes it exact on ground-truth renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from stagerl.worlds.shapes.spec import COLOR_RGB, SHAPES, WorldSpec


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object. Its box is ``[cx - size/2, cx + size/2)`` on each axis, in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with exclusive x1/y1, the convention of Detection.box."""
        half = self.size / 2
        return (int(round(self.cx - half)), int(round(self.cy - half)),
                int(round(self.cx + half)), int(round(self.cy + half)))


def _centres(n: int) -> np.ndarray:
    return np.arange(n) + 0.5  # [n] pixel-centre coordinates inside a box of side n


def _circle(w: int, h: int) -> np.ndarray:
    # An ellipse inscribed in the box (a circle when w == h).
    x = (_centres(w) - w / 2) / (w / 2)
    y = (_centres(h) - h / 2) / (h / 2)
    return (x[None, :] ** 2 + y[:, None] ** 2) <= 1.0 + 1e-9


def _square(w: int, h: int) -> np.ndarray:
    return np.ones((h, w), dtype=bool)


def _triangle(w: int, h: int) -> np.ndarray:
    # Isosceles, apex up: row i spans half-width (i + 1) / h * w / 2 around the box's centre line.
    half = (np.arange(h) + 1) / h * (w / 2)
    return np.abs(_centres(w)[None, :] - w / 2) <= half[:, None] + 1e-9


SHAPE_MASKS: dict[str, Callable[[int, int], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
}
# spec.py names the shapes a world may use, and render draws them: dependencies point one way
# (docs/design.md §15), so the two lists are checked here.
assert set(SHAPE_MASKS) == set(SHAPES), (sorted(SHAPE_MASKS), SHAPES)


@lru_cache(maxsize=4096)
def shape_mask(shape: str, w: int, h: int | None = None) -> np.ndarray:
    """Boolean mask [h, w] of ``shape`` filling a w x h box (read-only, cached)."""
    mask = SHAPE_MASKS[shape](int(w), int(h if h is not None else w))
    mask.setflags(write=False)
    return mask


def render(objects: Sequence[ShapeObject], spec: WorldSpec) -> np.ndarray:
    """Paint objects, in order, on a plain background -> uint8 image [H, W, 3] (H = W = canvas)."""
    image = np.empty((spec.canvas, spec.canvas, 3), dtype=np.uint8)
    image[:] = spec.background_rgb
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        if x0 < 0 or y0 < 0 or x1 > spec.canvas or y1 > spec.canvas:
            raise ValueError(f"object {obj} does not fit a {spec.canvas}px canvas")
        region = image[y0:y1, x0:x1]  # [size, size, 3] view
        region[shape_mask(obj.shape, x1 - x0, y1 - y0)] = _rgb(obj.color)
    return image


def render_batch(scenes: Sequence[Sequence[ShapeObject]], spec: WorldSpec) -> np.ndarray:
    """Render several scenes -> uint8 [N, H, W, 3]."""
    out = np.empty((len(scenes), spec.canvas, spec.canvas, 3), dtype=np.uint8)
    for i, objects in enumerate(scenes):
        out[i] = render(objects, spec)
    return out


def _rgb(color: str) -> tuple[int, int, int]:
    return COLOR_RGB[color]

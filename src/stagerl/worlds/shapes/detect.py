"""The exact detection back end: turn a shapes-world image into GenEval Detections.

Steps:
1. snap every pixel to the nearest palette colour (background included) within
   ``spec.color_tolerance``; farther pixels are "unknown";
2. 4-connected components of equal snapped colour: horizontal runs merged by vectorised
   min-label propagation with pointer jumping (no scipy dependency);
3. a component is a clean object when its box fits the size range and its mask matches the ideal
   shape of that box (render.shape_mask) with IoU >= ``spec.min_shape_iou``; the best-matching
   shape is its class. Matching against the ideal mask, rather than thresholding the fill ratio
   alone, keeps circle (fill ~0.8) and square (1.0) apart even when a few edge pixels are off.
Components smaller than ``spec.min_fragment_pixels`` are ignored speckle; any other component that
is not a clean object (or is off-palette) is a *fragment*, which fails the strict verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from stagerl.geneval import Detection
from stagerl.worlds.shapes.render import ShapeObject, shape_mask
from stagerl.worlds.shapes.spec import WorldSpec


@dataclass
class Fragment:
    """A component that is not a clean object."""

    color: str | None  # snapped colour name, None for off-palette pixels
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends
    pixels: int
    why: str


@dataclass
class SceneParse:
    """What the exact detector saw in one image."""

    detections: list[Detection]  # clean objects, raster order of their first pixel
    fragments: list[Fragment] = field(default_factory=list)
    speckle_pixels: int = 0  # pixels in ignored components below min_fragment_pixels


def objects_to_detections(objects: Sequence[ShapeObject]) -> list[Detection]:
    """Ground-truth detections of drawn objects (what a perfect detector reports)."""
    return [Detection(o.shape, tuple(float(v) for v in o.box), 1.0, o.color) for o in objects]


def snap_colors(image: np.ndarray, spec: WorldSpec) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] int: 0 background, 1..K = spec.colors, K+1 = unknown.

    Exact palette pixels (all of a ground-truth render) are looked up by their 24-bit code; only
    the others pay for the nearest-colour distance computation.
    """
    ref = np.array([spec.background_rgb, *spec.palette.values()], dtype=np.int64)  # [K+1, 3]
    pix = image.reshape(-1, 3).astype(np.int64)  # [HW, 3]
    code = (pix[:, 0] << 16) | (pix[:, 1] << 8) | pix[:, 2]  # [HW]
    ref_code = (ref[:, 0] << 16) | (ref[:, 1] << 8) | ref[:, 2]  # [K+1]
    order = np.argsort(ref_code)
    pos = np.minimum(np.searchsorted(ref_code[order], code), len(ref) - 1)
    idx = order[pos]  # [HW] candidate palette index
    inexact = np.flatnonzero(ref_code[idx] != code)
    if len(inexact):
        d2 = ((pix[inexact, None, :] - ref[None]) ** 2).sum(-1)  # [M, K+1]
        near = d2.argmin(axis=1)
        far = d2[np.arange(len(inexact)), near] > spec.color_tolerance ** 2
        idx[inexact] = np.where(far, len(ref), near)
    return idx.reshape(image.shape[:2])


@dataclass
class _Runs:
    """Horizontal runs of equal class in a flattened [H, W] class map, with component labels."""

    starts: np.ndarray  # [R] flat index of each run's first pixel
    lengths: np.ndarray  # [R] pixels per run
    run_of: np.ndarray  # [HW] run index of every pixel
    fg: np.ndarray  # [R] bool, run is not background
    label: np.ndarray  # [R] component label (flat index of its first pixel); HW for background


def label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero class -> [H, W] labels (-1 for class 0)."""
    h, w = classes.shape
    runs = _label_runs(classes)
    return np.where(classes.ravel() != 0, runs.label[runs.run_of], -1).reshape(h, w)


def _label_runs(classes: np.ndarray) -> _Runs:
    """Label 4-connected components run by run.

    Each component's label is the flat index of its first pixel in raster order. Pixels are first
    grouped into horizontal runs of equal class (a few dozen per image); runs joined by a vertical
    same-class link then repeatedly take the minimum label across each link, and jump to their
    label's own label (pointer jumping), until nothing changes. Convex shapes converge in two or
    three rounds, and every round works on runs and links, not on pixels.
    """
    h, w = classes.shape
    c = classes.ravel()
    big = h * w
    fg = c != 0
    same_left = np.zeros(big, dtype=bool)
    same_left[1:] = c[1:] == c[:-1]
    same_left[::w] = False  # a run never wraps around to the next row
    start = ~same_left  # [HW] True where a run starts
    starts = np.flatnonzero(start)  # [R] first pixel of each run
    run_of = np.cumsum(start) - 1  # [HW] run index of every pixel
    run_fg = fg[starts]  # [R]
    linked = np.flatnonzero(fg[:-w] & (c[:-w] == c[w:]))  # [E] pixel p joins p + w
    upper, lower = run_of[linked], run_of[linked + w]  # [E] run indices at both ends
    run_lab = np.where(run_fg, starts, big)  # [R] label per run
    while True:
        new = run_lab.copy()
        np.minimum.at(new, upper, run_lab[lower])
        np.minimum.at(new, lower, run_lab[upper])
        new[run_fg] = new[run_of[new[run_fg]]]  # pointer jumping through the label's own run
        if not (new != run_lab).any():
            break
        run_lab = new
    lengths = np.diff(np.append(starts, big))
    return _Runs(starts, lengths, run_of, run_fg, run_lab)


def _classify(crop: np.ndarray, spec: WorldSpec) -> tuple[str | None, float]:
    """Best-matching shape of a component mask [h, w] and its IoU with the ideal shape."""
    h, w = crop.shape
    area = crop.sum()
    best, best_iou = None, -1.0
    for shape in spec.shapes:
        ideal = shape_mask(shape, w, h)
        inter = np.count_nonzero(crop & ideal)
        iou = inter / (area + np.count_nonzero(ideal) - inter)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def parse_image(image: np.ndarray, spec: WorldSpec = WorldSpec()) -> SceneParse:
    """Detect clean objects and fragments in a uint8 [H, W, 3] shapes-world image."""
    classes = snap_colors(image, spec)
    w = classes.shape[1]
    runs = _label_runs(classes)
    labels = np.where(classes.ravel() != 0, runs.label[runs.run_of], -1).reshape(classes.shape)
    # Component statistics from the (few) foreground runs rather than from pixels.
    starts, lengths = runs.starts[runs.fg], runs.lengths[runs.fg]  # [R']
    roots, inv = np.unique(runs.label[runs.fg], return_inverse=True)  # [n], [R']
    n = len(roots)
    size = np.bincount(inv, weights=lengths, minlength=n).astype(np.int64)
    ry, rx0 = np.divmod(starts, w)
    x0 = np.full(n, w); y0 = np.full(n, classes.shape[0])  # noqa: E702
    x1 = np.zeros(n, dtype=np.int64); y1 = np.zeros(n, dtype=np.int64)  # noqa: E702
    np.minimum.at(x0, inv, rx0); np.minimum.at(y0, inv, ry)  # noqa: E702
    np.maximum.at(x1, inv, rx0 + lengths); np.maximum.at(y1, inv, ry + 1)  # noqa: E702
    names = (None, *spec.colors, None)  # class index -> colour name (unknown -> None)
    lo, hi = spec.object_size[0] - spec.size_slack, spec.object_size[1] + spec.size_slack
    out = SceneParse(detections=[])
    for i, root in enumerate(roots):
        box = (int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]))
        color = names[classes.flat[root]]
        if size[i] < spec.min_fragment_pixels:
            out.speckle_pixels += int(size[i])
            continue
        bw, bh = box[2] - box[0], box[3] - box[1]
        if color is None:
            why = "off-palette colour"
        elif not (lo <= bw <= hi and lo <= bh <= hi and abs(bw - bh) <= spec.size_slack):
            why = f"box {bw}x{bh} outside object sizes"
        else:
            crop = labels[box[1]:box[3], box[0]:box[2]] == root  # [bh, bw]
            shape, iou = _classify(crop, spec)
            if shape is not None and iou >= spec.min_shape_iou:
                out.detections.append(Detection(shape, tuple(float(v) for v in box), 1.0, color))
                continue
            why = f"no clean shape (best {shape} IoU {iou:.2f})"
        out.fragments.append(Fragment(color, box, int(size[i]), why))
    return out

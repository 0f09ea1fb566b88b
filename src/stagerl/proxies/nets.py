"""Learned proxy rewards of the shapes world: the two networks and how their outputs are read.

The exact evaluator (``detect.py`` + ``evaluate.py``) is the *gold* reward. A proxy is a small
network trained to imitate it, the way the paper's rewards are learned models (docs/rewards.md,
"Learned proxy rewards"):

- :class:`DetectorNet`, the analogue of GenEval's learned detector. A CenterNet-style head
  (Zhou, Wang and Krähenbühl, "Objects as Points", arXiv 1904.07850: one objectness peak per
  object at its centre cell, plus per-cell class, colour and box) over a stride-2 grid.
  :func:`decode_detections` turns its output into the same :class:`SceneParse` the exact back end
  produces (clean objects as ``Detection``s, unclean components as ``Fragment``s), so its strict and
  lenient verdicts come from the same rule code as the gold ones
  (:func:`stagerl.worlds.shapes.evaluate.verdict_from_parse`).
- :class:`ScorerNet`, the analogue of HPS / ImageReward: (image, prompt) -> a logit of the
  probability that the strict verdict passes. The prompt is read word by word (the policy's word
  vocabulary) by a GRU and modulates the image features by FiLM (Perez et al., arXiv 1709.07871).

Both are plain convolution stacks whose width is the capacity knob; nothing here depends on the
canvas size except through the spec the proxy was built for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stagerl.geneval import Detection
from stagerl.worlds.shapes.detect import Fragment, SceneParse
from stagerl.worlds.shapes.spec import WorldSpec

STRIDE = 2  # detector grid: one cell per 2x2 pixels (objects sit on the 2-pixel grid)
FRAGMENT = "fragment"  # the detector's extra class: a component that is not a clean shape
UNKNOWN = "unknown"  # the detector's extra colour: off-palette pixels


def as_input(images: Tensor) -> Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _Res(nn.Module):
    """3x3 convolution with dilation, residual, ReLU."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv(x))


@dataclass
class DetectorOutput:
    """Raw detector maps over the [gh, gw] grid."""

    objectness: Tensor  # [N, gh, gw] logits
    kind: Tensor  # [N, S+1, gh, gw] logits: spec.shapes, then FRAGMENT
    color: Tensor  # [N, C+1, gh, gw] logits: spec.colors, then UNKNOWN
    box: Tensor  # [N, 4, gh, gw]: centre offset in cells (dx, dy), then (w, h) / 8 pixels


class DetectorNet(nn.Module):
    """Stride-2 fully convolutional detector; the dilated stack sees the whole 32-pixel canvas."""

    def __init__(self, n_shapes: int, n_colors: int, width: int = 32) -> None:
        super().__init__()
        self.n_shapes, self.n_colors = n_shapes, n_colors
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=STRIDE, padding=1), nn.ReLU())
        self.body = nn.Sequential(*[_Res(width, d) for d in (1, 2, 4, 2, 1)])
        self.head = nn.Conv2d(width, 1 + (n_shapes + 1) + (n_colors + 1) + 4, 1)

    def forward(self, x: Tensor) -> DetectorOutput:
        out = self.head(self.body(self.stem(x)))  # [N, 1 + S+1 + C+1 + 4, gh, gw]
        s, c = self.n_shapes + 1, self.n_colors + 1
        return DetectorOutput(out[:, 0], out[:, 1:1 + s], out[:, 1 + s:1 + s + c],
                              out[:, 1 + s + c:])


def decode_detections(out: DetectorOutput, spec: WorldSpec,
                      threshold: float = 0.5) -> list[SceneParse]:
    """Peaks of the objectness map (3x3 local maxima above ``threshold``) -> one SceneParse per
    image: a peak read as a shape with a palette colour is a ``Detection`` (score = objectness),
    a peak read as FRAGMENT or UNKNOWN colour is a ``Fragment``."""
    prob = torch.sigmoid(out.objectness)  # [N, gh, gw]
    peaks = (prob == F.max_pool2d(prob[:, None], 3, stride=1, padding=1)[:, 0]) & (prob > threshold)
    kinds = out.kind.argmax(1)  # [N, gh, gw]
    colors = out.color.argmax(1)  # [N, gh, gw]
    shapes, palette = list(spec.shapes), list(spec.colors)
    parses = []
    for n in range(prob.shape[0]):
        parse = SceneParse(detections=[])
        for gy, gx in peaks[n].nonzero().tolist():
            dx, dy, w8, h8 = out.box[n, :, gy, gx].tolist()
            cx, cy = STRIDE * (gx + 0.5 + dx), STRIDE * (gy + 0.5 + dy)
            w, h = max(1.0, 8.0 * w8), max(1.0, 8.0 * h8)
            box = tuple(float(round(v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
            k, c = int(kinds[n, gy, gx]), int(colors[n, gy, gx])
            color = palette[c] if c < len(palette) else None
            if k < len(shapes) and color is not None:
                parse.detections.append(Detection(shapes[k], box, float(prob[n, gy, gx]), color))
            else:
                why = "proxy: unclean component" if k >= len(shapes) else "proxy: off-palette"
                parse.fragments.append(Fragment(color, tuple(int(v) for v in box),
                                                int(round(w * h)), why))
        parses.append(parse)
    return parses


class ScorerNet(nn.Module):
    """(image, prompt words) -> logit of P(strict verdict passes)."""

    def __init__(self, vocab_size: int, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.text = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.film = nn.Linear(2 * width, 4 * width)  # (gamma, beta) for two FiLM layers
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                                  _Res(width, 1), _Res(width, 2))
        self.mid = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.top = nn.Conv2d(width, width, 3, padding=2, dilation=2)
        self.out = nn.Sequential(nn.Linear(2 * width + 2 * width, width), nn.ReLU(),
                                 nn.Linear(width, 1))

    def encode_text(self, ids: Tensor) -> Tensor:
        """[N, T] word ids (left-padded, 0 = pad) -> [N, 2 * width]: the GRU's last states both
        ways."""
        _, h = self.text(self.embed(ids))  # h [2, N, width]
        return torch.cat([h[0], h[1]], dim=-1)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        t = self.encode_text(ids)  # [N, 2w]
        g1, b1, g2, b2 = self.film(t)[:, :, None, None].chunk(4, dim=1)  # each [N, w, 1, 1]
        h = self.stem(x)  # [N, w, H/2, W/2]
        h = F.relu(self.mid(h) * (1 + g1) + b1)  # [N, w, H/4, W/4]
        h = F.relu(self.top(h) * (1 + g2) + b2)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=-1)  # [N, 2w]
        return self.out(torch.cat([pooled, t], dim=-1))[:, 0]  # [N]

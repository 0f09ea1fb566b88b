"""The shapes world: an embedded GenEval-style benchmark with an exact evaluator.

- :mod:`.spec`: :class:`WorldSpec`, every knob of the world;
- :mod:`.render`: :class:`ShapeObject` and :func:`render`;
- :mod:`.prompts`: :func:`generate` seeded (prompt, metadata, scene) examples for four splits;
- :mod:`.detect`: the exact detector -> GenEval Detections;
- :mod:`.evaluate`: strict / lenient verdicts, partial credit and per-category tables.
"""

from stagerl.worlds.shapes.evaluate import (Verdict, category_table, evaluate_batch,
                                            evaluate_image)
from stagerl.worlds.shapes.prompts import SPLITS, TEMPLATES, Example, generate, prompt_vocabulary
from stagerl.worlds.shapes.render import ShapeObject, render, render_batch, shape_mask
from stagerl.worlds.shapes.spec import COLOR_RGB, GENEVAL_TAGS, WorldSpec, spec_from_kwargs

__all__ = ["COLOR_RGB", "Example", "GENEVAL_TAGS", "SPLITS", "ShapeObject", "TEMPLATES", "Verdict",
           "WorldSpec", "category_table", "evaluate_batch", "evaluate_image", "generate",
           "prompt_vocabulary", "render", "render_batch", "shape_mask", "spec_from_kwargs"]

"""Shapes world: spec validation, rendering, and the seeded prompt generator's splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stagerl.errors import UserError
from stagerl.worlds.shapes import (COLOR_RGB, SPLITS, TEMPLATES, ShapeObject, WorldSpec, generate,
                                   prompt_vocabulary, render, shape_mask, spec_from_kwargs)
from stagerl.worlds.shapes.prompts import COMPOSITIONAL_TAGS

SPEC = WorldSpec()


@pytest.fixture(scope="module")
def examples():
    return {s: generate(600, 7, SPEC, s) for s in SPLITS}


# -- spec ----------------------------------------------------------------------------------------
def test_spec_defaults_and_derived_values():
    assert SPEC.canvas == 32 and SPEC.grid_step == 2
    assert SPEC.categories == ("single_object", "two_object", "counting", "colors", "position",
                               "color_attr")
    assert len(SPEC.colors) == 6 and SPEC.background not in SPEC.colors
    assert SPEC.sizes == (8, 10, 12) and SPEC.counts == (2, 3, 4)
    rgb = np.array([COLOR_RGB[c] for c in (*SPEC.colors, SPEC.background)])
    dist = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    assert dist[~np.eye(len(rgb), dtype=bool)].min() > 2 * SPEC.color_tolerance  # unambiguous


@pytest.mark.parametrize("kwargs, match", [
    ({"background": "red"}, "background"),
    ({"shapes": ("circle", "hexagon")}, "hexagon"),
    ({"colors": ("red", "teal")}, "teal"),
    ({"object_size": (8, 40)}, "object_size"),
    ({"object_size": (7, 11)}, "object_size"),
    ({"max_objects": 11}, "max_objects"),
    ({"relations": ("near",)}, "near"),
    ({"categories": ("counting", "vqa")}, "vqa"),
])
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(UserError, match=match):
        WorldSpec(**kwargs)


def test_spec_from_kwargs_converts_lists_and_rejects_unknown_keys():
    spec = spec_from_kwargs(canvas=48, colors=["red", "blue", "pink"], object_size=[8, 14])
    assert spec.colors == ("red", "blue", "pink") and spec.object_size == (8, 14)
    hash(spec)  # frozen and hashable after list -> tuple conversion
    with pytest.raises(UserError, match="canvass"):
        spec_from_kwargs(canvass=48)


# -- rendering -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [6, 8, 10, 12, 16])
def test_masks_fill_their_box_and_have_ordered_fill_ratios(size):
    fills = {}
    for shape in ("circle", "square", "triangle"):
        m = shape_mask(shape, size)
        assert m.shape == (size, size)
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()  # touches box
        np.testing.assert_array_equal(m, m[:, ::-1])  # left-right symmetric
        fills[shape] = m.mean()
    assert fills["triangle"] < 0.7 < fills["circle"] < 0.95 < fills["square"] == 1.0
    tri = shape_mask("triangle", size)
    assert tri.sum(axis=1).tolist() == sorted(tri.sum(axis=1).tolist())  # apex up


def test_render_paints_exact_colours_on_the_background():
    objs = [ShapeObject("square", "red", 6.0, 6.0, 8), ShapeObject("circle", "blue", 20.0, 20.0, 12)]
    img = render(objs, SPEC)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[2:10, 2:10] == COLOR_RGB["red"]).all()
    blue = (img == COLOR_RGB["blue"]).all(-1)
    assert blue.sum() == shape_mask("circle", 12).sum() and blue[14:26, 14:26].sum() == blue.sum()
    rest = np.ones((32, 32), dtype=bool)
    rest[2:10, 2:10] = False
    rest &= ~blue
    assert (img[rest] == COLOR_RGB["white"]).all()
    with pytest.raises(ValueError, match="fit"):
        render([ShapeObject("square", "red", 30.0, 30.0, 8)], SPEC)


# -- generator -----------------------------------------------------------------------------------
def test_generate_is_deterministic_and_prefix_stable():
    a = generate(60, 3)
    assert [(e.prompt, e.metadata, e.objects) for e in a] == \
        [(e.prompt, e.metadata, e.objects) for e in generate(60, 3)]
    assert [e.objects for e in generate(20, 3)] == [e.objects for e in a[:20]]
    assert [e.objects for e in generate(60, 4)] != [e.objects for e in a]
    assert [e.objects for e in generate(60, 3, split="test")] != [e.objects for e in a]


def test_metadata_follows_geneval_schema(examples):
    for split, exs in examples.items():
        tags = {e.tag for e in exs}
        want = set(COMPOSITIONAL_TAGS) if split == "compositions" else set(SPEC.categories)
        assert tags == want, split
        for e in exs:
            md = e.metadata
            assert md["prompt"] == e.prompt and md["tag"] == e.tag
            for c in md["include"]:
                assert c["class"] in SPEC.shapes and c["count"] >= 1
                assert c.get("color") is None or c["color"] in SPEC.colors
            n_drawn = sum(c["count"] for c in md["include"])
            assert len(e.objects) == n_drawn  # exactly the requested objects are drawn
            if e.tag == "counting":
                (inc,), (exc,) = md["include"], md["exclude"]
                assert exc == {"class": inc["class"], "count": inc["count"] + 1}
                assert inc["count"] in SPEC.counts
            else:
                assert "exclude" not in md
            if e.tag == "position":
                ref, obj = md["include"]
                assert "position" not in ref and obj["position"][1] == 0
                assert obj["position"][0] in SPEC.relations
                rel = obj["position"][0]
                assert (f"{obj['class']} {rel} a {ref['class']}" in e.prompt
                        or f"{obj['class']} is {rel} a {ref['class']}" in e.prompt), e.prompt
            if e.tag in ("colors", "color_attr"):
                assert all(c["color"] for c in md["include"])
                assert all(o.color == c["color"] for o, c in zip(e.objects, md["include"]))
            if e.tag in ("two_object", "color_attr", "position"):
                assert len({c["class"] for c in md["include"]}) == 2


def test_scenes_fit_the_canvas_grid_and_never_touch(examples):
    g = SPEC.min_gap
    for e in examples["train"]:
        boxes = [o.box for o in e.objects]
        for o, (x0, y0, x1, y1) in zip(e.objects, boxes):
            assert 0 <= x0 and 0 <= y0 and x1 <= SPEC.canvas and y1 <= SPEC.canvas
            assert x0 % SPEC.grid_step == 0 and y0 % SPEC.grid_step == 0 and o.size in SPEC.sizes
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] + g <= b[0] or b[2] + g <= a[0] or a[3] + g <= b[1] or b[3] + g <= a[1]


def test_prompts_read_naturally():
    ex = generate(300, 11)
    prompts = {e.prompt for e in ex}
    assert any(p.startswith("a photo of two ") or p.startswith("a photo of three ") for p in prompts)
    for e in ex:
        assert "  " not in e.prompt and "{" not in e.prompt
        words = e.prompt.split()
        for art, nxt in zip(words, words[1:]):
            if art in ("a", "an"):
                assert (art == "an") == (nxt[0] in "aeiou"), e.prompt
        if e.tag == "counting":
            assert e.metadata["include"][0]["class"] + "s" in e.prompt


def _combos(e):
    md = e.metadata
    pairs = {(o.color, o.shape) for o in e.objects}
    asked = {(c["color"], c["class"]) for c in md["include"] if c.get("color")}
    counts = {(c["count"], c["class"]) for c in md["include"]} if e.tag == "counting" else set()
    rels = set()
    if e.tag == "position":
        ref, obj = md["include"]
        rels = {(obj["class"], obj["position"][0], ref["class"])}
    return pairs, asked, counts, rels


def test_train_and_test_never_see_heldout_compositions(examples):
    held_p, held_c, held_r = (SPEC.heldout_pair_set(), SPEC.heldout_count_set(),
                              SPEC.heldout_relation_set())
    assert len(held_p) == 3 and len(held_c) == 3 and len(held_r) == 4
    for split in ("train", "test", "phrasings"):
        for e in examples[split]:
            pairs, _, counts, rels = _combos(e)
            assert not pairs & held_p and not counts & held_c and not rels & held_r, e.prompt
    for e in examples["compositions"]:
        _, asked, counts, rels = _combos(e)
        assert asked & held_p or counts & held_c or rels & held_r, e.prompt
    # the compositions split covers every held-out combination
    seen = set().union(*(set().union(*_combos(e)[1:]) for e in examples["compositions"]))
    assert held_p | held_c | held_r <= seen


def test_phrasings_use_only_heldout_templates_made_of_training_words(examples):
    train_words = {w for tr, _ in TEMPLATES.values() for t in tr for w in t.split()}
    for tag, (train, held) in TEMPLATES.items():
        assert len(train) >= 2 and len(held) >= 2 and not set(train) & set(held), tag
        for t in held:
            assert {w for w in t.split() if not w.startswith("{")} <= train_words, t
    for split in ("train", "test"):
        assert all(e.template in TEMPLATES[e.tag][0] for e in examples[split])
    assert all(e.template in TEMPLATES[e.tag][1] for e in examples["phrasings"])
    used = {(e.tag, e.template) for e in examples["phrasings"]}
    assert used == {(t, h) for t, (_, held) in TEMPLATES.items() for h in held}
    vocab = set(prompt_vocabulary(SPEC))
    train_vocab = {w for e in examples["train"] for w in e.prompt.split()}
    assert {w for e in examples["phrasings"] for w in e.prompt.split()} <= train_vocab <= vocab


def test_harder_variant_generates():
    spec = dataclasses.replace(SPEC, canvas=48, colors=("red", "blue", "green", "pink", "brown"),
                               max_objects=6, object_size=(8, 14))
    ex = generate(120, 0, spec)
    assert max(len(e.objects) for e in ex) == 6
    assert {o.color for e in ex for o in e.objects} == set(spec.colors)
    assert render(ex[0].objects, spec).shape == (48, 48, 3)


def test_bad_split_and_crowded_world_are_user_errors():
    with pytest.raises(UserError, match="split"):
        generate(3, 0, split="validation")
    crowded = WorldSpec(canvas=16, object_size=(8, 8), categories=("counting",), max_objects=4)
    with pytest.raises(UserError, match="place"):
        generate(10, 0, crowded)

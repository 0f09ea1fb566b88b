"""The exact shapes-world evaluator and the shapes_* rewards."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards import build_reward
from stagerl.worlds.shapes import (SPLITS, ShapeObject, WorldSpec, category_table, evaluate_batch,
                                   evaluate_image, generate, render)
from stagerl.worlds.shapes.detect import label_components, parse_image

SPEC = WorldSpec()


def first(tag, seed=0, split="train"):
    return next(e for e in generate(60, seed, SPEC, split) if e.tag == tag)


def verdict(objects, meta, spec=SPEC):
    return evaluate_image(render(objects, spec), meta, spec)


def free_spot(objects, size=8, spec=SPEC):
    """Centre of a size x size box that keeps min_gap from every object (None if full)."""
    for y in range(0, spec.canvas - size + 1, 2):
        for x in range(0, spec.canvas - size + 1, 2):
            box = (x, y, x + size, y + size)
            g = spec.min_gap
            if all(box[2] + g <= b[0] or b[2] + g <= box[0] or box[3] + g <= b[1]
                   or b[3] + g <= box[1] for b in (o.box for o in objects)):
                return x + size / 2, y + size / 2
    return None


# -- ground truth --------------------------------------------------------------------------------
def test_ground_truth_renders_pass_strictly_on_every_split():
    n = 0
    for i, split in enumerate(SPLITS):
        ex = generate(600, 100 + i, SPEC, split)
        images = np.stack([e.image(SPEC) for e in ex])  # [N, H, W, 3]
        verdicts = evaluate_batch(images, [e.metadata for e in ex], SPEC)
        failed = [(e.prompt, v.reason) for e, v in zip(ex, verdicts) if not v.strict]
        assert not failed, failed[:5]
        assert all(v.lenient and v.score == 1.0 for v in verdicts)
        for e, v in zip(ex, verdicts):  # the detector recovers exactly what was drawn
            got = sorted((d.label, d.color, d.box) for d in v.detections)
            assert got == sorted((o.shape, o.color, tuple(map(float, o.box))) for o in e.objects)
        table = category_table(verdicts, [e.metadata for e in ex])
        assert table["overall"] == 1.0 and len(table) == len({e.tag for e in ex}) + 1
        n += len(ex)
    assert n >= 2000


def test_harder_variant_ground_truth_passes():
    spec = dataclasses.replace(SPEC, canvas=48, colors=("red", "blue", "green", "pink", "brown"),
                               max_objects=6, object_size=(8, 14))
    ex = generate(200, 1, spec)
    assert all(evaluate_image(e.image(spec), e.metadata, spec).strict for e in ex)


def test_mild_colour_noise_is_tolerated():
    rng = np.random.default_rng(0)
    ex = generate(120, 5)
    for e in ex:
        noisy = e.image().astype(int) + rng.integers(-20, 21, (32, 32, 3))
        assert evaluate_image(np.clip(noisy, 0, 255).astype(np.uint8), e.metadata).strict


def test_pil_and_array_inputs_agree_and_bad_sizes_raise():
    e = first("color_attr")
    a = evaluate_image(e.image(), e.metadata)
    b = evaluate_image(Image.fromarray(e.image()).convert("RGBA"), e.metadata)
    assert (a.strict, a.lenient, a.score) == (b.strict, b.lenient, b.score) == (True, True, 1.0)
    with pytest.raises(ValueError, match="32x32"):
        evaluate_image(np.zeros((64, 64, 3), np.uint8), e.metadata)
    with pytest.raises(ValueError, match="uint8"):
        evaluate_image(e.image() / 255.0, e.metadata)


# -- specific failures ---------------------------------------------------------------------------
def test_wrong_count_fails():
    e = first("counting")
    n = e.metadata["include"][0]["count"]
    fewer = verdict(e.objects[:-1], e.metadata)
    assert not fewer.strict and not fewer.lenient and 0 < fewer.score < 1
    spot = free_spot(e.objects)
    more = e.objects + [ShapeObject(e.objects[0].shape, "red", *spot, 8)]
    v = verdict(more, e.metadata)
    assert not v.strict and not v.lenient and f"<{n + 1}, found {n + 1}" in v.reason


def test_wrong_colour_fails():
    e = first("colors")
    (obj,), want = e.objects, e.metadata["include"][0]["color"]
    other = next(c for c in SPEC.colors if c != want)
    v = verdict([dataclasses.replace(obj, color=other)], e.metadata)
    assert not v.strict and not v.lenient and v.score == 0.5  # count term 1, colour term 0
    e2 = first("color_attr")
    a, b = e2.objects
    swapped = [dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)]
    assert not verdict(swapped, e2.metadata).lenient


@pytest.mark.parametrize("seed", range(4))
def test_swapped_relation_fails(seed):
    e = first("position", seed)
    rel = e.metadata["include"][1]["position"][0]
    # mirror the scene across the relation's axis: the relation flips, everything else stays
    if rel in ("left of", "right of"):
        mirrored = [dataclasses.replace(o, cx=SPEC.canvas - o.cx) for o in e.objects]
    else:
        mirrored = [dataclasses.replace(o, cy=SPEC.canvas - o.cy) for o in e.objects]
    v = verdict(mirrored, e.metadata)
    assert not v.strict and not v.lenient and "target" in v.reason
    assert v.score == pytest.approx(2 / 3)  # fixed: counts 1, 1, relation 0
    parity = evaluate_image(render(mirrored, SPEC), e.metadata, SPEC, variant="parity")
    assert parity.score == pytest.approx(3 / 4)  # the original's 0-and-1 quirk


def test_extra_object_fails_strict_only():
    e = first("single_object")
    other = next(s for s in SPEC.shapes if s != e.objects[0].shape)
    v = verdict(e.objects + [ShapeObject(other, "green", *free_spot(e.objects), 8)], e.metadata)
    assert v.lenient and not v.strict and len(v.unrequested) == 1 and "unrequested" in v.reason
    same = verdict(e.objects + [ShapeObject(e.objects[0].shape, "blue",
                                            *free_spot(e.objects), 8)], e.metadata)
    assert same.lenient and not same.strict  # a second copy is also unrequested


def test_fragment_and_noise_blob_fail_strict_but_speckle_is_ignored():
    e = first("two_object")
    img = e.image()
    x, y = (int(v) - 4 for v in free_spot(e.objects))
    blob = img.copy()
    blob[y:y + 3, x:x + 3] = (0, 0, 255)  # a 3x3 blue blob: too small to be an object
    v = evaluate_image(blob, e.metadata)
    assert v.lenient and not v.strict and v.fragments and "fragment" in v.reason
    half = img.copy()
    half[y:y + 4, x:x + 8] = (255, 0, 0)  # half a square: 8x4 box, wrong aspect
    assert not evaluate_image(half, e.metadata).strict
    grey = img.copy()
    grey[y:y + 8, x:x + 8] = (128, 128, 128)  # an off-palette square
    v = evaluate_image(grey, e.metadata)
    assert not v.strict and v.fragments[0].color is None
    dot = img.copy()
    dot[y, x] = (255, 0, 0)  # a single stray pixel is speckle, not an object
    assert evaluate_image(dot, e.metadata).strict


def test_touching_same_colour_objects_are_a_fragment():
    objs = [ShapeObject("square", "red", 8.0, 8.0, 8), ShapeObject("square", "red", 16.0, 8.0, 8)]
    meta = {"tag": "counting", "include": [{"class": "square", "count": 2}],
            "exclude": [{"class": "square", "count": 3}]}
    v = verdict(objs, meta)
    assert not v.strict and not v.lenient and v.fragments


def test_noise_and_clutter_score_zero_strict():
    rng = np.random.default_rng(0)
    ex = generate(300, 9)
    noise = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    assert sum(v.strict for v in evaluate_batch(noise, [e.metadata for e in ex])) == 0
    # palette clutter: random palette colour per 4x4 patch, as an untrained tokenizer model paints
    pal = np.array([SPEC.background_rgb, *SPEC.palette.values()], dtype=np.uint8)
    patches = rng.integers(0, len(pal), (300, 8, 8))
    clutter = pal[patches].repeat(4, axis=1).repeat(4, axis=2)  # [N, 32, 32, 3]
    verdicts = evaluate_batch(clutter, [e.metadata for e in ex])
    assert sum(v.strict for v in verdicts) == 0


def test_labelling_matches_a_reference_flood_fill():
    rng = np.random.default_rng(1)

    def flood(c):
        lab = -np.ones(c.shape, int)
        h, w = c.shape
        for p in range(h * w):
            y, x = divmod(p, w)
            if c[y, x] == 0 or lab[y, x] >= 0:
                continue
            stack, lab[y, x] = [(y, x)], p
            while stack:
                a, b = stack.pop()
                for u, v in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= u < h and 0 <= v < w and lab[u, v] < 0 and c[u, v] == c[a, b]:
                        lab[u, v] = p
                        stack.append((u, v))
        return lab

    for _ in range(100):
        c = rng.integers(0, rng.integers(2, 5), tuple(rng.integers(1, 16, 2)))
        np.testing.assert_array_equal(label_components(c), flood(c))
    spiral = np.zeros((9, 9), int)
    spiral[0, :], spiral[:, 8], spiral[8, :], spiral[2:, 0], spiral[2, :7] = 1, 1, 1, 1, 1
    spiral[2:7, 6], spiral[6, 2:7], spiral[4:7, 2], spiral[4, 2:5] = 1, 1, 1, 1
    np.testing.assert_array_equal(label_components(spiral), flood(spiral))


def test_parse_reports_boxes_in_pixels():
    objs = [ShapeObject("triangle", "purple", 11.0, 9.0, 10)]
    (d,) = parse_image(render(objs, SPEC), SPEC).detections
    assert (d.label, d.color, d.box, d.score) == ("triangle", "purple", (6.0, 4.0, 16.0, 14.0), 1.0)


# -- tables and rewards --------------------------------------------------------------------------
def test_category_table_is_mean_of_tag_means():
    ex = [first("single_object"), first("counting"), first("counting", 1), first("counting", 2)]
    metas = [e.metadata for e in ex]
    objs = [ex[0].objects, ex[1].objects[:-1], ex[2].objects, ex[3].objects]
    vs = [verdict(o, m) for o, m in zip(objs, metas)]
    table = category_table(vs, metas)
    assert table == {"single_object": 1.0, "counting": pytest.approx(2 / 3),
                     "overall": pytest.approx(5 / 6)}
    assert category_table(vs, metas, key="score")["single_object"] == 1.0
    with pytest.raises(ValueError):
        category_table(vs, metas, key="nope")


def test_rewards_batching_equals_one_at_a_time_and_marks_bad_images():
    ex = generate(24, 2)
    imgs = [Image.fromarray(e.image()) for e in ex]
    rng = np.random.default_rng(3)
    for i in range(0, 24, 3):  # break a third of them
        imgs[i] = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    prompts, metas = [e.prompt for e in ex], [e.metadata for e in ex]
    for name, kw in (("shapes_strict", {}), ("shapes_lenient", {}),
                     ("shapes_partial", {"variant": "fixed"}),
                     ("shapes_partial", {"variant": "parity"})):
        fn = build_reward(name, **kw)
        out = fn(imgs, prompts, metas)
        assert out.scores.shape == (24,) and out.valid.all()
        single = [fn([im], [p], [m]).scores.item() for im, p, m in zip(imgs, prompts, metas)]
        assert out.scores.tolist() == single
        if name != "shapes_partial":
            assert set(out.scores.tolist()) == {0.0, 1.0}
    strict = build_reward("shapes_strict")(imgs, prompts, metas).scores
    assert strict.tolist() == [0.0 if i % 3 == 0 else 1.0 for i in range(24)]
    bad = build_reward("shapes_strict")([Image.new("RGB", (64, 64))] + imgs[1:2], prompts[:2],
                                        metas[:2])
    assert bad.valid.tolist() == [False, True] and "error" in bad.details[0]


def test_reward_kwargs_configure_the_world():
    spec = WorldSpec(canvas=48)
    ex = generate(6, 0, spec)
    fn = build_reward("shapes_strict", canvas=48)
    out = fn([Image.fromarray(e.image(spec)) for e in ex], [e.prompt for e in ex],
             [e.metadata for e in ex])
    assert out.scores.tolist() == [1.0] * 6
    with pytest.raises(UserError, match="canvass"):
        build_reward("shapes_strict", canvass=48)
    with pytest.raises(UserError, match="variant"):
        build_reward("shapes_partial", variant="exact")


def test_prompt_without_geneval_clauses_is_invalid_not_zero():
    from stagerl.rewards import build_reward

    img = Image.new("RGB", (32, 32), "white")
    out = build_reward("shapes_strict")([img, img], ["a red car", "a red car"],
                                        [{"prompt": "a red car"}, {}])
    assert out.valid.tolist() == [False, False]
    assert "no GenEval metadata" in out.details[0]["error"]

"""The learned GenEval back end on tiny random transformers detectors + a tiny random CLIP.

The rule engine itself is tested by its own suite; here we test that detections, labels, masks and
colours reach it correctly, for Mask2Former, OWLv2 and GroundingDINO checkpoints.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards import build_reward
from stagerl.rewards.detector import (COLORS, COLOR_TEMPLATES, canonical_label, color_crop,
                                      match_phrase)
from stagerl.geneval import Detection, evaluate_detections
from test_rewards_tiny import (random_images, save_tiny_clip, save_tiny_grounding_dino,
                               save_tiny_mask2former, save_tiny_owlv2)

CAT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}
DOG = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}
RED_CAT = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}],
           "prompt": "a red cat"}
TWO = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                      {"class": "bench", "count": 1, "position": ["left of", 0]}],
       "exclude": [{"class": "dog", "count": 1}], "prompt": "a bench left of a cat"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    mk = tmp_path_factory.mktemp
    return {"clip": save_tiny_clip(mk("clip")), "m2f": save_tiny_mask2former(mk("m2f"), "cat"),
            "owl": save_tiny_owlv2(mk("owl")), "gdino": save_tiny_grounding_dino(mk("gd"))}


def _geneval(dirs, det="m2f", **kw):
    return build_reward("geneval", checkpoint=str(dirs[det]), color_checkpoint=str(dirs["clip"]),
                        device="cpu", **kw)


def test_labels_and_phrases():
    assert canonical_label("keyboard") == "computer keyboard"
    assert canonical_label("Remote") == "tv remote" and canonical_label("cat") == "cat"
    assert match_phrase("cat", ["cat", "hot dog"]) == "cat"
    assert match_phrase("hot dog", ["dog", "hot dog"]) == "hot dog"
    assert match_phrase("red", ["cat"]) is None


def test_color_crop_pastes_mask_on_grey_and_crops():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    mask = np.zeros((10, 20), bool)
    mask[2:6, 4:8] = True
    crop = color_crop(img, Detection("cat", (2.0, 1.0, 10.0, 8.0), 1.0, mask=mask))
    a = np.asarray(crop)
    assert crop.size == (8, 7)
    assert (a[1:5, 2:6] == [255, 0, 0]).all()  # inside the mask: the object
    assert (a[0] == [153, 153, 153]).all() and (a[:, 7] == [153, 153, 153]).all()  # #999 grey
    plain = np.asarray(color_crop(img, Detection("cat", (2.0, 1.0, 10.0, 8.0))))
    assert (plain == [255, 0, 0]).all()  # no mask (box detectors): the plain box crop


def test_color_head_averages_three_templates(dirs):
    fn = _geneval(dirs)
    fn.ensure_loaded()
    head = fn.colors.head("cat")  # [10, D]
    emb = fn.colors.embedder
    manual = torch.stack([emb.text_embeds([t.format(c=c, obj="cat") for c in COLORS])
                          for t in COLOR_TEMPLATES]).mean(0)
    torch.testing.assert_close(head, torch.nn.functional.normalize(manual, dim=-1))
    out = fn.colors.classify(random_images(3), ["cat"] * 3)
    assert len(out) == 3 and set(out) <= set(COLORS)


def test_mask2former_end_to_end(dirs):
    images = random_images(4, size=40)
    metas = [CAT, DOG, RED_CAT, TWO]
    fn = _geneval(dirs, batch_size=4)
    out = fn(images, [m["prompt"] for m in metas], metas)
    assert out.valid.all(), out.details
    d = out.details
    assert d[0]["backend"].startswith("mask2former:")
    cats = [x for x in d[0]["detections"] if x[0] == "cat"]
    assert cats and all(s > 0.3 for _, s, _ in cats)  # the biased head finds cats ...
    assert d[0]["correct"]  # strict: >= 1 cat; partial: Flow-GRPO's count term, clamped (fixed)
    assert out.scores[0] == pytest.approx(max(0.0, 1 - abs(1 - len(cats))))
    assert not d[1]["correct"] and out.scores[1] == 0.0  # ... and no dogs
    # colour path: every kept cat got a CLIP colour; the verdict agrees with the top cat's colour
    colours = [c for lab, _, c in d[2]["detections"] if lab == "cat"]
    assert colours and all(c in COLORS for c in colours)
    top = max((x for x in d[2]["detections"] if x[0] == "cat"), key=lambda x: x[1])
    assert d[2]["correct"] == (top[2] == "red")
    assert not d[3]["correct"] and "bench" in d[3]["reason"]
    strict = _geneval(dirs, mode="strict", batch_size=1)(images, [""] * 4, metas)
    assert strict.scores.tolist() == [float(x["correct"]) for x in d]
    torch.testing.assert_close(fn(images, [""] * 4, metas).scores, out.scores)  # deterministic


@pytest.mark.parametrize("det,kind", [("owl", "owlv2:"), ("gdino", "grounding-dino:")])
def test_open_vocabulary_detectors(dirs, det, kind):
    images = random_images(3, size=40, seed=1)
    metas = [CAT, TWO, RED_CAT]
    batched = _geneval(dirs, det, batch_size=3)(images, [""] * 3, metas)
    assert batched.valid.all(), batched.details
    assert all(x["backend"].startswith(kind) for x in batched.details)
    assert ((batched.scores >= 0) & (batched.scores <= 1)).all()
    queried = {lab for x in batched.details for lab, _, _ in x["detections"]}
    assert queried and queried <= {"cat", "bench", "dog"}  # only the metadata's classes
    single = _geneval(dirs, det, batch_size=1)(images, [""] * 3, metas)
    torch.testing.assert_close(single.scores, batched.scores)
    assert [x["detections"] for x in single.details] == [x["detections"] for x in batched.details]


def test_reward_feeds_rule_engine(dirs, monkeypatch):
    fn = _geneval(dirs, variant="parity", batch_size=2)
    fn.ensure_loaded()
    dets = [Detection("cat", (0, 0, 10, 10), 0.9), Detection("bench", (20, 0, 30, 10), 0.8)]
    monkeypatch.setattr(fn.detector, "detect", lambda images, classes: [list(dets)] * len(images))
    out = fn(random_images(2), ["", ""], [TWO, CAT])
    expect = [evaluate_detections(dets, m, variant="parity") for m in (TWO, CAT)]
    assert out.scores.tolist() == pytest.approx([e.reward for e in expect])
    assert [x["correct"] for x in out.details] == [e.correct for e in expect]


def test_bad_inputs(dirs):
    fn = _geneval(dirs)
    out = fn(random_images(2), ["", ""], [{}, CAT])
    assert out.valid.tolist() == [False, True]
    assert "GenEval metadata" in out.details[0]["error"]
    with pytest.raises(UserError, match="mode"):
        build_reward("geneval", mode="lenient")
    with pytest.raises(UserError, match="mask2former"):
        build_reward("geneval", checkpoint=str(dirs["clip"]), device="cpu")(
            random_images(1), [""], [CAT])

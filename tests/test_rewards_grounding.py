"""grounding_dino: prompt parsing and scoring rules by hand, the model path on a tiny random
GroundingDinoForObjectDetection."""

import pytest
import torch

from stagerl.errors import UserError
from stagerl.rewards import build_reward
from stagerl.geneval import Detection
from stagerl.rewards.grounding import (Spec, Target, nms, parse_prompt, relation_holds,
                                       score_spec, spec_from_metadata)
from test_rewards_tiny import random_images, save_tiny_clip, save_tiny_grounding_dino


def test_parse_prompts():
    s = parse_prompt("A photo of two dogs and a red cat.")
    assert [(t.phrase, t.count) for t in s.objects] == [("dogs", 2), ("red cat", None)]
    assert s.relation is None
    s = parse_prompt("a cup on top of a table")
    assert [t.phrase for t in s.objects] == ["cup", "table"] and s.relation == ("above", 0, 1)
    assert parse_prompt("a dog on the left of a cat").relation == ("left", 0, 1)
    assert parse_prompt("a lamp near a bed").relation == ("near", 0, 1)
    assert parse_prompt("a cat above a dog and a cow").relation == ("above", 0, 1)
    m = {"include": [{"class": "bench", "count": 1, "color": None},
                     {"class": "cat", "count": 3, "color": "red", "position": ["right of", 0]}]}
    s = spec_from_metadata(m)
    assert [(t.phrase, t.count) for t in s.objects] == [("bench", None), ("red cat", 3)]
    assert s.relation == ("right", 1, 0)


def _d(label, x0, y0, x1, y1, score=0.9):
    return Detection(label, (x0, y0, x1, y1), score)


def test_relations_including_above_on_top_and_normalised_near():
    top, bottom = _d("a", 40, 0, 60, 20), _d("b", 40, 70, 60, 90)
    assert relation_holds("above", top, bottom, (100, 100), 0.3)
    assert not relation_holds("below", top, bottom, (100, 100), 0.3)
    assert relation_holds("below", bottom, top, (100, 100), 0.3)
    left, right = _d("a", 0, 40, 20, 60), _d("b", 70, 45, 90, 65)
    assert relation_holds("left", left, right, (100, 100), 0.3)
    assert not relation_holds("above", left, right, (100, 100), 0.3)
    # near: the same layout scaled 10x gives the same verdict (normalised distance)
    a, b = _d("a", 0, 0, 10, 10), _d("b", 20, 0, 30, 10)
    big_a, big_b = _d("a", 0, 0, 100, 100), _d("b", 200, 0, 300, 100)
    assert relation_holds("near", a, b, (100, 100), 0.3)
    assert relation_holds("near", big_a, big_b, (1000, 1000), 0.3)
    assert not relation_holds("near", _d("a", 0, 0, 10, 10), _d("b", 90, 90, 100, 100),
                              (100, 100), 0.3)


def test_score_spec_terms():
    spec = Spec([Target("dog", 2), Target("cat")], ("left", 0, 1))
    dets = [_d("dog", 0, 0, 10, 10), _d("dog", 1, 0, 11, 10, 0.8),  # duplicate, NMS removes it
            _d("cat", 80, 0, 90, 10)]
    assert len(nms(dets[:2])) == 1
    s, d = score_spec(spec, dets, (100, 100), 0.3)
    assert d["terms"] == [1.0, 0.5, 1.0, 1.0] and s == pytest.approx(3.5 / 4)
    s, d = score_spec(spec, [], (100, 100), 0.3)
    assert s == 0.0 and d["relation_holds"] is False


@pytest.fixture(scope="module")
def gd_dir(tmp_path_factory):
    return save_tiny_grounding_dino(tmp_path_factory.mktemp("gd"))


def test_tiny_grounding_dino(gd_dir):
    images = random_images(3, size=40, seed=2)
    prompts = ["a cat on top of a dog", "two cows", "a red bench near a clock"]
    kw = dict(checkpoint=str(gd_dir), device="cpu", box_threshold=0.0, text_threshold=0.0)
    out = build_reward("grounding_dino", batch_size=3, **kw)(images, prompts, [{}] * 3)
    assert out.valid.all(), out.details
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert sum(out.details[0]["found"].values()) > 0  # detections flowed through the phrases
    assert out.details[0]["relation"] == ("above", 0, 1)
    one = build_reward("grounding_dino", batch_size=1, **kw)
    single = one(images, prompts, [{}] * 3)
    torch.testing.assert_close(single.scores, out.scores)
    assert [d["found"] for d in single.details] == [d["found"] for d in out.details]
    torch.testing.assert_close(one(images, prompts, [{}] * 3).scores, single.scores)
    bad = one(images[:1], ["..."], [{}])
    assert not bad.valid[0] and "no objects" in bad.details[0]["error"]


def test_closed_vocabulary_checkpoint_is_user_error(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    with pytest.raises(UserError):
        build_reward("grounding_dino", checkpoint=str(clip), device="cpu")(
            random_images(1), ["a cat"], [{}])


# --------------------------------------------------------------------------------------------------
# scoring="parity": the STAGE authors' rules (docs/rewards.md, "Parity scoring"), worked by hand.

from stagerl.rewards.grounding import (ParityDetection, cxcywh_to_xyxy,  # noqa: E402
                                       detection_prompt, ground_phrases, parity_nms_count,
                                       parity_position, parity_score, span_token_positions)
from test_rewards_tiny import tiny_bert_tokenizer  # noqa: E402


def _xyxy_to_cxcywh(b):
    return ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1])


def _pd(phrase, x0, y0, x1, y1, score=0.9):
    """A parity detection from a normalised (x0, y0, x1, y1) box."""
    return ParityDetection(phrase, _xyxy_to_cxcywh((x0, y0, x1, y1)), score)


def test_parity_detection_prompt_and_labels():
    caption, spans, labels = detection_prompt(["car", "teddy bear", "roll of paper towel"])
    assert caption == "car . teddy bear . roll of paper towel."
    assert spans == [[(0, 3)], [(6, 11), (12, 16)], [(19, 23), (33, 38)]]
    assert [caption[a:b] for a, b in spans[2]] == ["roll", "towel"]  # middle words not scored
    # a noun of three or more words is labelled "first last": it can never be found
    assert labels == ["car", "teddy bear", "roll towel"]
    assert detection_prompt([])[0] == "."


def test_parity_span_token_positions_match_char_to_token():
    tok = tiny_bert_tokenizer()
    caption, spans, _ = detection_prompt(["cat", "red bench", "dog"])
    assert [span_token_positions(tok, caption, sp) for sp in spans] == [[1], [3, 4], [6]]
    enc = tok(caption)
    assert tok.convert_ids_to_tokens(enc["input_ids"])[3:5] == ["red", "bench"]


def test_parity_phrase_score_is_the_token_mean_and_the_box_threshold_is_strict():
    # 3 queries x 6 tokens; phrase "cat" = token 1, phrase "red bench" = tokens 3 and 4
    probs = torch.zeros(3, 6)
    probs[0, 1] = 0.31  # cat: 0.31 > 0.3
    probs[1, 3], probs[1, 4] = 0.5, 0.2  # red bench: mean 0.35 > 0.3 (neither token alone)
    probs[2, 3], probs[2, 4] = 0.4, 0.2  # red bench: mean 0.3 (minus the 1e-6): not > 0.3
    probs[2, 1] = 0.3  # cat: 0.3 / (1 + 1e-6) is not > 0.3
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.3, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])
    dets = ground_phrases(probs, boxes, [[1], [3, 4]], ["cat", "red bench"], 0.3)
    assert [(d.phrase, d.score) for d in dets] == [("cat", pytest.approx(0.31, abs=1e-5)),
                                                  ("red bench", pytest.approx(0.35, abs=1e-5))]
    assert dets[1].box == pytest.approx((0.2, 0.3, 0.1, 0.1))
    # the fixed scoring's 0.35 would drop both; a query can count for several phrases
    assert len(ground_phrases(probs, boxes, [[1], [3, 4]], ["cat", "red bench"], 0.35)) == 0
    both = ground_phrases(torch.full((1, 6), 0.9), boxes[:1], [[1], [3, 4]], ["a", "b"], 0.3)
    assert [d.phrase for d in both] == ["a", "b"]


def test_parity_box_threshold_defaults():
    assert build_reward("grounding_dino", scoring="parity").box_threshold == 0.3
    assert build_reward("grounding_dino").box_threshold == 0.35
    assert build_reward("grounding_dino", scoring="parity", box_threshold=0.5).box_threshold == 0.5


def test_unknown_scoring_is_a_user_error():
    with pytest.raises(UserError, match=r"'grounding_dino'.*scoring.*'fixed', 'parity'"):
        build_reward("grounding_dino", scoring="paper")


L, R = (0.05, 0.4, 0.25, 0.6), (0.75, 0.4, 0.95, 0.6)  # left and right of centre
T, B = (0.4, 0.05, 0.6, 0.25), (0.4, 0.75, 0.6, 0.95)  # top and bottom
FAR1, FAR2 = (0.0, 0.0, 0.1, 0.1), (0.9, 0.9, 1.0, 1.0)  # opposite corners


@pytest.mark.parametrize("locality,a,b,expect", [
    ("left of", L, R, 1.0), ("on the left of", L, R, 1.0), ("left of", R, L, 0.0),
    ("right of", R, L, 1.0), ("on the right of", R, L, 1.0), ("right of", L, R, 0.0),
    ("below", B, T, 1.0), ("on the bottom of", B, T, 1.0), ("below", T, B, 0.0),
    ("on the top of", T, B, 1.0), ("on the top of", B, T, 0.0),
    # bug kept: "above" and "on top of" fall in no branch, so a correct layout scores 0
    ("above", T, B, 0.0), ("on top of", T, B, 0.0),
    # bug kept: 150 "pixels" against normalised offsets, so "near" holds for any layout
    ("near", FAR1, FAR2, 1.0), ("next to", FAR1, FAR2, 1.0), ("on side of", FAR1, FAR2, 1.0),
    ("under", B, T, 0.0),  # not a relation of theirs
    # the dominant axis decides: left by 0.1 but lower by 0.5 is not "left of"
    ("left of", (0.0, 0.0, 0.2, 0.2), (0.1, 0.5, 0.3, 0.7), 0.0),
])
def test_parity_position_rules(locality, a, b, expect):
    assert parity_position(locality, a, b) == pytest.approx(expect)


def test_parity_position_overlap_softens_to_a_tenth_over_iou():
    a, b = (0.2, 0.4, 0.6, 0.6), (0.3, 0.4, 0.7, 0.6)  # a left of b, IoU = 0.06 / 0.10 = 0.6
    assert parity_position("left of", a, b) == pytest.approx(0.1 / 0.6)
    assert parity_position("left of", (0.0, 0.4, 0.3, 0.6), (0.29, 0.4, 0.59, 0.6)) == 1.0


def _spatial(obj1, obj2, locality):
    return {"nouns": [obj1, obj2], "task_type": "spatial",
            "spatial_info": {"obj1": obj1, "obj2": obj2, "locality": locality}}


def test_parity_spatial_score():
    meta = _spatial("cat", "dog", "left of")
    assert parity_score(meta, [_pd("cat", *L), _pd("dog", *R)])[0] == pytest.approx(0.9)
    assert parity_score(meta, [_pd("cat", *R), _pd("dog", *L)])[0] == pytest.approx(0.4)
    assert parity_score(meta, [_pd("cat", *L)])[0] == pytest.approx(0.2)
    assert parity_score(meta, [])[0] == 0.0
    # the best-scoring detection of each object is the one compared
    dets = [_pd("cat", *R, score=0.5), _pd("cat", *L, score=0.8), _pd("dog", *R)]
    s, d = parity_score(meta, dets)
    assert s == pytest.approx(0.9) and d["relation"] == 1.0 and d["found"] == {"cat": 2, "dog": 1}
    assert parity_score(_spatial("cat", "dog", "above"), [_pd("cat", *T), _pd("dog", *B)])[0] \
        == pytest.approx(0.4)
    assert parity_score(_spatial("cat", "dog", "near"), [_pd("cat", *FAR1), _pd("dog", *FAR2)])[0] \
        == pytest.approx(0.9)
    # the authors' code raises on these and catches it: 0
    assert parity_score(_spatial("cat", "cat", "left of"), [_pd("cat", *L), _pd("cat", *R)])[0] == 0
    assert parity_score({"nouns": ["cat"], "task_type": "spatial"}, [_pd("cat", *L)])[0] == 0


def test_parity_nms_reads_cxcywh_as_corners():
    dog = _pd("dog", 0.4, 0.4, 0.6, 0.6)  # (cx, cy, w, h) = (0.5, 0.5, 0.2, 0.2): "x1 < x0"
    assert parity_nms_count([dog, _pd("dog", 0.4, 0.4, 0.6, 0.6, 0.8)]) == 2  # duplicate kept
    big = _pd("dog", 0.0, 0.0, 0.8, 0.8)  # (0.4, 0.4, 0.8, 0.8) is a valid corner box
    assert parity_nms_count([big, _pd("dog", 0.0, 0.0, 0.8, 0.8, 0.8)]) == 1
    assert parity_nms_count([]) == 0


def test_parity_nms_equals_torchvision_on_the_same_numbers():
    tv = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        boxes = torch.rand(12, 4, generator=g)  # read as corners, whatever their order
        scores = torch.rand(12, generator=g)
        dets = [ParityDetection("x", tuple(b.tolist()), float(s)) for b, s in zip(boxes, scores)]
        assert parity_nms_count(dets) == len(tv.ops.nms(boxes, scores, 0.5))


def test_parity_numeracy_score():
    meta = {"nouns": ["dog", "cat"], "task_type": "numeracy",
            "numeracy_info": [{"obj_name": "dog", "num": 2}, {"obj_name": "cat", "num": 1}]}
    two_dogs = [_pd("dog", *L), _pd("dog", *R)]
    assert parity_score(meta, two_dogs + [_pd("cat", *T)])[0] == pytest.approx(1.0)
    assert parity_score(meta, two_dogs)[0] == pytest.approx(0.5)  # cat missing: 0
    s, d = parity_score(meta, two_dogs[:1] + [_pd("cat", *T)])  # one dog of two: 0.2
    assert s == pytest.approx(0.5 * 0.2 + 0.5) and d["counts"] == [1, 1]
    three = two_dogs + [_pd("dog", *T)]
    assert parity_score(meta, three + [_pd("cat", *B)])[0] == pytest.approx(0.1 + 0.5)
    with pytest.raises(ValueError, match="numeracy_info"):
        parity_score({"nouns": ["dog"], "task_type": "numeracy"}, [])


def test_parity_object_score():
    meta = {"nouns": ["cat", "dog", "cow"], "task_type": "color"}
    assert parity_score(meta, [_pd("cat", *L), _pd("cow", *R)])[0] == pytest.approx(2 / 3)
    # a "complex" prompt with a spatial_info is scored on presence only
    meta = {"nouns": ["cat", "dog"], "task_type": "complex",
            "spatial_info": {"obj1": "cat", "obj2": "dog", "locality": "left of"}}
    assert parity_score(meta, [_pd("cat", *R), _pd("dog", *L)])[0] == pytest.approx(1.0)
    # a three-word noun is labelled "roll towel" and never counts as found
    meta = {"nouns": ["roll of paper towel"], "task_type": "object"}
    label = detection_prompt(meta["nouns"])[2][0]
    assert parity_score(meta, [_pd(label, *L)])[0] == 0.0


class _Scene:
    """Stubbed detections for both scorings from one list of (noun, normalised box, score)."""

    def __init__(self, items, size=(100, 100)):
        self.items, self.size = items, size

    def fixed(self, images, queries):  # ObjectDetector.detect
        w, h = self.size
        return [[Detection(q, (b[0] * w, b[1] * h, b[2] * w, b[3] * h), s)
                 for q in qs for noun, b, s in self.items
                 if q in (noun, noun + "s") or q.endswith(" " + noun)] for qs in queries]

    def parity(self, image, nouns):  # GroundingReward._ground
        return [_pd(noun, *b, score=s) for noun, b, s in self.items if noun in nouns]


def _stubbed(scoring, scene):
    r = build_reward("grounding_dino", scoring=scoring, device="cpu")
    r._loaded = True  # no model: the detections come from the scene
    r.detector.detect = scene.fixed
    r._ground = scene.parity
    return r


MID_L, MID_R = (0.2, 0.4, 0.6, 0.6), (0.3, 0.4, 0.7, 0.6)  # overlapping, IoU 0.6
CENTRE = (0.4, 0.4, 0.6, 0.6)


# (prompt, T2I-R1 metadata, scene, fixed score, parity score); each row is a line of the table in
# docs/rewards.md ("Parity scoring"), or a case where the two agree.
CASES = [
    ("a photo of a cat left of a dog", _spatial("cat", "dog", "left of"),
     [("cat", L, .9), ("dog", R, .9)], 1.0, 0.9),  # parity's spatial maximum is 0.9
    ("a photo of a cat above a dog", _spatial("cat", "dog", "above"),
     [("cat", T, .9), ("dog", B, .9)], 1.0, 0.4),  # "above" always 0
    ("a photo of a cat on top of a dog", _spatial("cat", "dog", "on top of"),
     [("cat", T, .9), ("dog", B, .9)], 1.0, 0.4),  # "on top of" always 0
    ("a photo of a cat on the top of a dog", _spatial("cat", "dog", "on the top of"),
     [("cat", T, .9), ("dog", B, .9)], 1.0, 0.9),
    ("a photo of a cat below a dog", _spatial("cat", "dog", "below"),
     [("cat", B, .9), ("dog", T, .9)], 1.0, 0.9),
    ("a photo of a cat near a dog", _spatial("cat", "dog", "near"),
     [("cat", FAR1, .9), ("dog", FAR2, .9)], 2 / 3, 0.9),  # "near" always 1
    ("a photo of a cat left of a dog", _spatial("cat", "dog", "left of"),
     [("cat", MID_L, .9), ("dog", MID_R, .9)], 1.0, 0.4 + 0.1 / 0.6 / 2),  # overlap softens
    ("a photo of a cat left of a dog", _spatial("cat", "dog", "left of"),
     [("cat", L, .9)], 1 / 3, 0.2),  # presence weights
    ("a photo of two dogs", {"nouns": ["dog"], "task_type": "numeracy",
                             "numeracy_info": [{"obj_name": "dog", "num": 2}]},
     [("dog", L, .9), ("dog", R, .9)], 1.0, 1.0),  # agree
    ("a photo of two dogs", {"nouns": ["dog"], "task_type": "numeracy",
                             "numeracy_info": [{"obj_name": "dog", "num": 2}]},
     [("dog", L, .9), ("dog", R, .9), ("dog", T, .9)], 0.75, 0.2),  # wrong count: 0.2
    ("a photo of two dogs", {"nouns": ["dog"], "task_type": "numeracy",
                             "numeracy_info": [{"obj_name": "dog", "num": 2}]},
     [("dog", CENTRE, .9), ("dog", CENTRE, .8)], 0.75, 1.0),  # duplicate kept by their NMS
    ("a photo of a red cat and a blue dog",
     {"nouns": ["cat", "dog"], "attr_nouns": ["red cat", "blue dog"], "task_type": "color"},
     [("cat", L, .9), ("dog", R, .9)], 1.0, 1.0),  # agree
    ("a photo of a red cat and a blue dog",
     {"nouns": ["cat", "dog"], "attr_nouns": ["red cat", "blue dog"], "task_type": "color"},
     [("cat", L, .9)], 0.5, 0.5),  # agree
]


@pytest.mark.parametrize("prompt,meta,scene,fixed,parity", CASES)
def test_fixed_and_parity_differ_exactly_where_documented(prompt, meta, scene, fixed, parity):
    image = random_images(1, size=40)
    out_f = _stubbed("fixed", _Scene(scene))(image, [prompt], [meta])
    out_p = _stubbed("parity", _Scene(scene))(image, [prompt], [meta])
    assert out_f.valid.all() and out_p.valid.all(), (out_f.details, out_p.details)
    assert out_f.scores[0].item() == pytest.approx(fixed, abs=1e-6), out_f.details
    assert out_p.scores[0].item() == pytest.approx(parity, abs=1e-6), out_p.details
    assert out_p.details[0]["scoring"] == "parity"


def test_parity_needs_t2i_r1_metadata():
    r = _stubbed("parity", _Scene([]))
    out = r(random_images(3, size=40), ["a cat", "a cat", "a cat"],
            [{}, {"nouns": [], "task_type": "spatial"}, {"nouns": ["cat"], "task_type": "x"}])
    assert out.valid.tolist() == [False, True, True]
    assert "nouns" in out.details[0]["error"]
    assert out.scores[1:].tolist() == [1.0, 0.0]  # no nouns: 1 (the authors' rule)


def test_tiny_grounding_dino_parity(gd_dir):
    images = random_images(2, size=40, seed=3)
    metas = [_spatial("cat", "dog", "near"),
             {"nouns": ["black cat", "red green cow"], "task_type": "object"}]
    low = build_reward("grounding_dino", checkpoint=str(gd_dir), device="cpu", scoring="parity",
                       box_threshold=0.0)
    out = low(images, ["a", "b"], metas)
    assert out.valid.all(), out.details
    # threshold 0: every query grounds every phrase; "near" is 1, so 0.4 + 0.5
    assert out.details[0]["found"] == {"cat": 10, "dog": 10} and out.scores[0] == pytest.approx(0.9)
    # the three-word noun is never found, the two-word one always
    assert out.details[1]["found"] == {"black cat": 10, "red green cow": 0}
    assert out.scores[1] == pytest.approx(0.5)
    # the default threshold 0.3, checked by hand against the model's raw outputs
    r = build_reward("grounding_dino", checkpoint=str(gd_dir), device="cpu", scoring="parity")
    r.ensure_loaded()
    caption = "cat . dog."
    inputs = r.detector.processor(images=images[0], text=caption, return_tensors="pt")
    assert r.detector.processor.tokenizer.convert_ids_to_tokens(
        inputs["input_ids"][0].tolist()) == ["[CLS]", "cat", ".", "dog", ".", "[SEP]"]
    with torch.no_grad():
        raw = r.detector.model(**inputs)
    probs = raw.logits[0].sigmoid()  # [Q, T]; "cat" is token 1, "dog" token 3
    dets = r._ground(images[0], ["cat", "dog"])
    kept = 0
    for noun, t in (("cat", 1), ("dog", 3)):
        mask = probs[:, t] / (1 + 1e-6) > 0.3
        mine = [d for d in dets if d.phrase == noun]
        kept += len(mine)
        assert len(mine) == int(mask.sum())
        if mine:
            torch.testing.assert_close(torch.tensor([d.box for d in mine]), raw.pred_boxes[0][mask])
            torch.testing.assert_close(torch.tensor([d.score for d in mine]),
                                       probs[mask, t] / (1 + 1e-6))
    assert 0 < kept < 20  # the threshold keeps some queries and drops others


def test_parity_needs_grounding_dino(tmp_path):
    from test_rewards_tiny import save_tiny_owlv2

    owl = save_tiny_owlv2(tmp_path / "owl")
    with pytest.raises(UserError, match="parity"):
        build_reward("grounding_dino", checkpoint=str(owl), device="cpu", scoring="parity")(
            random_images(1), ["a cat"], [{"nouns": ["cat"], "task_type": "object"}])

"""grounding_dino: prompt parsing and scoring rules by hand, the model path on a tiny random
GroundingDinoForObjectDetection."""

import pytest
import torch

from stagerl.errors import UserError
from stagerl.rewards import build_reward
from stagerl.rewards.geneval_rules import Detection
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

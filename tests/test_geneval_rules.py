"""The GenEval rule engine on hand-built detections, and on all 553 official prompts (shipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stagerl.benchmarks import resolve_benchmark
from stagerl.errors import UserError
from stagerl.geneval import (Detection, evaluate_detections, filter_detections,
                             geneval_overall, relative_position)

REL_OFFSET = {"left of": (-50, 0), "right of": (50, 0), "above": (0, -50), "below": (0, 50)}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def det(label, x, y, size=10, score=1.0, color=None):
    """A detection of side ``size`` centred at (x, y)."""
    h = size / 2
    return Detection(label, (x - h, y - h, x + h, y + h), score, color)


def ev(dets, meta, **kw):
    return evaluate_detections(dets, meta, **kw)


# -- position geometry, worked by hand -----------------------------------------------------------
def test_relative_position_hand_worked():
    a, b = (0, 0, 10, 10), (20, 0, 30, 10)
    # offset (-20, 0); shrink by 0.1 * (10 + 10) = 2 -> (-18, 0); / |(-20, 0)| -> dx = -0.9
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    c = (0, 20, 10, 30)  # y grows downward: a is above c
    assert relative_position(a, c) == {"above"}
    assert relative_position(c, a) == {"below"}
    # diagonal: offset (-20, -20) -> shrunk (-18, -18) / 28.28 = -0.636 on both axes
    assert relative_position(a, (20, 20, 30, 30)) == {"left of", "above"}
    # offset (-1, -1) shrinks to exactly 0 -> no relation at all
    assert relative_position(a, (1, 1, 11, 11)) == set()


def test_relative_position_thresholds_use_original_norm():
    # Zero-size boxes: no shrink. offset (-1, -1.8): dx = -1/2.059 = -0.486 (> -0.5, not left),
    # dy = -0.874 (above).
    assert relative_position((0, 0, 0, 0), (1, 1.8, 1, 1.8)) == {"above"}
    # Shrink is per axis and never crosses 0: offset (-3, -20), sizes 10+10 -> shrink 2 each:
    # (-1, -18) / 20.22 -> dx = -0.049, dy = -0.890.
    assert relative_position((0, 0, 10, 10), (3, 20, 13, 30)) == {"above"}
    # dx exactly -0.5 is not "left of" (strict inequality): offset (-10, 0), widths 25 + 25 ->
    # shrink 5 -> (-5, 0) / 10 = -0.5. One pixel further apart: -6/11 = -0.545 is "left of".
    assert relative_position((0, 0, 25, 25), (10, 0, 35, 25)) == set()
    assert relative_position((0, 0, 25, 25), (11, 0, 36, 25)) == {"left of"}


# -- filtering: thresholds, top 16, no NMS -------------------------------------------------------
def test_confidence_thresholds_and_counting_threshold():
    dets = [det("cat", 0, 0, score=0.95), det("cat", 50, 0, score=0.85),
            det("cat", 100, 0, score=0.3)]
    assert len(filter_detections(dets, "two_object")["cat"]) == 2  # > 0.3, so 0.3 is dropped
    assert len(filter_detections(dets, "counting")["cat"]) == 1  # > 0.9 for counting
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 2}],
            "exclude": [{"class": "cat", "count": 3}]}
    assert not ev(dets, meta).correct  # only one cat survives the 0.9 threshold
    meta_two = {"tag": "single_object", "include": [{"class": "cat", "count": 2}]}
    assert ev(dets, meta_two).correct


def test_top16_per_class_and_no_nms():
    dets = [det("cat", 5, 5, score=0.5 + i / 100) for i in range(20)]  # identical boxes: no NMS
    assert len(filter_detections(dets, None)["cat"]) == 16
    kept = filter_detections(dets, None)["cat"]
    assert [d.score for d in kept] == sorted((d.score for d in dets), reverse=True)[:16]
    assert ev(dets, {"tag": "counting", "include": [{"class": "cat", "count": 16}]}).correct is False
    assert ev(dets, {"tag": "x", "include": [{"class": "cat", "count": 16}]}).correct
    assert not ev(dets, {"tag": "x", "include": [{"class": "cat", "count": 17}]}).correct
    # exclude counts the kept detections only: 20 cats, 16 kept, 16 < 17 passes
    assert ev(dets, {"tag": "x", "include": [], "exclude": [{"class": "cat", "count": 17}]}).correct
    assert not ev(dets, {"tag": "x", "include": [],
                         "exclude": [{"class": "cat", "count": 16}]}).correct


# -- every tag -----------------------------------------------------------------------------------
def test_single_and_two_object():
    single = {"tag": "single_object", "include": [{"class": "cow", "count": 1}]}
    assert ev([det("cow", 10, 10)], single).correct
    r = ev([det("dog", 10, 10)], single)
    assert not r.correct and "expected cow>=1, found 0" in r.reason
    assert ev([det("cow", 10, 10), det("cow", 80, 80)], single).correct  # no exclude: extras pass
    two = {"tag": "two_object", "include": [{"class": "cow", "count": 1},
                                            {"class": "bench", "count": 1}]}
    assert ev([det("cow", 10, 10), det("bench", 80, 80)], two).correct
    assert not ev([det("cow", 10, 10), det("cow", 80, 80)], two).correct


def test_counting_include_and_exclude():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    two = [det("clock", 10, 10), det("clock", 60, 10)]
    assert ev(two, meta).correct
    assert not ev(two[:1], meta).correct
    r = ev(two + [det("clock", 110, 10)], meta)
    assert not r.correct and "expected clock<3, found 3" in r.reason


@pytest.mark.parametrize("rel", list(REL_OFFSET))
def test_every_relation_and_its_swap(rel):
    meta = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "cat", "count": 1, "position": [rel, 0]}]}
    dx, dy = REL_OFFSET[rel]
    good = [det("bench", 100, 100), det("cat", 100 + dx, 100 + dy)]
    swapped = [det("bench", 100, 100), det("cat", 100 - dx, 100 - dy)]
    assert ev(good, meta).correct
    r = ev(swapped, meta)
    assert not r.correct and f"expected cat {rel} target, found {OPPOSITE[rel]} target" in r.reason
    assert ev(good, meta, variant="parity").reward == 1.0


def test_position_uses_top_confidence_objects_and_needs_target():
    meta = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    # the confident cat is right of the bench, a weaker one left of it: the confident one counts
    dets = [det("bench", 100, 100), det("cat", 150, 100, score=0.9),
            det("cat", 50, 100, score=0.5)]
    assert not ev(dets, meta).correct
    dets[1].score, dets[2].score = 0.5, 0.9
    assert ev(dets, meta).correct
    r = ev([det("cat", 50, 100)], meta)
    assert not r.correct and "no target for cat to be left of" in r.reason


def test_colors_and_color_attr_with_exact_colours():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert ev([det("car", 10, 10, color="red")], meta).correct
    r = ev([det("car", 10, 10, color="blue")], meta)
    assert not r.correct and "expected red car>=1, found 0 red" in r.reason
    # only the top-1 car is colour-checked
    assert ev([det("car", 10, 10, score=0.9, color="red"), det("car", 60, 10, score=0.8, color="blue")], meta).correct
    assert not ev([det("car", 10, 10, score=0.8, color="red"),
                   det("car", 60, 10, score=0.9, color="blue")], meta).correct
    attr = {"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "red"},
                                             {"class": "cow", "count": 1, "color": "green"}]}
    assert ev([det("bench", 10, 10, color="red"), det("cow", 60, 10, color="green")], attr).correct
    assert not ev([det("bench", 10, 10, color="green"),
                   det("cow", 60, 10, color="red")], attr).correct


def test_color_fn_path_is_lazy_and_required():
    calls = []

    def color_fn(d):
        calls.append(d.label)
        return "green" if d.box[0] > 30 else "red"

    meta = {"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "red"},
                                             {"class": "cow", "count": 1, "color": "green"}]}
    dets = [det("bench", 10, 10), det("cow", 60, 10), det("dog", 100, 10)]
    assert ev(dets, meta, color_fn=color_fn).correct
    assert sorted(calls) == ["bench", "cow"]  # the dog's colour is never asked for
    n_calls = len(calls)
    ev(dets, {"tag": "two_object", "include": [{"class": "bench", "count": 1}]}, color_fn=color_fn)
    assert len(calls) == n_calls  # no colour clause -> no colour calls
    # an exact colour wins over color_fn
    assert not ev([det("bench", 10, 10, color="blue"), det("cow", 60, 10)], meta,
                  color_fn=color_fn).correct
    with pytest.raises(ValueError, match="no colour"):
        ev(dets, meta)


# -- absent == null ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["fixed", "parity"])
def test_absent_and_null_keys_score_the_same(variant):
    absent = {"tag": "two_object", "include": [{"class": "cow", "count": 1},
                                               {"class": "bench", "count": 2}]}
    null = {"tag": "two_object", "include": [
        {"class": "cow", "count": 1, "color": None, "position": None},
        {"class": "bench", "count": 2, "color": None, "position": None}], "exclude": None}
    for dets in ([det("cow", 10, 10)], [det("cow", 10, 10), det("bench", 50, 50)],
                 [det("cow", 10, 10), det("bench", 50, 50), det("bench", 90, 90)], []):
        a, b = ev(dets, absent, variant=variant), ev(dets, null, variant=variant)
        assert (a.correct, a.reward, a.details["terms"]) == (b.correct, b.reward, b.details["terms"])
    # with a null colour the clause is a plain count clause: one cow found of one -> term 1 only
    r = ev([det("cow", 10, 10)], null, variant=variant)
    assert r.details["terms"][0] == 1.0 and len(r.details["terms"]) == 2


# -- partial credit: fixed vs parity -------------------------------------------------------------
def test_count_term_goes_negative_only_in_parity():
    meta = {"tag": "single_object", "include": [{"class": "cow", "count": 1}]}
    three = [det("cow", x, 10) for x in (10, 50, 90)]
    assert ev(three, meta, variant="parity").reward == pytest.approx(-1.0)  # 1 - |1-3|/1
    assert ev(three, meta, variant="fixed").reward == 0.0
    two = three[:2]
    assert ev(two, meta, variant="parity").reward == pytest.approx(0.0)
    assert ev(two, meta).correct  # the benchmark verdict takes the top 1 and passes


def test_exclude_in_training_reward():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}],
            "exclude": [{"class": "clock", "count": 3}]}
    three = [det("clock", x, 10) for x in (10, 50, 90)]
    assert ev(three, meta, variant="parity").reward == pytest.approx(0.5)  # [1 - 1/2], no exclude
    assert ev(three, meta, variant="fixed").reward == pytest.approx(0.25)  # [0.5, 0]
    assert ev(three, meta, variant="fixed", honour_exclude=False).reward == pytest.approx(0.5)
    assert ev(three[:2], meta, variant="fixed").details["terms"] == [1.0]  # satisfied: no term
    assert ev([], meta, variant="fixed").details["terms"] == [0.0]  # no credit for "< 3" alone
    five = [det("clock", x, 10) for x in (10, 50, 90, 130, 170)]
    assert ev(five, meta, variant="parity").reward == pytest.approx(-0.5)  # 1 - 3/2
    assert ev(five, meta, variant="fixed").reward == 0.0


def test_position_failure_half_credit_in_parity():
    meta = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                           {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    wrong = [det("bench", 100, 100), det("cat", 150, 100)]
    p = ev(wrong, meta, variant="parity")
    assert p.details["terms"] == [1.0, 1.0, 0.0, 1.0] and p.reward == pytest.approx(0.75)
    f = ev(wrong, meta, variant="fixed")
    assert f.details["terms"] == [1.0, 1.0, 0.0] and f.reward == pytest.approx(2 / 3)
    # missing target: both variants append a single 0 for the position
    no_target = [det("cat", 50, 100)]
    for variant in ("fixed", "parity"):
        r = ev(no_target, meta, variant=variant)
        assert r.details["terms"] == [0.0, 1.0, 0.0] and r.reward == pytest.approx(1 / 3)
    # wrong count on a position clause: one 0 instead of the position term
    r = ev([det("bench", 100, 100), det("cat", 50, 100), det("cat", 40, 100)], meta,
           variant="fixed")
    assert r.details["terms"] == [1.0, 0.0, 0.0]


def test_colour_partial_credit():
    attr = {"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "red"},
                                             {"class": "cow", "count": 1, "color": "green"}]}
    dets = [det("bench", 10, 10, color="red"), det("cow", 60, 10, color="blue")]
    for variant in ("fixed", "parity"):
        r = ev(dets, attr, variant=variant)
        assert r.details["terms"] == [1.0, 1.0, 1.0, 0.0] and not r.correct
    # count mismatch on a colour clause appends a 0 instead of a colour term
    r = ev([det("bench", 10, 10, color="red"), det("bench", 50, 10, color="red")],
           {"tag": "colors", "include": [{"class": "bench", "count": 1, "color": "red"}]})
    assert r.details["terms"] == [0.0, 0.0] and r.correct  # benchmark: top-1 is red -> passes
    # counted colour clause: 2 of 3 requested red
    meta3 = {"tag": "colors", "include": [{"class": "car", "count": 3, "color": "red"}]}
    cars = [det("car", x, 10, color=c) for x, c in ((10, "red"), (50, "red"), (90, "blue"))]
    assert ev(cars, meta3).details["terms"] == [1.0, pytest.approx(2 / 3)]


def test_parity_skips_position_after_colour_failure_fixed_scores_it():
    meta = {"tag": "x", "include": [
        {"class": "bench", "count": 1},
        {"class": "cat", "count": 1, "color": "red", "position": ["left of", 0]}]}
    dets = [det("bench", 100, 100), det("cat", 50, 100, color="blue")]
    assert ev(dets, meta, variant="parity").details["terms"] == [1.0, 1.0, 0.0]
    assert ev(dets, meta, variant="fixed").details["terms"] == [1.0, 1.0, 0.0, 1.0]


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="variant"):
        ev([], {"include": []}, variant="nope")
    with pytest.raises(UserError, match="class"):
        ev([], {"include": [{"count": 1}]})
    with pytest.raises(UserError, match="earlier include clause"):
        ev([], {"include": [{"class": "a", "count": 1, "position": ["left of", 0]}]})
    with pytest.raises(UserError, match="relation"):
        ev([], {"include": [{"class": "a"}, {"class": "b", "position": ["near", 0]}]})


def test_overall_is_mean_of_tag_means():
    table = geneval_overall({"a": [True, False], "b": [True, True, True, True], "c": []})
    assert table == {"a": 0.5, "b": 1.0, "overall": 0.75}  # pooled would be 5/6


# -- the real 553 prompts (the shipped copy; docs/benchmarks.md) -------------------------------
def _satisfying(meta: dict) -> list[Detection]:
    """Detections that satisfy every clause: clause k's objects sit on a row around its anchor."""
    anchors: list[tuple[float, float]] = []
    dets = []
    for k, clause in enumerate(meta["include"]):
        pos = clause.get("position")
        if pos is None:
            anchor = (500.0 + 2000.0 * k, 500.0)
        else:
            dx, dy = REL_OFFSET[pos[0]]
            ax, ay = anchors[pos[1]]
            anchor = (ax + 40 * dx, ay + 40 * dy)
        anchors.append(anchor)
        for j in range(clause["count"]):
            dets.append(det(clause["class"], anchor[0] + 12 * j, anchor[1], size=10,
                            score=0.95, color=clause.get("color")))
    return dets


def test_all_553_official_prompts():
    path = resolve_benchmark("geneval")
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    assert len(lines) == 553
    rng = np.random.default_rng(0)
    classes = sorted({c["class"] for m in lines for c in m["include"]})
    colors = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
    per_tag: dict[str, list[bool]] = {}
    for meta in lines:
        good = _satisfying(meta)
        for variant in ("fixed", "parity"):
            r = ev(good, meta, variant=variant)
            assert r.correct and r.reward == 1.0, (meta["prompt"], r.reason)
        empty = ev([], meta)
        assert not empty.correct and empty.reward == 0.0
        noise = [Detection(classes[rng.integers(len(classes))],
                           tuple(np.sort(rng.uniform(0, 512, 2)).tolist() * 2), float(rng.random()),
                           colors[rng.integers(len(colors))]) for _ in range(rng.integers(0, 30))]
        r = ev(noise, meta)
        assert 0.0 <= r.reward <= 1.0
        assert -np.inf < ev(noise, meta, variant="parity").reward <= 1.0
        per_tag.setdefault(meta["tag"], []).append(r.correct)
    assert set(per_tag) == {"single_object", "two_object", "counting", "colors", "position",
                            "color_attr"}

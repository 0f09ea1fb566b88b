"""The evaluation harness: benchmark formats and categories (the shipped sets by name), GenEval's
folder layout, fixed seeds, per-category tables (JSON + markdown), and skip-done on rerun."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_policy
from stagerl.benchmarks import BENCHMARKS
from stagerl.errors import UserError
from stagerl.eval import (ShapesEval, benchmark_category, evaluate_benchmark,
                          evaluate_suite, generate_images, load_benchmark, markdown_table)
from stagerl.policies.base import SamplingParams
from stagerl.rewards.base import RewardOutput, register_reward

CALLS = {"n": 0}


@register_reward("harness_test_red")
class _Red:
    """Mean red channel in [0, 1]: cheap, continuous, and counts its calls."""

    name = "harness_test_red"

    def __call__(self, images, prompts, metadata):
        CALLS["n"] += len(images)
        vals = [float(np.asarray(im, dtype=np.float32)[..., 0].mean() / 255.0) for im in images]
        return RewardOutput(torch.tensor(vals), torch.ones(len(vals), dtype=torch.bool))


@pytest.fixture(scope="module")
def policy():
    return make_tiny_policy(grid=8)  # 32 px: the shapes canvas, so shapes rewards can score it


@pytest.fixture()
def compbench(tmp_path):
    d = tmp_path / "t2i"
    d.mkdir()
    (d / "color_val.txt").write_text("a green bench and a blue bowl\na red car\na pink cow\n")
    (d / "3d_spatial_val.txt").write_text("a cat behind a dog\n\na cup in front of a bowl\n")
    return d


@pytest.mark.parametrize("name,cat", [("color_val.txt", "color"), ("3d_spatial_val.txt",
                                                                    "3d_spatial"),
                                      ("ocr/test_prompts.txt", "ocr"),
                                      ("non_spatial_val.txt", "non_spatial"),
                                      ("drawbench/drawbench.csv", "drawbench")])
def test_category_from_file_name(name, cat):
    assert benchmark_category(name) == cat


def test_load_formats_with_tags(tmp_path, compbench):
    items = load_benchmark(compbench)
    assert [it.metadata["tag"] for it in items] == ["3d_spatial"] * 2 + ["color"] * 3
    assert load_benchmark(compbench, max_prompts=1)[1].prompt == "a green bench and a blue bowl"
    csv = tmp_path / "db.csv"
    csv.write_text('"Prompts","Category"\n"A red colored car.","Colors"\n"A sign","Text"\n')
    assert [it.metadata["tag"] for it in load_benchmark(csv)] == ["Colors", "Text"]
    jl = tmp_path / "meta.jsonl"
    jl.write_text(json.dumps({"tag": "counting", "include": [{"class": "clock", "count": 2}],
                              "prompt": "a photo of two clocks"}) + "\n")
    (it,) = load_benchmark(jl)
    assert it.metadata["include"][0]["count"] == 2 and it.metadata["tag"] == "counting"
    with pytest.raises(UserError):
        load_benchmark(tmp_path / "missing.txt")


def test_shipped_benchmarks_load_by_name_with_their_categories():
    geneval = load_benchmark("geneval")
    assert len(geneval) == 553
    assert {it.metadata["tag"] for it in geneval} == {"single_object", "two_object", "counting",
                                                      "colors", "position", "color_attr"}
    comp = load_benchmark("t2i-compbench", max_prompts=2)
    assert len(comp) == 16
    assert {it.metadata["tag"] for it in comp} == {"3d_spatial", "color", "complex", "non_spatial",
                                                   "numeracy", "shape", "spatial", "texture"}
    assert {it.metadata["tag"] for it in load_benchmark("t2i-compbench:color")} == {"color"}
    ocr = load_benchmark("ocr", max_prompts=5)
    assert len(ocr) == 5 and {it.metadata["tag"] for it in ocr} == {"ocr"}
    assert all('"' in it.prompt for it in ocr)  # the text to render is quoted
    assert load_benchmark(str(BENCHMARKS["geneval"].path))[7].prompt == geneval[7].prompt
    with pytest.raises(UserError, match="drawbench is not shipped"):
        load_benchmark("drawbench")


def test_layout_tables_and_rerun_does_no_work(tmp_path, compbench, policy, monkeypatch):
    out = tmp_path / "out"
    params = SamplingParams(cfg_scale=2.0)
    CALLS["n"] = 0
    res = evaluate_benchmark(policy, compbench, ["harness_test_red", "shapes_partial"], {}, 2,
                             params, seed=7, out_dir=out)
    assert CALLS["n"] == 10  # 5 prompts x 2 images, scored once
    # GenEval's layout: OUT/<5 digits>/metadata.jsonl + samples/<4 digits>.png
    for i in range(5):
        meta = json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text())
        assert meta["prompt"] and meta["tag"] in ("color", "3d_spatial")
        assert sorted(p.name for p in (out / f"{i:05d}" / "samples").iterdir()) == \
            ["0000.png", "0001.png"]
    table = res["scores"]["harness_test_red"]
    assert set(table) == {"color", "3d_spatial", "overall", "invalid"}
    assert table["overall"] == pytest.approx((table["color"] + table["3d_spatial"]) / 2)
    saved = json.loads((out / "results.json").read_text())["scores"]
    assert saved["harness_test_red"] == res["scores"]["harness_test_red"]
    # T2I-CompBench lines carry no GenEval clauses: the shapes reward marks them invalid, not 0
    assert saved["shapes_partial"]["invalid"] == 10.0
    assert all(math.isnan(v) for k, v in saved["shapes_partial"].items() if k != "invalid")
    md = (out / "results.md").read_text()
    assert "| harness_test_red |" in md and "| shapes_partial |" in md and "3d_spatial" in md

    def no_sampling(*a, **k):
        raise AssertionError("sampled again on a rerun")

    monkeypatch.setattr(type(policy), "sample", no_sampling)
    again = evaluate_benchmark(policy, compbench, ["harness_test_red", "shapes_partial"], {}, 2,
                               params, seed=7, out_dir=out)
    assert CALLS["n"] == 10  # scores came from scores.json too
    assert json.dumps(again["scores"]) == json.dumps(res["scores"])  # NaN-safe equality


def test_fixed_seeds_and_partial_rerun_reproduce_the_same_images(tmp_path, policy):
    items = load_benchmark("t2i-compbench:color", max_prompts=5)
    params = SamplingParams(cfg_scale=2.0)
    a = generate_images(policy, items, 2, params, seed=3, out_dir=tmp_path / "a", chunk_prompts=2)
    b = generate_images(policy, items, 2, params, seed=3, out_dir=None, chunk_prompts=2)
    arr = lambda per: np.stack([np.asarray(im) for ims in per for im in ims])  # noqa: E731
    assert np.array_equal(arr(a), arr(b))
    # Delete one prompt of the middle chunk: only that chunk is resampled, with the same seed.
    import shutil

    shutil.rmtree(tmp_path / "a" / "00003")
    c = generate_images(policy, items, 2, params, seed=3, out_dir=tmp_path / "a", chunk_prompts=2)
    assert np.array_equal(arr(a), arr(c))
    d = generate_images(policy, items, 2, params, seed=4, out_dir=None, chunk_prompts=2)
    assert not np.array_equal(arr(a), arr(d))


def test_other_settings_in_the_same_folder_are_refused(tmp_path, compbench, policy):
    params = SamplingParams(cfg_scale=2.0)
    evaluate_benchmark(policy, compbench, ["harness_test_red"], {}, 1, params, 7, tmp_path / "o")
    with pytest.raises(UserError, match="images_per_prompt"):
        evaluate_benchmark(policy, compbench, ["harness_test_red"], {}, 2, params, 7,
                           tmp_path / "o")
    with pytest.raises(UserError, match="seed"):
        evaluate_benchmark(policy, compbench, ["harness_test_red"], {}, 1, params, 8,
                           tmp_path / "o")


def test_shapes_suite_saves_tables_and_skips_done(tmp_path, policy, monkeypatch):
    params = SamplingParams(cfg_scale=2.0)
    res = evaluate_suite(policy, "compositions", 8, 1, params, out_dir=tmp_path / "c")
    assert set(res.strict) == {"counting", "colors", "position", "color_attr", "overall"}
    md = (tmp_path / "c" / "results.md").read_text()
    assert "| strict |" in md and "| lenient |" in md and "| counting |" in md
    monkeypatch.setattr(type(policy), "sample", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("resampled")))
    again = evaluate_suite(policy, "compositions", 8, 1, params, out_dir=tmp_path / "c")
    assert again == res and [len(ims) for ims in again.images] == [1] * 8  # read back from disk


def test_markdown_table_formats_numbers_and_strings():
    md = markdown_table({"a": {"x": 0.5, "y": "1 ± 0"}, "b": {"x": float("nan")}}, "T")
    assert md.splitlines()[0] == "**T**"
    assert "| a | 0.500 | 1 ± 0 |" in md and "| b | n/a | n/a |" in md


def test_shapes_eval_is_typed_and_keeps_its_images(policy):
    params = SamplingParams(cfg_scale=2.0, top_k=3)
    res = evaluate_suite(policy, "heldout", 4, 2, params, seed=11)
    assert isinstance(res, ShapesEval) and res.top_k == 3 and res.seed == 11
    assert len(res.images) == len(res.items) == 4 and all(len(ims) == 2 for ims in res.images)
    assert "images" not in res.to_dict()
    back = ShapesEval.from_dict(json.loads(json.dumps(res.to_dict())))  # as a run folder stores it
    assert back == res and back.images == [] and back.strict["overall"] == res.strict["overall"]


def test_cli_eval_and_in_run_eval_keep_the_configured_sampling(monkeypatch, tmp_path, policy):
    """The configured temperature / top-k / top-p and log.eval_seed reach the one evaluation."""
    import types

    import stagerl.eval as ev
    import stagerl.trainer as trainer
    from stagerl.cli import main
    from stagerl.config import load_config

    seen, real = [], ev.evaluate_suite

    def spy(pol, suite, n, ipp, params, seed, *a, **k):
        seen.append((params, seed))
        return real(pol, suite, n, ipp, params, seed, *a, **k)

    monkeypatch.setattr(ev, "evaluate_suite", spy)
    monkeypatch.setattr(trainer, "evaluate_suite", spy)
    sets = ["sampling.temperature=0.7", "sampling.top_k=5", "sampling.top_p=0.9",
            "log.eval_seed=9"]
    assert main(["eval", "--prompts", "2", "--images-per-prompt", "1", "--set", *sets]) == 0
    cfg = load_config(None, sets + ["log.eval_prompts=2", "log.eval_images_per_prompt=1"])
    acc = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    tracker = types.SimpleNamespace(log=lambda *a: None, run_dir=tmp_path)
    trainer._evaluate(cfg, policy, acc, tracker, 0, "t")
    for params, seed in seen:
        assert (params.temperature, params.top_k, params.top_p, seed) == (0.7, 5, 0.9, 9)
    assert len(seen) == 2

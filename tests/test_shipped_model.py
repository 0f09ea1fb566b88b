"""The shipped shapes-world model and the recipe that made it."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from stagerl.eval import evaluate_suite
from stagerl.policies import build_policy
from stagerl.policies.base import SamplingParams
from stagerl.policies.tiny import TinyPolicy, shipped_model_dir
from stagerl.pretrain import (PretrainConfig, PretrainResult, best_cfg_scale, format_table,
                              pretrain, random_policy)
from stagerl.worlds.shapes.spec import WorldSpec

ASSETS = shipped_model_dir()
SPEC = WorldSpec()


@pytest.fixture(scope="module")
def shipped() -> TinyPolicy:
    cfg = types.SimpleNamespace(kind="tiny", path="builtin:shapes", dtype="float32")
    return build_policy(cfg, need_reference=False).policy.eval()


@pytest.fixture(scope="module")
def card() -> PretrainResult:
    return PretrainResult.from_dict(json.loads((ASSETS / "pretrain_results.json").read_text()),
                                    json.loads((ASSETS / "eval_check.json").read_text()))


def test_shipped_files_are_package_data_and_small() -> None:
    assert ASSETS.parent.parent.name == "stagerl"  # inside the package, so installs find it
    names = {p.name for p in ASSETS.iterdir()}
    assert {"model.safetensors", "config.json", "vocab.json", "tokenizer.safetensors",
            "MODEL_CARD.md", "pretrain_results.json", "eval_check.json"} <= names
    assert sum(p.stat().st_size for p in ASSETS.iterdir()) < 10 * 2**20


def test_card_is_in_the_band_and_matches_its_markdown(card) -> None:
    scale = best_cfg_scale(card)
    full = next(ev for ev in card.evals if ev.cfg_scale == scale)
    strict = full.strict
    # Target band: strict overall 0.30-0.65 on held-out prompts; the hard categories clearly below
    # single object, so RL has room to improve.
    assert 0.30 <= strict["overall"] <= 0.65
    for tag in ("counting", "position", "color_attr"):
        assert strict[tag] <= strict["single_object"] - 0.15, tag
    text = (ASSETS / "MODEL_CARD.md").read_text()
    assert format_table(full) in text and f"**{scale}**" in text


def test_shipped_model_reproduces_its_card(shipped, card) -> None:
    """The card's quick check through the one shapes evaluation (stagerl.eval.evaluate_suite, as
    `stagerl eval` runs it). Its prompts are the first chunks of the card's full table, so the
    check's images are exactly those prompts' images there."""
    stored = json.loads((ASSETS / "pretrain_results.json").read_text())["check"]
    check = card.check.to_dict()
    assert check == {**check, **stored}  # the results file's summary is the check's
    res = evaluate_suite(shipped, check["suite"], check["prompts"], check["images_per_prompt"],
                         SamplingParams(cfg_scale=check["cfg_scale"]), check["seed"])
    # Same prompts, same seeds, same code: only float rounding across machines or thread counts
    # can change a token, and a changed token changes a few verdicts at most (1/256 each).
    for key in ("strict", "lenient"):
        for tag, want in check[key].items():
            assert abs(getattr(res, key)[tag] - want) <= 0.03, (key, tag, getattr(res, key), want)
    assert abs(res.partial - check["partial"]) <= 0.01
    # The check's 256 images are a subset of the full table's 960: within sampling error of it.
    full = next(ev for ev in card.evals if ev.cfg_scale == check["cfg_scale"])
    assert full.seed == check["seed"] and full.suite == check["suite"]
    assert abs(res.strict["overall"] - full.strict["overall"]) <= 0.10


def test_random_init_model_scores_about_zero_strict(shipped) -> None:
    model = random_policy(PretrainConfig(seed=3), SPEC, shipped.tokenizer).eval()
    res = evaluate_suite(model, "heldout", 24, 2, SamplingParams(cfg_scale=2.0), seed=5)
    assert res.strict["overall"] <= 0.03, res.strict


def test_pretrain_recipe_smoke(tmp_path) -> None:
    cfg = PretrainConfig(steps=4, train_examples=96, batch_size=8, warmup_steps=2,
                         eval_prompts=6, eval_images_per_prompt=1, eval_cfg_scales=[1.5, 2.0],
                         progress=False)
    first = tmp_path / "a"
    result = pretrain(cfg, first)
    assert np.isfinite(result.final_loss) and len(result.evals) == 2
    assert set(result.evals[0].strict) >= {"overall", "single_object"}
    stored = json.loads((first / "pretrain_results.json").read_text())
    check = json.loads((first / "eval_check.json").read_text())
    assert PretrainResult.from_dict(stored, check).to_dict() == stored  # the files are the result
    model = TinyPolicy.from_pretrained(first)
    assert model.grid == (8, 8) and model.config.d_model == cfg.d_model
    # the same seed gives the same weights
    pretrain(cfg, tmp_path / "b")
    again = TinyPolicy.from_pretrained(tmp_path / "b")
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.allclose(a, b)


def test_pretrain_cli_writes_a_model_card(tmp_path) -> None:
    from stagerl.cli import main

    out = tmp_path / "cli"
    code = main(["pretrain", "--out", str(out), "--steps", "2", "--train-examples", "48",
                 "--batch-size", "4", "--warmup-steps", "1", "--eval-prompts", "6",
                 "--eval-images-per-prompt", "1", "--eval-cfg-scales", "2.0", "--no-progress"])
    assert code == 0
    text = (out / "MODEL_CARD.md").read_text()
    assert "| overall |" in text and "Seed: 0" in text
    assert TinyPolicy.from_pretrained(out).num_image_tokens == 64

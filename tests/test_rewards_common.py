"""Reward plumbing shared by the learned scorers: registry, kwargs from config, missing extras,
per-image failure isolation."""

import logging

import pytest
import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards import RewardSet, available_rewards, build_reward
from stagerl.rewards._common import BatchedReward, require, resolve_dtype, resolve_device

OURS = ["aesthetic", "clip_score", "geneval", "git_vqa", "grounding_dino", "hps", "ocr",
        "pickscore", "remote"]


def test_every_reward_is_registered_and_builds_without_loading():
    names = available_rewards()
    assert set(OURS) <= set(names)
    for n in OURS:  # building is cheap: heavy models load lazily on the first call
        fn = build_reward(n, **({"rewards": "x"} if n == "remote" else {"device": "cpu"}))
        assert callable(fn)
        assert getattr(fn, "_loaded", False) is False or n == "remote"


def test_reward_set_passes_config_kwargs():
    rs = RewardSet(["ocr", "remote"], {"ocr": {"batch_size": 3},
                                       "remote": {"rewards": ["geneval"], "retries": 1}})
    assert rs.fns[0].batch_size == 3 and rs.fns[1].names == ["geneval"]
    with pytest.raises(UserError, match="Did you mean 'ocr'"):
        build_reward("ocrr")


def test_missing_extra_is_a_clear_user_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rapidocr", None)  # makes `import rapidocr` fail
    with pytest.raises(UserError, match=r"stagerl\[rewards\]"):
        require("rapidocr", "ocr")
    with pytest.raises(UserError, match="'ocr' needs the Python package 'rapidocr'"):
        build_reward("ocr")([Image.new("RGB", (8, 8))], ['"a"'], [{}])


def test_device_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(UserError, match="dtype"):
        resolve_dtype("float8")
    with pytest.raises(UserError, match="device"):
        resolve_device("gpu:0")


class Fragile(BatchedReward):
    name = "fragile"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batches = []

    def _score_batch(self, images, prompts, metadata):
        self.batches.append(len(prompts))
        if any(p == "boom" for p in prompts):
            raise RuntimeError("cannot score this one")
        return [float(len(p)) for p in prompts], [{"p": p} for p in prompts]


def test_one_failing_image_is_recorded_not_a_crash(caplog):
    fn = Fragile(batch_size=4, device="cpu")
    img = Image.new("RGB", (4, 4))
    with caplog.at_level(logging.WARNING):
        out = fn([img] * 5, ["ab", "boom", "abcd", "x", "yz"], None)
    assert out.valid.tolist() == [True, False, True, True, True]
    assert out.scores[[0, 2, 3, 4]].tolist() == [2.0, 4.0, 1.0, 2.0]
    assert "cannot score this one" in out.details[1]["error"]
    assert any("fragile failed on image 1" in r.message for r in caplog.records)
    assert fn.batches == [4, 1, 1, 1, 1, 1]  # chunk of 4 failed -> retried one by one; then 1
    with pytest.raises(ValueError, match="must match"):
        fn([img], ["a", "b"], None)

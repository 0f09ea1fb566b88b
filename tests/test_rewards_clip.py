"""clip_score and pickscore on a tiny random CLIPModel loaded from a local directory."""

import pytest
import torch

from stagerl.rewards import build_reward
from test_rewards_tiny import random_images, save_tiny_clip

PROMPTS = ["a red cat", "a photo of two dogs", "a blue bench above a green cow", "a clock"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_clip_scorers(name, clip_dir):
    images = random_images(4)
    full = build_reward(name, checkpoint=str(clip_dir), device="cpu", batch_size=4)
    out = full(images, PROMPTS, [{}] * 4)
    assert out.scores.shape == (4,) and out.valid.all()
    cos = torch.tensor([d["cosine"] for d in out.details])
    assert (cos.abs() <= 1 + 1e-5).all()
    scale = full.embedder.logit_scale() if name == "pickscore" else 1.0
    torch.testing.assert_close(out.scores, cos * scale)
    assert out.scores.std() > 0  # different images/prompts -> different scores
    again = full(images, PROMPTS, [{}] * 4)
    assert torch.equal(again.scores, out.scores)  # deterministic
    single = build_reward(name, checkpoint=str(clip_dir), device="cpu", batch_size=1)
    one = single(images, PROMPTS, [{}] * 4)
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=1e-5)


def test_bad_image_is_invalid_not_a_crash(clip_dir):
    fn = build_reward("clip_score", checkpoint=str(clip_dir), device="cpu", batch_size=4)
    images = random_images(3)
    images[1] = "not an image"
    out = fn(images, PROMPTS[:3], [{}] * 3)
    assert out.valid.tolist() == [True, False, True]
    assert "PIL.Image" in out.details[1]["error"]
    ok = fn([images[0], images[2]], [PROMPTS[0], PROMPTS[2]], [{}] * 2)
    torch.testing.assert_close(out.scores[[0, 2]], ok.scores)

"""hps on a tiny random open_clip CLIP of the same class as ViT-H-14 (a registered JSON config)."""

import json

import pytest
import torch

from stagerl.errors import UserError
from stagerl.rewards import build_reward
from test_rewards_tiny import random_images

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1}}
PROMPTS = ["a red cat", "a photo of two dogs", "a blue bench", "a clock on a table"]


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    import open_clip
    d = tmp_path_factory.mktemp("hps")
    cfg = d / "stagerl-tiny-hps.json"
    cfg.write_text(json.dumps(TINY))
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("stagerl-tiny-hps", pretrained=None)
    # HPS checkpoints store {"state_dict": ...} saved from DDP ("module." prefixes).
    ckpt = d / "HPS_tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return cfg, ckpt


def test_hps_tiny(hps_files):
    cfg, ckpt = hps_files
    kw = dict(checkpoint=str(ckpt), model_name="stagerl-tiny-hps", model_config=str(cfg),
              device="cpu")
    images = random_images(4)
    out = build_reward("hps", batch_size=4, **kw)(images, PROMPTS, [{}] * 4)
    assert out.scores.shape == (4,) and out.valid.all()
    assert (out.scores.abs() <= 1 + 1e-5).all() and out.scores.std() > 0
    fn = build_reward("hps", batch_size=1, **kw)
    one = fn(images, PROMPTS, [{}] * 4)
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(fn(images, PROMPTS, [{}] * 4).scores, one.scores)  # deterministic
    assert type(fn.model).__name__ == "CLIP"  # the class open_clip builds for ViT-H-14


def test_hps_bad_checkpoint_is_user_error(tmp_path):
    fn = build_reward("hps", checkpoint=str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(UserError, match="neither a file"):
        fn(random_images(1), ["x"], [{}])

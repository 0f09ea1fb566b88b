"""aesthetic: the LAION MLP head on a tiny random CLIP, loaded from local files."""

import pytest
import torch

from stagerl.errors import UserError
from stagerl.rewards import build_reward
from stagerl.rewards.aesthetic import AestheticHead
from test_rewards_tiny import random_images, save_tiny_clip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("aes")
    clip = save_tiny_clip(d / "clip", projection_dim=16)
    torch.manual_seed(1)
    head = d / "head.pth"
    torch.save(AestheticHead(16).state_dict(), head)
    assert set(torch.load(head)) >= {"layers.0.weight", "layers.7.bias"}  # the published keys
    return clip, head


def test_tiny_aesthetic(files):
    clip, head = files
    images = random_images(4)
    fn = build_reward("aesthetic", checkpoint=str(clip), head_checkpoint=str(head), device="cpu",
                      batch_size=4, scale=0.5)
    out = fn(images, [""] * 4, [{}] * 4)
    assert out.scores.shape == (4,) and out.valid.all() and out.scores.std() > 0
    emb = fn.embedder.image_embeds(images)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    torch.testing.assert_close(out.scores, 0.5 * fn.head(emb).detach())
    one = build_reward("aesthetic", checkpoint=str(clip), head_checkpoint=str(head),
                       device="cpu", batch_size=1, scale=0.5)(images, [""] * 4, [{}] * 4)
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn(images, [""] * 4, [{}] * 4).scores, out.scores)


def test_head_dimension_mismatch(files, tmp_path):
    clip, _ = files
    bad = tmp_path / "bad.pth"
    torch.save(AestheticHead(8).state_dict(), bad)
    fn = build_reward("aesthetic", checkpoint=str(clip), head_checkpoint=str(bad), device="cpu")
    with pytest.raises(UserError, match="does not fit"):
        fn(random_images(1), [""], [{}])

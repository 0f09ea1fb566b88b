"""git_vqa on a tiny random GitForCausalLM loaded from a local directory."""

import pytest
import torch

from stagerl.errors import UserError
from stagerl.rewards import build_reward
from stagerl.rewards.vqa import questions_for
from test_rewards_tiny import random_images, save_tiny_git

T = "is there {phrase}?"


def test_questions():
    assert questions_for("a photo of a red cat and two dogs", {}, T) == [
        "is there a red cat?", "is there two dogs?"]
    assert questions_for("an apple", {}, T) == ["is there an apple?"]
    meta = {"include": [{"class": "clock", "count": 2}, {"class": "cow", "color": "green"}]}
    assert questions_for("ignored", meta, T) == ["is there two clocks?", "is there a green cow?"]
    assert questions_for("x", {"questions": ["is it red?"]}, T) == ["is it red?"]


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory):
    return save_tiny_git(tmp_path_factory.mktemp("git"))


def test_tiny_git(git_dir):
    images = random_images(3)
    prompts = ["a red cat", "two dogs and a blue bench", "a clock above a cow"]
    big = build_reward("git_vqa", checkpoint=str(git_dir), device="cpu", batch_size=8)
    out = big(images, prompts, [{}] * 3)
    assert out.valid.all(), out.details
    assert ((out.scores > 0) & (out.scores < 1)).all() and out.scores.std() > 0
    assert [len(d["questions"]) for d in out.details] == [1, 2, 2]
    for s, d in zip(out.scores, out.details):  # the score is the mean of the per-question P(yes)
        assert s.item() == pytest.approx(sum(d["p_yes"]) / len(d["p_yes"]), abs=1e-5)
    # batching (padded questions of different lengths) equals one question at a time
    one = build_reward("git_vqa", checkpoint=str(git_dir), device="cpu", batch_size=1)
    single = one(images, prompts, [{}] * 3)
    torch.testing.assert_close(single.scores, out.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one(images, prompts, [{}] * 3).scores, single.scores)
    # P(yes) by hand: softmax over the two answer tokens at the question's last position
    one.ensure_loaded()
    tok = one.processor.tokenizer
    q = "is there a red cat?"
    ids = torch.tensor([[tok.cls_token_id] + tok(q, add_special_tokens=False)["input_ids"]])
    px = one.processor(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = one.model(input_ids=ids, pixel_values=px).logits[0, -1]
    yes, no = tok.convert_tokens_to_ids(["yes", "no"])
    expect = torch.softmax(logits[[yes, no]], -1)[0]
    assert out.details[0]["p_yes"][0] == pytest.approx(expect.item(), abs=1e-5)


def test_bad_template():
    with pytest.raises(UserError, match="phrase"):
        build_reward("git_vqa", template="is it?")

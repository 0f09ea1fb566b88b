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


# --------------------------------------------------------------------------------------------------
# scoring="parity": the STAGE authors' questions (docs/rewards.md, "Parity scoring").

from stagerl.rewards.vqa import parity_questions  # noqa: E402

P = "{phrase}?"
COLOR = {"nouns": ["elephant", "teddy bear"], "attr_nouns": ["purple elephant", "blue teddy bear"],
         "task_type": "color"}
COMPLEX = {"nouns": ["mirror", "sink"], "task_type": "complex"}
SPATIAL = {"nouns": ["car", "zebra"], "task_type": "spatial",
           "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "below"}}
NUMERACY = {"nouns": ["broom"], "task_type": "numeracy",
            "numeracy_info": [{"obj_name": "broom", "num": 2}]}


def test_parity_questions():
    # the template is the bare phrase and a question mark; attr_nouns before nouns
    assert parity_questions("x", COLOR, P) == (["purple elephant?", "blue teddy bear?"], None)
    assert parity_questions("x", COMPLEX, P) == (["mirror?", "sink?"], None)
    # spatial and numeracy prompts are not asked about: 0; a prompt without nouns: 1
    assert parity_questions("x", SPATIAL, P) == ([], 0.0)
    assert parity_questions("x", NUMERACY, P) == ([], 0.0)
    assert parity_questions("x", {"nouns": [], "task_type": "non"}, P) == ([], 1.0)
    with pytest.raises(ValueError, match="T2I-R1 metadata"):
        parity_questions("a red cat", {}, P)
    r = build_reward("git_vqa", scoring="parity")
    assert r.template == P and build_reward("git_vqa").template == T


def _stubbed(scoring, p_yes):
    """git_vqa whose P(yes) comes from a dict (question -> probability), recording the questions."""
    r = build_reward("git_vqa", scoring=scoring, device="cpu")
    r._loaded = True
    r.asked = []

    def fake(images, questions):
        r.asked += questions
        return torch.tensor([p_yes.get(q, 0.5) for q in questions])

    r.p_yes = fake
    return r


# (prompt, T2I-R1 metadata, fixed questions, parity questions, parity constant); each row is a line
# of the table in docs/rewards.md ("Parity scoring").
VQA_CASES = [
    ("a photo of a purple elephant and a blue teddy bear", COLOR,
     ["is there a purple elephant?", "is there a blue teddy bear?"],
     ["purple elephant?", "blue teddy bear?"], None),
    ("The rectangular mirror was hung above the marble sink.", COMPLEX,
     ["is there a rectangular mirror was hung?", "is there a marble sink?"],
     ["mirror?", "sink?"], None),
    ("a photo of a car below a zebra", SPATIAL, ["is there a car?", "is there a zebra?"], [], 0.0),
    ("a photo of two brooms", NUMERACY, ["is there two brooms?"], [], 0.0),
]


@pytest.mark.parametrize("prompt,meta,fixed_q,parity_q,const", VQA_CASES)
def test_fixed_and_parity_differ_exactly_where_documented(prompt, meta, fixed_q, parity_q, const):
    probs = {"is there a purple elephant?": 0.9, "is there a blue teddy bear?": 0.3,
             "purple elephant?": 0.8, "blue teddy bear?": 0.2, "mirror?": 0.7, "sink?": 0.6}
    image = random_images(1)
    fixed, parity = _stubbed("fixed", probs), _stubbed("parity", probs)
    out_f, out_p = fixed(image, [prompt], [meta]), parity(image, [prompt], [meta])
    assert out_f.valid.all() and out_p.valid.all()
    assert fixed.asked == fixed_q and parity.asked == parity_q
    # the score is the mean P(yes) of the questions asked, or the constant when none is
    assert out_f.scores[0].item() == pytest.approx(sum(probs.get(q, 0.5) for q in fixed_q)
                                                   / len(fixed_q))
    expect = const if const is not None else sum(probs[q] for q in parity_q) / len(parity_q)
    assert out_p.scores[0].item() == pytest.approx(expect)
    assert out_p.details[0]["scoring"] == "parity" and out_p.details[0]["questions"] == parity_q


def test_parity_batch_mixes_asked_and_constant_prompts():
    r = _stubbed("parity", {"mirror?": 0.7, "sink?": 0.6})
    metas = [SPATIAL, COMPLEX, {"nouns": [], "task_type": "non"}, {}]
    out = r(random_images(4), ["a", "b", "c", "d"], metas)
    assert out.valid.tolist() == [True, True, True, False]
    assert out.scores[:3].tolist() == pytest.approx([0.0, 0.65, 1.0])
    assert r.asked == ["mirror?", "sink?"]
    assert "T2I-R1" in out.details[3]["error"]
    only_constants = _stubbed("parity", {})(random_images(2), ["a", "b"], [SPATIAL, NUMERACY])
    assert only_constants.scores.tolist() == [0.0, 0.0] and only_constants.valid.all()


def test_unknown_scoring_is_a_user_error():
    with pytest.raises(UserError, match=r"'git_vqa'.*scoring.*'fixed', 'parity'"):
        build_reward("git_vqa", scoring="paper")


def test_tiny_git_parity_is_the_authors_full_softmax_ratio(git_dir):
    meta = {"nouns": ["cat", "dog"], "attr_nouns": ["red cat", "blue dog"], "task_type": "color"}
    r = build_reward("git_vqa", checkpoint=str(git_dir), device="cpu", scoring="parity")
    out = r(random_images(1), ["a red cat and a blue dog"], [meta])
    assert out.valid.all() and out.details[0]["questions"] == ["red cat?", "blue dog?"]
    # by hand, as the authors compute it: softmax over the whole vocabulary at the last
    # position of [CLS] + question, then P(yes) / (P(yes) + P(no))
    tok = r.processor.tokenizer
    px = r.processor(images=random_images(1), return_tensors="pt")["pixel_values"]
    yes, no = tok.encode("yes")[1], tok.encode("no")[1]
    ratios = []
    for q in ["red cat?", "blue dog?"]:
        ids = torch.tensor([[tok.cls_token_id] + tok(q, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            p = r.model(input_ids=ids, pixel_values=px).logits[0, -1].softmax(-1)
        ratios.append((p[yes] / (p[yes] + p[no])).item())
    assert out.details[0]["p_yes"] == pytest.approx(ratios, abs=1e-5)
    assert out.scores[0].item() == pytest.approx(sum(ratios) / 2, abs=1e-5)

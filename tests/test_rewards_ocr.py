"""OCR reward: real rapidocr on text rendered with Pillow."""

import pytest
from PIL import Image, ImageDraw, ImageFont

from stagerl.rewards import build_reward
from stagerl.rewards.ocr import extract_target_text, levenshtein, normalize_text, ocr_score



def _render(text: str, size=(224, 64)) -> Image.Image:
    from matplotlib import font_manager

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 28)
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((12, 14), text, fill="black", font=font)
    return img


def test_target_extraction_quote_styles():
    assert extract_target_text('a sign that says "Hello World"') == "Hello World"
    assert extract_target_text("a sign that says 'OPEN'") == "OPEN"
    assert extract_target_text("a poster reading \u201cStage RL\u201d today") == "Stage RL"
    assert extract_target_text("a cat's sign with no quotes") is None


def test_normalisation_and_distance():
    assert normalize_text("Hello, World!") == "helloworld"
    assert normalize_text("Hello, World!", strip_punctuation=False) == "hello,world!"
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert ocr_score("helo world", "Hello World") == pytest.approx(1 - 1 / 10)
    assert ocr_score("xx Hello World yy", "hello world") == 1.0  # substring rule (Flow-GRPO)
    assert ocr_score("completely unrelated long text", "abc") == 0.0  # clamped at len


@pytest.fixture(scope="module")
def fn():
    return build_reward("ocr", num_threads=1)  # one rapidocr engine for the module (its start-up is ~1 s)


def test_rapidocr_correct_high_wrong_low_blank_zero(fn):
    images = [_render("Hello World"), _render("Quartz Box"), Image.new("RGB", (64, 64), "white")]
    prompts = ['a sign that says "Hello World"'] * 3
    out = fn(images, prompts, [{}] * 3)
    assert out.valid.all()
    assert out.scores[0] >= 0.9, out.details[0]
    assert out.scores[1] <= 0.4, out.details[1]
    assert out.scores[2] == 0.0
    assert out.details[0]["target"] == "Hello World"


def test_missing_quote_is_invalid_not_crash(fn):
    img = _render("Hello")
    out = fn([img, img], ["no quotes here", 'says "Hello"'], [{}, {}])
    assert out.valid.tolist() == [False, True]
    assert "no quoted target" in out.details[0]["error"]
    assert out.scores[1] == 1.0
    # metadata["text"] overrides the prompt
    out = fn([img], ["no quotes here"], [{"text": "Hello"}])
    assert out.valid.all() and out.scores[0] == 1.0

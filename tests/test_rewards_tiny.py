"""Builders of tiny random-initialised reward models, saved to disk so the real
``from_pretrained(<local dir>)`` loading path runs offline.

Imported by the other ``test_rewards_*`` files; the tests here check the builders themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("a photo of the red green blue cat dog bench cow clock is there yes no two three an "
         "object colored orange yellow purple pink brown black white left right above below near "
         "on top in image").split()


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    """A CLIPTokenizer with the byte alphabet (+ '</w>' forms) and merges spelling WORDS."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in byte_alphabet():
        vocab.setdefault(c, len(vocab))
    for c in byte_alphabet():
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in WORDS:  # left-to-right merges so each word becomes one token
        cur = w[0]
        for k, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if k == len(w) - 1 else "")
            merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def save_tiny_clip(path: Path, image_size: int = 32, projection_dim: int = 16) -> Path:
    """CLIPModel + CLIPProcessor, randomly initialised with a fixed seed."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=projection_dim)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    proc = CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(path)
    return path


def random_images(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))
            for _ in range(n)]


def test_tiny_clip_tokenizer_spells_words_as_single_tokens():
    tok = tiny_clip_tokenizer()
    ids = tok("a red cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red cat"


COCO_SUBSET = ["person", "bicycle", "car", "cat", "dog", "keyboard", "remote", "bench", "cow",
               "clock"]


def _swin(out_features: list[str], image_size: int = 64):
    from transformers import SwinConfig

    return SwinConfig(image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                      num_heads=[1, 1, 1, 1], window_size=4, out_features=out_features)


def save_tiny_mask2former(path: Path, favour: str | None = None) -> Path:
    """Mask2Former (Swin backbone) over a COCO subset; ``favour`` biases the class head so every
    query predicts that class with high confidence (a known answer for end-to-end tests)."""
    import torch
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              Mask2FormerImageProcessor)

    cfg = Mask2FormerConfig(
        backbone_config=_swin(["stage1", "stage2", "stage3", "stage4"]), feature_size=32,
        mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, dim_feedforward=64,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=8,
        num_labels=len(COCO_SUBSET), id2label=dict(enumerate(COCO_SUBSET)),
        label2id={c: i for i, c in enumerate(COCO_SUBSET)}, common_stride=4, train_num_points=16)
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(cfg)
    if favour is not None:
        with torch.no_grad():
            bias = model.class_predictor.bias
            bias.fill_(-20.0)
            bias[COCO_SUBSET.index(favour)] = 20.0
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return path


def save_tiny_owlv2(path: Path) -> Path:
    import torch
    from transformers import (Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor,
                              Owlv2Processor)

    tok = tiny_clip_tokenizer()
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=32)  # OWL's class head needs projection_dim == text hidden size
    torch.manual_seed(0)
    Owlv2ForObjectDetection(cfg).save_pretrained(path)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}),
                   tokenizer=tok).save_pretrained(path)
    return path


def tiny_bert_tokenizer():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?"] + WORDS
    return BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))})


def save_tiny_grounding_dino(path: Path) -> Path:
    import torch
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor)

    tok = tiny_bert_tokenizer()
    text = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    # decoder_layers >= 2 (box-head weight tying) and 3 feature levels (a 4th would be 1x1 at 64 px)
    cfg = GroundingDinoConfig(
        backbone_config=_swin(["stage2", "stage3", "stage4"]), text_config=text, d_model=32,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_feature_levels=3,
        encoder_n_points=2, decoder_n_points=2, max_text_len=32)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(cfg).save_pretrained(path)
    proc = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=proc, tokenizer=tok).save_pretrained(path)
    return path


def save_tiny_git(path: Path) -> Path:
    """GitForCausalLM + GitProcessor (CLIP image processor + BERT tokenizer)."""
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tok = tiny_bert_tokenizer()
    cfg = GitConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8),
                    vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                    eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    GitForCausalLM(cfg).save_pretrained(path)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=proc, tokenizer=tok).save_pretrained(path)
    return path

"""Builders of tiny random-initialised reward models, saved to disk so the real
``from_pretrained(<local dir>)`` loading path runs offline (issue 6, item 4).

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

"""A tiny, randomly initialised Janus for offline tests and smoke runs.

Real Janus-Pro weights cannot be downloaded on the CI machines (docs/development.md), so tests
build the *real* transformers classes (``JanusForConditionalGeneration``, ``JanusProcessor``) at a
toy size. The constraints the sizes must satisfy were measured (docs/development.md, "Tiny random
Janus for tests"):

- ``num_image_tokens == (vision image_size // patch_size) ** 2`` (the grid side is ``image_size //
  patch_size``; ``JanusConfig`` copies it into ``vq_config.num_patches``);
- VQ base/latent channels are multiples of 32 (GroupNorm with 32 groups);
- the VQ ``projection_dim``, ``image_token_embed_dim`` and the vision ``projection_dim`` equal the
  text hidden size;
- decoded pixels = grid * 2 ** (len(channel_multiplier) - 1).

The tokenizer is a byte-level BPE trained in milliseconds on a handful of strings, plus the special
tokens Janus' processor expects (docs/development.md). Byte-level means any prompt can
be encoded, whatever the training strings were.
"""

from __future__ import annotations

import torch
from transformers import (GenerationConfig, JanusConfig, JanusForConditionalGeneration,
                          JanusImageProcessorPil, JanusProcessor, LlamaConfig, PreTrainedTokenizerFast)

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, BOI, EOI, "<|User|>", "<|Assistant|>"]

# A few strings in the style of the prompts the tiny model will see (shapes world, GenEval, the
# Janus-Pro chat template). Only the merges depend on them; byte fallback covers everything else.
_CORPUS = [
    "<|User|>: a photo of a red circle\n\n<|Assistant|>:",
    "a blue square to the left of a green triangle",
    "two yellow circles and one purple square above an orange triangle",
    "a photo of a cat below a dog, a bench, three apples",
]


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with Janus' special tokens; trains in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI})


def tiny_janus_config(tokenizer: PreTrainedTokenizerFast, grid: int = 8, hidden: int = 32,
                      layers: int = 2, codebook: int = 128) -> JanusConfig:
    """A JanusConfig whose image-token grid is ``grid x grid`` and whose images are ``4 * grid`` px.

    Defaults: 8x8 grid -> 32 px images, the shapes world's canvas (worlds/shapes/spec.py), so the
    exact shapes rewards can score them; about 0.9M parameters (mostly the VQ decoder).
    """
    patch = 2
    return JanusConfig(
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=grid * grid + 256, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(
            hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=2.0,
            image_size=grid * patch, patch_size=patch, projection_dim=hidden,
            num_image_tokens=grid * grid),
        vq_config=dict(
            embed_dim=8, num_embeddings=codebook, base_channels=32, latent_channels=32,
            channel_multiplier=[1, 1, 2], num_res_blocks=1, projection_dim=hidden,
            image_token_embed_dim=hidden, num_hidden_layers=2),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE))


def generation_config_for(tokenizer: PreTrainedTokenizerFast, guidance_scale: float = 5.0
                          ) -> GenerationConfig:
    """The generation config Janus-Pro checkpoints ship: ``generate(generation_mode="image")`` reads
    the BOS, pad and ``<begin_of_image>`` ids from it to build the unconditional branch."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, guidance_scale=guidance_scale,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)})


def build_tiny_janus(seed: int = 0, grid: int = 8, hidden: int = 32, layers: int = 2,
                     codebook: int = 128) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """A tiny random Janus and its processor. The weights depend only on ``seed`` (the global RNG
    is left untouched)."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_janus_config(tokenizer, grid=grid, hidden=hidden, layers=layers, codebook=codebook)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    model.generation_config = generation_config_for(tokenizer)
    side = config.vision_config.image_size
    processor = JanusProcessor(image_processor=JanusImageProcessorPil(size={"height": side,
                                                                           "width": side}),
                               tokenizer=tokenizer, num_image_tokens=grid * grid)
    return model.eval(), processor


# (hidden, intermediate, heads, kv heads, text vocab) of Janus-Pro's language models.
WIDTHS = {"1b": (2048, 5632, 16, 16, 102400), "7b": (4096, 11008, 32, 32, 102400),
          "toy": (64, 128, 4, 2, 512)}


def sized_janus(size: str, layers: int, grid: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu"):
    """A random-weight Janus (model, processor) with the widths and vocabularies of Janus-Pro-``size``
    (``1b``, ``7b``; ``toy`` for CPU dry runs) but ``layers`` LM layers and a ``grid`` x ``grid``
    image-token canvas: real FLOP and memory shapes per layer without real weights (benchmarks,
    the GPU check)."""

    hidden, inter, heads, kv, vocab = WIDTHS[size]
    tok = build_tiny_tokenizer()
    toy = size == "toy"
    config = JanusConfig(
        text_config=LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden,
                                intermediate_size=inter, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=kv,
                                max_position_embeddings=grid * grid + 512,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32 if toy else 1024, num_hidden_layers=1,
                           num_attention_heads=4 if toy else 16, image_size=grid * 2,
                           patch_size=2, projection_dim=hidden, num_image_tokens=grid * grid),
        vq_config=dict(num_embeddings=128 if toy else 16384, embed_dim=8, projection_dim=hidden,
                       image_token_embed_dim=hidden, base_channels=32 if toy else 128,
                       latent_channels=32 if toy else 256,
                       channel_multiplier=[1, 1, 2] if toy else [1, 1, 2, 2, 4],
                       num_res_blocks=1 if toy else 2),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).to(dtype=dtype, device=device).eval()
    model.generation_config = generation_config_for(tok)
    processor = JanusProcessor(image_processor=JanusImageProcessorPil(), tokenizer=tok,
                               num_image_tokens=grid * grid)
    return model, processor

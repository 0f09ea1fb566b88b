"""LlamaGen's conditioning inputs, apart from the networks: the frozen T5 text encoder of the t2i
models (caption features, left-padded as LlamaGen's sampler does) and the class names and ids of
the c2i models. Used by :mod:`stagerl.policies.llamagen`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagerl.errors import UserError
from stagerl.policies.llamagen_load import _CONFIG, is_stagerl_dir


class TextEncoder:
    """A frozen T5 encoder + tokenizer (not an ``nn.Module``: engines never see it)."""

    def __init__(self, model: nn.Module, tokenizer: Any, source: str | None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # T5's side; features() left-pads them itself
        self.source = source  # where it was loaded from; None = must be saved with the policy

    @torch.no_grad()
    def features(self, prompts: list[str], length: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, features [N, T, C]) left-padded to ``length`` with pads zeroed.

        T5 pads on the right; LlamaGen's sampler rotates each row so the caption ends at the last
        slot and multiplies the pads away. Text is lower-cased and stripped (LlamaGen's heavier
        caption cleaning needs ftfy/bs4; docs/llamagen.md).
        """
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        texts = [p.lower().strip() for p in prompts]
        enc = self.tokenizer(texts, max_length=length, padding="max_length", truncation=True,
                             return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        feats = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        valid = mask.sum(1)
        order = (torch.arange(length, device=device)[None, :] + valid[:, None]) % length
        feats = feats.gather(1, order[:, :, None].expand_as(feats))
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        return ids, mask, feats * mask[:, :, None]


def class_lookup(class_names: list[str]) -> dict[str, int]:
    """Lower-cased name -> class index; a line matches whole or by any comma-separated synonym."""
    lookup: dict[str, int] = {}
    for i, line in enumerate(class_names):
        for name in [line] + line.split(","):
            lookup.setdefault(name.strip().lower(), i)
    return lookup


def class_index(prompt: str, lookup: dict[str, int], num_classes: int | None) -> int:
    """A c2i prompt -> class index (``num_classes`` None: the range is checked at load time)."""
    text = prompt.strip()
    if text.lstrip("-").isdigit():
        k = int(text)
        if k < 0 or num_classes is not None and k >= num_classes:
            top = "" if num_classes is None else f" 0..{num_classes - 1}"
            raise UserError(f"data.source: prompt {prompt!r} is a class id out of range{top} "
                            f"(the c2i model has {num_classes or 'a fixed number of'} classes)")
        return k
    if text.lower() in lookup:
        return lookup[text.lower()]
    if not lookup:
        raise UserError(f"model.class_names: the c2i model got the text prompt {prompt!r}; "
                        f"give class ids, or a class-name list in model.class_names")
    raise UserError(f"model.class_names: prompt {prompt!r} is neither a class id nor a name in "
                    f"the class list")


def load_text_encoder(path: str, caption_dim: int, dtype: torch.dtype,
                      what: str = "model.t5_path") -> TextEncoder:
    """A T5 encoder (transformers' ``T5EncoderModel``) + tokenizer from a folder or hub id."""
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        model = T5EncoderModel.from_pretrained(os.path.expanduser(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except Exception as err:  # OSError, ValueError, hub errors: all mean "cannot use this path"
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"{what}: could not load a T5 encoder from {path!r}: {first[:160]}") from None
    if int(model.config.d_model) != caption_dim:
        raise UserError(f"{what}: the T5 encoder at {path} is {model.config.d_model} wide, but the "
                        f"GPT reads {caption_dim}-wide caption features (t5-xl: 2048)")
    return TextEncoder(model, tokenizer, path)


def read_class_names(path: str) -> list[str]:
    """One class per line (line i = class i; commas separate synonyms); '' = none."""
    if not path:
        return []
    local = os.path.expanduser(path)
    if not os.path.isfile(local):
        raise UserError(f"model.class_names: no such file: {path}")
    return [line.strip() for line in Path(local).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def check_c2i_prompts(model_cfg: Any, source: str) -> None:
    """Before any run folder exists: every prompt of ``data.source`` maps to a class of a c2i
    model (the first 60 of a procedural shapes source). Errors name the file and line."""
    kind, names, n = model_cfg.llamagen_type, read_class_names(model_cfg.class_names), None
    if model_cfg.tiny_random:
        n = max(10, len(names))
    elif is_stagerl_dir(model_cfg.path):
        saved = json.loads((Path(os.path.expanduser(model_cfg.path)) / _CONFIG).read_text())
        kind, n, names = saved["gpt"]["model_type"], saved["gpt"]["num_classes"], \
            saved.get("class_names") or []
    if kind != "c2i":
        return
    if source.startswith("shapes:"):
        from stagerl.data import build_source

        pairs = [(f"data.source={source}", it.prompt) for it in build_source(source, 0).batch(0, 60)]
    else:
        from stagerl.benchmarks import resolve_benchmark
        from stagerl.policies.tiny import located_prompts

        pairs = located_prompts(resolve_benchmark(source, "prompt file"))
    lookup = class_lookup(names)
    for where, prompt in pairs:
        try:
            class_index(prompt, lookup, n)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None

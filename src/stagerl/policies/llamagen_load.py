"""Reading LlamaGen weights: the official ``.pt`` files (their ``"model"`` key and parameter names)
and safetensors, with the checks that turn a wrong file into one ``UserError`` line naming it.

Kept apart from the adapter (``llamagen.py``) so that the checks run, and can be tested, without
building a policy. Checks, in order: the file exists and reads as a dict of tensors; it holds a
LlamaGen GPT (or VQ) by its parameter names; the conditioning and size match the config; every
shape matches (``load_state_dict`` strict).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagerl.errors import UserError
from stagerl.policies.llamagen_model import SIZES

FORMAT = "stagerl.llamagen.v1"  # config.json of a folder that LlamaGenPolicy.save_pretrained wrote
_CONFIG = "config.json"
_WRAPPER_KEYS = ("model", "module", "state_dict")  # official train scripts: DDP, DeepSpeed, other
_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers
_GPT_KEYS = ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", "norm.weight",
             "output.weight")
_VQ_KEYS = ("quantize.embedding.weight", "decoder.conv_in.weight", "post_quant_conv.weight")
_VQ_IGNORED = ("quantize.codebook_used",)  # a training-time usage counter, not a weight
# Computed tables some official checkpoints carry (LlamaGen's own loader skips them with
# strict=False): the rotary table, the causal mask, sampling caches.
_GPT_IGNORED = re.compile(r"^(freqs_cis|causal_mask)$|\.kv_cache\.")


def read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pt`` / ``.pth`` / ``.bin`` (torch.load, weights only) or ``.safetensors``
    file, unwrapped from ``{"model": ...}`` and DDP / compile prefixes; UserError if unreadable."""
    local = os.path.expanduser(path)
    if not path:
        raise UserError(f"{what}: no file given")
    if not os.path.isfile(local):
        raise UserError(f"{what}: no such file: {path}")
    try:
        if local.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(local)
        else:
            import argparse

            # The official training checkpoints may carry their argparse options beside the weights.
            torch.serialization.add_safe_globals([argparse.Namespace])
            obj = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling/safetensors/zip errors: all mean "not a weights file"
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"{what}: {path} is not a readable weights file ({first[:160]})") from None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{what}: {path} holds no state dict of tensors (expected the official "
                        f"checkpoint's 'model' entry or a safetensors file)")
    out = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def gpt_facts(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the weights themselves say: conditioning, width, depth, codebook, prefix sizes."""
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    vocab, dim = sd["tok_embeddings.weight"].shape
    facts: dict[str, Any] = {"dim": int(dim), "n_layer": len(layers), "vocab_size": int(vocab)}
    if "cls_embedding.embedding_table.weight" in sd:
        facts["model_type"] = "c2i"
        facts["num_classes"] = int(sd["cls_embedding.embedding_table.weight"].shape[0]) - 1
    elif "cls_embedding.cap_proj.fc1.weight" in sd:
        facts["model_type"] = "t2i"
        facts["caption_dim"] = int(sd["cls_embedding.cap_proj.fc1.weight"].shape[1])
        if "cls_embedding.uncond_embedding" in sd:
            facts["cls_token_num"] = int(sd["cls_embedding.uncond_embedding"].shape[0])
    else:
        facts["model_type"] = None
    return facts


def check_gpt(sd: dict[str, torch.Tensor], path: str, model_type: str, size: str) -> dict[str, Any]:
    """Refuse a file that is not a LlamaGen GPT of the configured conditioning and size (and drop
    the computed tables some official files carry)."""
    for key in [k for k in sd if _GPT_IGNORED.search(k)]:
        del sd[key]
    missing = [k for k in _GPT_KEYS if k not in sd]
    facts = gpt_facts(sd) if not missing else {}
    if missing or facts["model_type"] is None:
        what = missing[0] if missing else "cls_embedding.*"
        raise UserError(f"model.path: {path} is not a LlamaGen GPT checkpoint (no {what!r}; "
                        f"expected the official parameter names)")
    if facts["model_type"] != model_type:
        raise UserError(f"model.llamagen_type: {model_type!r}, but {path} holds a "
                        f"{facts['model_type']} GPT")
    n_layer, _, dim = SIZES[size]
    if (facts["n_layer"], facts["dim"]) != (n_layer, dim):
        match = [k for k, (nl, _, d) in SIZES.items() if (nl, d) == (facts["n_layer"], facts["dim"])]
        hint = f" (size {match[0]})" if match else ""
        raise UserError(f"model.llamagen_size: {size} has {n_layer} layers of width {dim}, but "
                        f"{path} holds {facts['n_layer']} layers of width {facts['dim']}{hint}")
    return facts


def check_vq(sd: dict[str, torch.Tensor], path: str, vocab_size: int) -> tuple[int, int]:
    """(codebook size, code width) of a VQ state dict; refuse another codebook than the GPT's."""
    missing = [k for k in _VQ_KEYS if k not in sd]
    if missing:
        raise UserError(f"model.vq_path: {path} is not a LlamaGen VQ checkpoint (no "
                        f"{missing[0]!r})")
    for key in _VQ_IGNORED:
        sd.pop(key, None)
    size, width = (int(n) for n in sd["quantize.embedding.weight"].shape)
    if size != vocab_size:
        raise UserError(f"model.vq_path: {path} has a codebook of {size} codes, but the GPT "
                        f"predicts {vocab_size} (model.path)")
    return size, width


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    """``load_state_dict(strict=True)``; a mismatch becomes one line naming the file and a key."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys such as {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} unexpected keys such as {extra[0]!r}")
        if shapes:
            k = shapes[0]
            parts.append(f"{k!r} has shape {tuple(sd[k].shape)}, expected {tuple(own[k].shape)}")
        raise UserError(f"{what}: {path} does not match the configured LlamaGen model: "
                        + "; ".join(parts))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def check_llamagen_files(model_cfg: Any, what: str = "model.path") -> None:
    """Before any run folder exists: the files a LlamaGen config names are there (nothing is read
    beyond a saved folder's config.json; the weights are checked when they load)."""
    import json

    if getattr(model_cfg, "tiny_random", False):
        return
    path = os.path.expanduser(str(model_cfg.path))
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        try:
            fmt = json.loads(open(config, encoding="utf-8").read()).get("format")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            fmt = None
        if fmt != "stagerl.llamagen.v1":
            raise UserError(f"{what}: {model_cfg.path} is a folder but not a LlamaGen model saved "
                            f"by stagerl; give the official GPT .pt/.safetensors file or such a "
                            f"folder")
    else:
        if not os.path.isfile(path):
            raise UserError(f"{what}: no such file: {model_cfg.path}")
        if not model_cfg.vq_path:
            raise UserError("model.vq_path: LlamaGen needs the VQ tokenizer weights "
                            "(vq_ds16_c2i.pt or vq_ds16_t2i.pt; docs/llamagen.md)")
        if not os.path.isfile(os.path.expanduser(str(model_cfg.vq_path))):
            raise UserError(f"model.vq_path: no such file: {model_cfg.vq_path}")
    names = getattr(model_cfg, "class_names", "")
    if names and not os.path.isfile(os.path.expanduser(str(names))):
        raise UserError(f"model.class_names: no such file: {names}")


def is_stagerl_dir(path: str) -> bool:
    """A folder written by :meth:`LlamaGenPolicy.save_pretrained`."""
    cfg = Path(os.path.expanduser(path)) / _CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False

"""Loading Janus-Pro checkpoints: checks that need no weights, then ``from_pretrained``.

Kept apart from the adapter (``janus.py``) and the LoRA helpers (``janus_lora.py``), which both
load checkpoints, so that neither has to import the other to do it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from stagerl.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_adapter_dir(path: str) -> bool:
    """A LoRA adapter checkpoint of ours (peft's ``adapter_config.json`` inside)."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), "adapter_config.json"))


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def check_janus_checkpoint(path: str, what: str = "model.path") -> None:
    """Refuse, before any weights load, a local folder that is not a Janus checkpoint (a LoRA
    adapter folder of ours counts as one). Hub ids are checked by ``from_pretrained``."""
    import json

    local = os.path.expanduser(path)
    if not os.path.exists(local):
        if _looks_local(path):
            raise UserError(f"{what}: no such directory: {path}")
        return
    if is_adapter_dir(local):
        return
    config = os.path.join(local, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"{what}: {path} is not a model folder (no config.json)")
    try:
        model_type = json.loads(open(config, encoding="utf-8").read()).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{what}: {config} is not a readable JSON config") from None
    if model_type != "janus":
        raise UserError(f"{what}: {path} holds a {model_type!r} model, not a Janus checkpoint "
                        f"(config.json model_type must be 'janus')")


def load_janus(path: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """``JanusForConditionalGeneration`` + processor from a local dir or hub id; UserError if not."""
    from transformers import AutoProcessor, AutoTokenizer, JanusForConditionalGeneration

    check_janus_checkpoint(path)
    path = os.path.expanduser(path)
    try:
        model = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype)
    except Exception as err:  # OSError, ValueError, hub errors: all mean "cannot use this path"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"model.path: could not load a Janus model from {path!r}: {first}") from None
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception:  # a checkpoint without processor files: the tokenizer is enough to sample
        log.warning("no processor found at %s; using its tokenizer only", path)
        try:
            processor = AutoTokenizer.from_pretrained(path)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"model.path: no Janus processor or tokenizer at {path!r}: {first}"
                            ) from None
    return model, processor

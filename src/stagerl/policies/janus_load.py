"""Loading Janus-Pro checkpoints: checks that need no weights, then ``from_pretrained``.

Kept apart from the adapter (``janus.py``) and the LoRA helpers (``janus_lora.py``), which both
load checkpoints, so that neither has to import the other to do it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from torch import nn

from stagerl.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_adapter_dir(path: str) -> bool:
    """A LoRA adapter checkpoint of ours (peft's ``adapter_config.json`` inside)."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), "adapter_config.json"))


def is_janus_dir(path: Any) -> bool:
    """A saved Janus folder: transformers' config.json with ``model_type: janus``, or a LoRA
    adapter folder of ours (its base is named inside)."""
    import json

    local = os.path.expanduser(str(path))
    if is_adapter_dir(local):
        return True
    try:
        with open(os.path.join(local, "config.json"), encoding="utf-8") as fh:
            return json.load(fh).get("model_type") == "janus"
    except (OSError, ValueError, AttributeError):
        return False


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _weights_file(local: str) -> str:
    """The weights file of a local Janus folder (the one a load error is about)."""
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(local, name)):
            return os.path.join(local, name)
    raise UserError(f"{os.path.join(local, _WEIGHT_FILES[0])}: no such file; {local} holds no "
                    f"weights ({', '.join(_WEIGHT_FILES)})")


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
    weights = _weights_file(path) if os.path.isdir(path) else None
    if not sys.stderr.isatty():  # transformers' "Loading weights" bar, like ours, needs a terminal
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        model, info = JanusForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                                    output_loading_info=True)
    except Exception as err:  # OSError, ValueError, hub errors: all mean "cannot use this path"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if weights is not None:
            raise UserError(f"{weights}: cannot load these weights ({first})") from None
        raise UserError(f"model.path: could not load a Janus model from {path!r}: {first}") from None
    # from_pretrained initialises missing weights at random with only a warning: refuse instead
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{weights or path}: {len(missing)} weights missing (e.g. {missing[0]}); "
                        f"not a complete Janus checkpoint")
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

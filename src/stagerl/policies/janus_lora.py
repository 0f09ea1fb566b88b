"""LoRA for Janus through peft: wrap, reference view, save adapters, reload, merge.

- Target modules are one regex over module names; the default (``ModelConfig.lora_target_modules``)
  hits only the language model's attention and MLP projections. Plain names such as ``q_proj``
  would also hit the vision tower (docs/development.md, "LoRA through peft").
- A LoRA checkpoint directory holds peft's ``adapter_config.json`` + ``adapter_model.safetensors``,
  the processor, and ``stagerl_lora.json`` naming the base weights. When the base has no path of its
  own (a tiny random model) the base weights are written beside the adapter, in ``base_model/``.
- ``merge_lora`` folds the adapter into the base weights and writes a full checkpoint that plain
  ``JanusForConditionalGeneration.from_pretrained`` loads (CLI: ``stagerl merge-lora``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from stagerl.errors import UserError
from stagerl.policies.janus_load import _DTYPES, is_adapter_dir, load_janus
from stagerl.policies.base import PromptInputs, TokenStats

log = logging.getLogger(__name__)

NOTE_FILE = "stagerl_lora.json"
BASE_SUBDIR = "base_model"


class JanusReferenceView:
    """The LoRA reference policy: the same weights with the adapter disabled (docs/development.md,
    "LoRA through peft").

    Not an ``nn.Module`` on purpose: it owns no parameters, so ``reference.requires_grad_(False)``
    or ``.to(device)`` by a trainer cannot touch the policy's adapter weights. ``bind(module)`` lets
    a trainer route calls through the prepared (DDP / DeepSpeed) wrapper of the policy instead.
    """

    def __init__(self, policy: Any) -> None:
        if not policy.is_lora:
            raise ValueError("JanusReferenceView needs a LoRA policy")
        self.policy = policy
        self._call: Any = policy

    def bind(self, module: Any) -> "JanusReferenceView":
        """Call ``module(...)`` (a prepared wrapper of the policy) instead of the bare policy."""
        self._call = module
        return self

    def forward(self, inputs: PromptInputs, tokens: torch.Tensor, logprob_mode: str = "cond",
                cfg_scale: float = 1.0, temperature: float = 1.0,
                chunk_size: int = 0) -> TokenStats:
        with torch.no_grad(), self.policy.model.disable_adapter():
            return self._call(inputs, tokens, logprob_mode=logprob_mode, cfg_scale=cfg_scale,
                              temperature=temperature, chunk_size=chunk_size)

    __call__ = forward

    @property
    def grid(self) -> tuple[int, int]:
        return self.policy.grid

    @property
    def num_image_tokens(self) -> int:
        return self.policy.num_image_tokens

    def parameters(self) -> Any:
        return iter(())

    def eval(self) -> "JanusReferenceView":
        return self

    def train(self, mode: bool = True) -> "JanusReferenceView":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "JanusReferenceView":
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "JanusReferenceView":
        return self


def add_lora(model: nn.Module, model_cfg: Any) -> nn.Module:
    """Wrap a ``JanusForConditionalGeneration`` in a peft ``PeftModel``; only adapters train."""
    from peft import LoraConfig, get_peft_model

    try:
        re.compile(model_cfg.lora_target_modules)
    except re.error as err:
        raise UserError(f"model.lora_target_modules: not a valid regex: {err}") from None
    config = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha,
                        lora_dropout=model_cfg.lora_dropout,
                        target_modules=model_cfg.lora_target_modules, bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise UserError(f"model.lora_target_modules: {str(err).splitlines()[0]}") from None




def _base_state_dict(core: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a LoRA-injected model, under the plain transformers names."""
    out = {}
    for key, value in core.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def save_adapter(policy: Any, path: str, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Adapter weights + ``stagerl_lora.json`` (+ ``base_model/`` when the base has no path)."""
    peft_model = policy.model
    base = policy.lora_base
    if base is None:
        from transformers import JanusForConditionalGeneration

        base_dir = os.path.join(path, BASE_SUBDIR)
        plain = JanusForConditionalGeneration(policy.core.config)
        plain.load_state_dict(_base_state_dict(policy.core))
        plain.generation_config = policy.core.generation_config
        plain.save_pretrained(base_dir)
        policy.processor.save_pretrained(base_dir)
        base, recorded = BASE_SUBDIR, os.path.abspath(base_dir)
    else:
        recorded = base
    for cfg in peft_model.peft_config.values():  # lets transformers/peft find the base, too
        cfg.base_model_name_or_path = recorded
    peft_model.save_pretrained(path, state_dict=state_dict)
    with open(os.path.join(path, NOTE_FILE), "w") as fh:
        json.dump({"base": base}, fh)


def resolve_base(adapter_dir: str, base: str | None = None) -> str:
    """The base checkpoint of an adapter directory: ``base`` if given, else the stagerl note (a
    relative entry is relative to the adapter dir), else peft's ``base_model_name_or_path``."""
    if base:
        return base
    note = os.path.join(adapter_dir, NOTE_FILE)
    if os.path.isfile(note):
        with open(note) as fh:
            recorded = json.load(fh)["base"]
        local = os.path.join(adapter_dir, recorded)
        return local if not os.path.isabs(recorded) and os.path.exists(local) else recorded
    with open(os.path.join(adapter_dir, "adapter_config.json")) as fh:
        recorded = json.load(fh).get("base_model_name_or_path")
    if not recorded:
        raise UserError(f"{adapter_dir}: the adapter names no base model; pass --base")
    return recorded


def load_adapter_checkpoint(adapter_dir: str, dtype: torch.dtype, trainable: bool,
                            base: str | None = None) -> tuple[nn.Module, Any, str]:
    """(PeftModel, processor, base path) from a LoRA checkpoint directory."""
    from peft import PeftModel


    adapter_dir = os.path.expanduser(adapter_dir)
    base_path = resolve_base(adapter_dir, base)
    model, processor = load_janus(base_path, dtype)
    if os.path.isfile(os.path.join(adapter_dir, "processor_config.json")):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    return model, processor, base_path


def merge_lora(adapter_dir: str, out_dir: str, base: str | None = None,
               dtype: str = "float32") -> str:
    """Fold a LoRA adapter into its base weights; write a full Janus checkpoint + processor."""

    if not is_adapter_dir(adapter_dir):
        raise UserError(f"{adapter_dir}: not a LoRA checkpoint (no adapter_config.json)")
    if dtype not in _DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    model, processor, _ = load_adapter_checkpoint(adapter_dir, _DTYPES[dtype], trainable=False,
                                                  base=base)
    merged = model.merge_and_unload()
    os.makedirs(out_dir, exist_ok=True)
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    log.info("merged %s into %s", adapter_dir, out_dir)
    return out_dir


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stagerl merge-lora``."""
    parser.add_argument("adapter_dir", help="LoRA checkpoint directory (adapter_config.json).")
    parser.add_argument("out_dir", help="Where to write the merged full model.")
    parser.add_argument("--base", default=None, help="Base checkpoint (dir or hub id); default: "
                        "the one recorded in the adapter directory.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="Dtype to load the base and write the merged model in.")


def run_cli(args: argparse.Namespace) -> int:
    merge_lora(args.adapter_dir, args.out_dir, base=args.base, dtype=args.dtype)
    return 0

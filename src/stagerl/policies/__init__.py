"""Policy adapters behind one protocol (:mod:`stagerl.policies.base`) and a small factory registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from stagerl.policies.base import (Policy, PromptInputs, SampleOutput, SamplingParams, TokenStats)

__all__ = ["Policy", "PromptInputs", "SampleOutput", "SamplingParams", "TokenStats", "PolicyPair",
           "register_policy", "build_policy"]


@dataclass
class PolicyPair:
    """The trainable policy and the frozen reference (None when no reference is needed).

    For LoRA the reference is a view of the same weights with the adapter disabled.
    """

    policy: Any
    reference: Any | None


_BUILDERS: dict[str, Callable[..., PolicyPair]] = {}


def register_policy(kind: str) -> Callable[[Callable[..., PolicyPair]], Callable[..., PolicyPair]]:
    """Register ``build(model_cfg, need_reference: bool) -> PolicyPair`` for a ``model.kind``."""

    def wrap(fn: Callable[..., PolicyPair]) -> Callable[..., PolicyPair]:
        _BUILDERS[kind] = fn
        return fn

    return wrap


def build_policy(model_cfg: Any, need_reference: bool) -> PolicyPair:
    """Build the policy (and reference) named by ``model_cfg.kind``."""
    import importlib

    from stagerl.errors import UserError

    if model_cfg.kind not in _BUILDERS:
        module = {"tiny": "stagerl.policies.tiny", "janus": "stagerl.policies.janus"}.get(
            model_cfg.kind)
        if module is None:
            raise UserError(f"model.kind: unknown policy kind {model_cfg.kind!r}")
        importlib.import_module(module)
    return _BUILDERS[model_cfg.kind](model_cfg, need_reference)

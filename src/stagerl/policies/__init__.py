"""Policy adapters behind one protocol (:mod:`stagerl.policies.base`) and a registry
(:mod:`stagerl.policies.registry`).

Importing this package imports every adapter module, whose ``@register_policy`` line is then the
only place a ``model.kind`` is named (docs/design.md §14). A new adapter is one module with that
decorator plus one name in the import below; the adapters keep their heavy dependencies
(transformers, peft) inside the functions that load a model, so this import stays cheap.
"""

from __future__ import annotations

from stagerl.policies.base import Policy, PromptInputs, SampleOutput, SamplingParams, TokenStats
from stagerl.policies.registry import PolicyPair, build_policy, policy_kinds, register_policy

# Last: importing an adapter module runs its @register_policy.
from stagerl.policies import janus, llamagen, tiny  # noqa: E402,F401  isort: skip

__all__ = ["Policy", "PromptInputs", "SampleOutput", "SamplingParams", "TokenStats", "PolicyPair",
           "build_policy", "policy_kinds", "register_policy"]

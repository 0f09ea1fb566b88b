"""The model-adapter registry: ``model.kind`` -> a builder (docs/design.md §5 and §14).

An adapter module registers its kind with ``@register_policy``; :mod:`stagerl.policies` imports the
adapter modules, so the registry is complete once that package is imported, and config validation
reads ``model.kind``'s choices from :func:`policy_kinds`. Adapters import this module, never the
package, so that no import cycle runs through the package (docs/design.md §15).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stagerl.errors import UserError
from stagerl.policies.base import Policy


@dataclass
class PolicyPair:
    """The trainable policy and the frozen reference (None when no reference is needed).

    For LoRA the reference is a view of the same weights with the adapter disabled.
    """

    policy: Policy
    reference: Policy | None


_BUILDERS: dict[str, Callable[..., PolicyPair]] = {}
_RECOGNISERS: dict[str, Callable[[Path], bool]] = {}


def register_policy(kind: str, recognise: Callable[[Path], bool] | None = None
                    ) -> Callable[[Callable[..., PolicyPair]], Callable[..., PolicyPair]]:
    """Register ``build(model_cfg, need_reference: bool) -> PolicyPair`` for a ``model.kind``;
    ``recognise(folder)`` says whether a saved model folder is one of this kind (by its files)."""

    def wrap(fn: Callable[..., PolicyPair]) -> Callable[..., PolicyPair]:
        if kind in _BUILDERS and _BUILDERS[kind] is not fn:
            raise ValueError(f"policy kind {kind!r} registered twice")
        _BUILDERS[kind] = fn
        if recognise is not None:
            _RECOGNISERS[kind] = recognise
        return fn

    return wrap


def folder_kind(folder: str | Path) -> str | None:
    """The ``model.kind`` of a saved model folder, read from its own files (a Janus checkpoint by
    its config.json, a shapes-model folder by its vocab.json, ...); None when no kind claims it.
    Needs the adapters imported (``import stagerl.policies``)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return None
    kinds = [k for k, fn in sorted(_RECOGNISERS.items()) if fn(path)]
    return kinds[0] if len(kinds) == 1 else None


def policy_kinds() -> tuple[str, ...]:
    """Every registered ``model.kind``."""
    return tuple(sorted(_BUILDERS))


def build_policy(model_cfg: Any, need_reference: bool) -> PolicyPair:
    """Build the policy (and reference) named by ``model_cfg.kind``."""
    if model_cfg.kind not in _BUILDERS:
        raise UserError(f"model.kind: unknown policy kind {model_cfg.kind!r}; choose from "
                        f"{', '.join(policy_kinds())}")
    return _BUILDERS[model_cfg.kind](model_cfg, need_reference)

"""One reward signature, a registry, and weighted combination (docs/design.md §7).

Every reward is a callable ``(images, prompts, metadata) -> RewardOutput``:
- ``images``: N RGB ``PIL.Image`` objects;
- ``prompts``: N strings;
- ``metadata``: N dicts (GenEval schema for GenEval-style rewards; ``{}`` when a prompt has none).

``RewardOutput.scores`` is an fp32 tensor [N]. A reward that cannot score one image (a detector
crash, an OCR failure) marks it ``valid=False`` and explains it in ``details``; the trainer counts and
logs such events instead of crashing or silently using 0.

Rewards register by name with :func:`register_reward` and are built from config with
:func:`build_reward`. Heavy models load lazily, on first call.

A reward may also define ``preflight()``: it checks, without loading any weights, that what the
reward needs is there (its optional packages, its checkpoints on disk or in the hub cache, its
server) and raises :class:`UserError` naming the reward and the way out.
:meth:`RewardSet.preflight` calls it before the policy loads; rewards built on
``stagerl.rewards._common.BatchedReward`` get it by declaring ``requires`` and ``checkpoints()``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from PIL import Image

from stagerl.errors import UserError


@dataclass
class RewardOutput:
    """Scores for a batch of N images."""

    scores: torch.Tensor  # [N] fp32 reward per image (value for invalid entries is unspecified)
    valid: torch.Tensor  # [N] bool, False where the reward failed on that image
    details: list[dict[str, Any]] = field(default_factory=list)  # N per-sample dicts (may be empty)

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32)
        self.valid = torch.as_tensor(self.valid, dtype=torch.bool)
        if self.scores.shape != self.valid.shape or self.scores.dim() != 1:
            raise ValueError(f"scores {tuple(self.scores.shape)} and valid "
                             f"{tuple(self.valid.shape)} must both be [N]")


class RewardFn(Protocol):
    """A reward: ``(images, prompts, metadata) -> RewardOutput``."""

    name: str

    def __call__(self, images: list[Image.Image], prompts: list[str],
                 metadata: list[dict[str, Any]]) -> RewardOutput: ...


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator: register a reward factory (a class or function returning a RewardFn)."""

    def wrap(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_builtin_rewards() -> None:
    # Importing the modules runs their @register_reward decorators. Modules whose optional
    # dependencies are missing still import: they only fail when the reward is built or called.
    # The folder is read by path: importing the package itself from here would close a cycle
    # (the package imports this module; docs/design.md §15).
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"stagerl.rewards.{mod.name}")


def available_rewards() -> list[str]:
    _load_builtin_rewards()
    return sorted(_REGISTRY)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build a registered reward; an unknown name, or an argument the reward does not take, is a
    UserError with the closest suggestion."""
    names = available_rewards()
    if name not in _REGISTRY:
        raise UserError(f"unknown reward {name!r}.{_did_you_mean(name, names)} Available: "
                        f"{', '.join(names)}")
    _check_arguments(name, _REGISTRY[name], kwargs)
    return _REGISTRY[name](**kwargs)


def _check_arguments(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Keyword arguments a factory without ``**kwargs`` does not take are a UserError (Python's
    own TypeError would be a traceback)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # no signature to read: let the factory decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in takes]
    if unknown:
        raise UserError(f"reward.kwargs.{name}: reward {name!r} takes no argument "
                        f"{unknown[0]!r}.{_did_you_mean(unknown[0], takes)} It takes: "
                        f"{', '.join(takes) or 'no arguments'}")


def check_reward_kwargs(kwargs: dict[str, Any], names: list[str] | None = None,
                        what: str = "reward.names") -> None:
    """``reward.kwargs`` is {reward name: {argument: value}}: every key must be a reward of
    ``names`` (the rewards in use, called ``what`` in the message) or, when ``names`` is None, any
    registered reward; a key for no such reward would be silently ignored, so it is a
    UserError."""
    known = list(names) if names is not None else available_rewards()
    for key, value in (kwargs or {}).items():
        if key not in known:
            where = what if names is not None else "the registered rewards"
            raise UserError(f"reward.kwargs: {key!r} is not one of {where} "
                            f"({', '.join(known)}), so its arguments would be ignored."
                            f"{_did_you_mean(str(key), known)}")
        if value is not None and not isinstance(value, dict):
            raise UserError(f"reward.kwargs.{key}: expected a mapping of arguments such as "
                            f"{{batch_size: 8}}, got {value!r}")


class RewardSet:
    """Several named rewards evaluated on the same batch -> a [N, K] matrix of columns.

    Weights and the tied-column drop are applied later, in ``stagerl.algo.combine_rewards``.
    """

    def __init__(self, names: list[str], kwargs: dict[str, dict[str, Any]] | None = None,
                 monitored: list[str] | None = None):
        """``monitored``: names of rewards only logged (:meth:`monitors`), whose arguments may
        also be in ``kwargs``."""
        kwargs = kwargs or {}
        check_reward_kwargs(kwargs, list(names) + list(monitored or []),
                            what="reward.names and reward.monitor" if monitored else "reward.names")
        self.names = list(names)
        self.fns = [build_reward(n, **dict(kwargs.get(n) or {})) for n in self.names]
        self._monitored, self._kwargs = list(monitored or []), kwargs

    def monitors(self, names: list[str] | None = None,
                 kwargs: dict[str, dict[str, Any]] | None = None) -> "RewardSet | None":
        """The rewards logged beside these but never trained on: ``names`` (default: the
        ``monitored`` names given at construction, config ``reward.monitor``, built with their
        ``kwargs``, default the construction's), then the ``gold`` rewards a learned proxy names
        (built with the proxy's own ``gold_kwargs``, e.g. its world). None when there are none; a
        name already trained on is not repeated."""
        kwargs = dict(self._kwargs if kwargs is None else kwargs)
        wanted = list(self._monitored if names is None else names)
        for fn in self.fns:
            for gold in getattr(fn, "gold", ()):
                if gold not in wanted:
                    wanted.append(gold)
                    kwargs.setdefault(gold, dict(getattr(fn, "gold_kwargs", {})))
        wanted = [n for n in wanted if n not in self.names]
        return RewardSet(wanted, {n: kwargs.get(n) or {} for n in wanted}) if wanted else None

    def preflight(self) -> None:
        """Each reward's optional ``preflight()`` hook (packages, checkpoints, servers), in order;
        the first problem is a UserError. Loads no weights."""
        for fn in self.fns:
            hook = getattr(fn, "preflight", None)
            if callable(hook):
                hook()

    def __call__(self, images: list[Image.Image], prompts: list[str],
                 metadata: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Returns (scores [N, K], valid [N, K], details: N dicts keyed by reward name)."""
        outs = [fn(images, prompts, metadata) for fn in self.fns]
        scores = torch.stack([o.scores for o in outs], dim=1)
        valid = torch.stack([o.valid for o in outs], dim=1)
        details = [{n: (o.details[i] if i < len(o.details) else {})
                    for n, o in zip(self.names, outs)} for i in range(len(images))]
        return scores, valid, details

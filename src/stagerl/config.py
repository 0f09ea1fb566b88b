"""Loading the typed config tree (:mod:`stagerl.config_schema`), with errors a user can act on.

Load order (later wins): dataclass defaults -> ``algo.preset`` row -> YAML file -> dotted CLI
overrides (``algo.beta=0.01``). Merging and overriding is OmegaConf's structured-config machinery;
this module adds readable errors and range checks (TRL-style documented fields, CleanRL-style typed
config).

The same machinery loads every command's options (:func:`load_options`): ``pretrain``, ``study``,
``eval`` and ``sample`` each have a typed options dataclass, read from an optional YAML file, its
``--flags`` and dotted ``key=value`` overrides, with the same error messages as ``train``.

The tree's classes are re-exported here, so ``from stagerl.config import Config`` keeps working.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import re
import typing
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from stagerl.config_schema import (AlgoConfig, Config, DataConfig, LogConfig,  # noqa: F401
                                   ModelConfig, OptimConfig, RewardConfig, RunConfig,
                                   SamplingConfig, _all_keys, field_help, sub_config)
from stagerl.data import suite_names
from stagerl.errors import UserError


def _sections(root: type) -> dict[str, type]:
    return {f.name: c for f in dataclasses.fields(root) if (c := sub_config(f)) is not None}


def _suggest(key: str, root: type = Config) -> str:
    keys = _all_keys(root)
    sections = list(_sections(root))
    if "." not in key and sections:  # a section name
        close = difflib.get_close_matches(key, sections, n=1, cutoff=0.5)
        return f" Did you mean '{close[0]}'?" if close else f" Sections: {', '.join(sections)}"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # try the last component against every leaf name
        leaf = key.split(".")[-1]
        close = [k for k in keys if k.split(".")[-1] in
                 difflib.get_close_matches(leaf, [k.split(".")[-1] for k in keys], n=1)]
    return f" Did you mean '{close[0]}'?" if close else ""


class FieldError(UserError):
    """A bad value of one field (``key``); the loader adds the YAML file and line, or the
    ``--flag`` the value came from."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class _Layer:
    """One layer of config values and where it came from: a YAML file (whose keys have line
    numbers), the command line, or an ``algo.preset`` row. ``labels`` name the ``--flag`` a
    command-line value came from, so that an error names what the user typed."""

    def __init__(self, origin: str, data: Any, text: str | None = None,
                 labels: dict[str, str] | None = None):
        self.origin = origin
        self.data = OmegaConf.to_container(data) if isinstance(data, DictConfig) else data
        self._root = yaml.compose(text, Loader=yaml.SafeLoader) if text else None
        self.labels = labels or {}

    def get(self, key: str, default: Any = None) -> Any:
        node = self.data
        for part in re.findall(r"[^.\[\]]+", key):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return default
        return node

    def has(self, key: str) -> bool:
        return self.get(key, _Layer) is not _Layer

    def name(self, key: str) -> str:
        """The key as the user wrote it: ``--images-per-prompt`` for a flag, else the dotted key."""
        return self.labels.get(re.sub(r"\[\d+\]", "", key), key)

    def where(self, key: str) -> str:
        """``'file.yaml:LINE: '`` for a key of a YAML file, ``''`` for the command line."""
        if self._root is None:
            return "" if self.origin == "command line" else f"{self.origin}: "
        line, node = None, self._root
        for part in re.sub(r"\[\d+\]", "", key).split("."):
            hit = next((kv for kv in getattr(node, "value", []) if isinstance(kv, tuple)
                        and getattr(kv[0], "value", None) == part), None)
            if not isinstance(node, yaml.MappingNode) or hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        return f"{self.origin}:{line}: " if line else f"{self.origin}: "

    def error(self, key: str, problem: str) -> UserError:
        return UserError(f"{self.where(key)}{self.name(key)}: {problem}")


_SHAPES = {"list": "a list such as [a, b]", "mapping": "a mapping such as {key: value}",
           "value": "a single value, not a list or mapping"}
_TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "text"}


def _hint(key: str, root: type = Config) -> Any:
    """The declared type of a dotted field (list element types for ``key[i]``); None if the key
    names no field."""
    *path, name = re.sub(r"\[\d+\]", "", key).split(".")
    cls: type | None = root
    for part in path:
        cls = _sections(cls).get(part) if cls is not None else None
    if cls is None or name in _sections(cls):
        return None
    t = typing.get_type_hints(cls).get(name)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) is typing.Union and args:
        t = args[0]
    if "[" in key and typing.get_origin(t) in (list, tuple) and typing.get_args(t):
        t = typing.get_args(t)[0]
    return t


def _shape(t: Any) -> str:
    origin = typing.get_origin(t) or t
    return "list" if origin in (list, tuple) else "mapping" if origin is dict else "value"


def _check_shapes(layer: _Layer, root: type = Config) -> None:
    """Sections and field shapes of one layer, in words (OmegaConf's own are 'AnyNode is not a
    ListConfig' and 'int is not a subclass of RunConfig')."""
    _check_node(layer, root, root, layer.data or {}, "")


def _check_node(layer: _Layer, root: type, cls: type, body: dict, prefix: str) -> None:
    sections = _sections(cls)
    for name, value in body.items():
        key = f"{prefix}{name}"
        if name in sections:
            if not isinstance(value, dict):
                first = dataclasses.fields(sections[name])[0].name
                raise UserError(f"{layer.where(key)}'{key}' is a section of settings, not a "
                                f"value (got {value!r}); set its fields, e.g. {key}.{first}=...")
            _check_node(layer, root, sections[name], value, key + ".")
            continue
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise UserError(f"{layer.where(key)}unknown config key '{key}'.{_suggest(key, root)}")
        want = _shape(_hint(key, root))
        got = "list" if isinstance(value, list) else "mapping" if isinstance(value, dict) \
            else "value"
        if value is not None and got != want:
            raise layer.error(key, f"expected {_SHAPES[want]}, got {value!r}")


def _omegaconf_error(err: OmegaConfBaseException, layer: _Layer, root: type) -> UserError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        return UserError(f"{layer.where(key)}unknown config key '{key}'.{_suggest(key, root)}")
    want = _TYPE_WORDS.get(_hint(key, root)) if key else None
    if isinstance(err, ValidationError) and want:
        return layer.error(key, f"expected {want}, got {layer.get(key)!r}")
    if key:
        return layer.error(key, str(err).splitlines()[0])
    return UserError(f"{layer.where(key)}{str(err).splitlines()[0]}")


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file (undecodable byte at offset "
                        f"{err.start})") from None


def _yaml_problem(err: Exception) -> str:
    """PyYAML's problem in one phrase, with the line its context started on when that differs."""
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    mark = getattr(err, "problem_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        context = f"{context} started on line {start.line + 1}"
    return f"{problem} ({context})" if context else problem


def _load_yaml(path: str) -> _Layer:
    text = _read_text(path)
    try:
        cfg = OmegaConf.load(io.StringIO(text))
        layer = _Layer(path, cfg, text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise UserError(f"{where}: not valid YAML: {_yaml_problem(err)}") from None
    except OmegaConfBaseException as err:
        raise UserError(f"{path}: not a valid config: {str(err).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: a config file must be a mapping of sections")
    if not len(cfg):  # an empty file (or only comments) would silently run on the defaults
        raise UserError(f"{path}: the file holds no settings (it is empty or only comments); "
                        f"give settings in it, or leave the file out to use the defaults")
    return layer


def _parse_overrides(overrides: list[str]) -> _Layer:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise UserError(f"bad override {o!r}: expected dotted.key=value, e.g. algo.beta=0.01")
        try:
            OmegaConf.from_dotlist([o])
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise UserError(f"bad override {o!r}: the value is not valid YAML "
                            f"({_yaml_problem(err)}); close lists with ']' and quote text "
                            f"that holds ':' or ','") from None
    return _Layer("command line", OmegaConf.from_dotlist(list(overrides)))


def _merge(layers: list[_Layer], root: type = Config) -> DictConfig:
    cfg = OmegaConf.structured(root)
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer.data)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, layer, root) from None
    return cfg


def _layers(root: type, path: Optional[str], overrides: Optional[list[str]],
            flags: Optional[_Layer] = None) -> list[_Layer]:
    """The YAML file, then the ``--flags``, then the dotted overrides; shapes checked."""
    layers = [_load_yaml(path)] if path else []
    layers += [flags] if flags is not None and flags.data else []
    layers += [_parse_overrides(overrides)] if overrides else []
    for layer in layers:
        _check_shapes(layer, root)
    return layers


def _checked(obj: Any, layers: list[_Layer], check: Any = None) -> Any:
    """Field metadata checks, then ``check(obj)`` (cross-field rules); a FieldError names the
    file and line or the flag its value came from."""
    try:
        _check_tree(obj, "")
        if check is not None:
            check(obj)
    except FieldError as err:
        layer = next((lay for lay in reversed(layers) if lay.has(err.key)), None)
        if layer is None:
            raise UserError(str(err)) from None
        raise layer.error(err.key, err.problem) from None
    return obj


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, *,
                train: bool = False) -> Config:
    """Defaults <- preset <- YAML file <- dotted overrides; validated. Raises UserError; errors in a
    YAML file name its line. ``train=True`` (``stagerl train``) adds the rules that only a training
    run needs (:func:`_check_train_rules`), which a config read back for eval does not."""
    layers = _layers(Config, path, overrides)
    merged = _merge(layers)
    preset = merged.algo.preset
    if preset is not None:
        from stagerl.algo.presets import get_preset

        try:
            row = get_preset(preset)
        except KeyError as err:
            where = next((lay.where("algo.preset") for lay in reversed(layers)
                          if lay.has("algo.preset")), "")
            raise UserError(f"{where}algo.preset: {err.args[0]}") from None
        merged = _merge([_Layer(f"preset {preset}", {"algo": row})] + layers)
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _normalise(cfg)
    return _checked(cfg, layers, _check_train_rules if train else _check_rules)


T = typing.TypeVar("T")


def load_options(root: type[T], path: Optional[str] = None,
                 overrides: Optional[list[str]] = None, flags: Optional[dict[str, Any]] = None,
                 labels: Optional[dict[str, str]] = None, check: Any = None) -> T:
    """A command's typed options (any dataclass whose fields carry ``help`` and optional
    ``min``/``max``/``choices``), loaded like the training config: defaults <- YAML file <-
    ``--flags`` (``flags``: field -> parsed value, ``labels``: field -> the flag's spelling) <-
    dotted ``key=value`` overrides; then ``check(options)`` for cross-field rules."""
    flag_layer = _Layer("command line", dict(flags or {}), labels=labels) if flags else None
    layers = _layers(root, path, overrides, flag_layer)
    opts = OmegaConf.to_object(_merge(layers, root))
    return _checked(opts, layers, check)  # type: ignore[return-value]


def _non_finite(value: Any, key: str) -> str | None:
    """The dotted key of the first NaN/inf float inside ``value``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        bad = _non_finite(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}")
        if bad:
            return bad
    return None


def _check_field(key: str, value: Any, meta: Any) -> None:
    """Finiteness, choices and the min/max of one field's metadata."""
    bad = _non_finite(value, key)
    if bad:
        raise FieldError(key, f"expected a finite number, got {value!r}" if bad == key
                         else f"expected finite numbers, got {value!r} (at {bad})")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)) and ("min" in meta or "max" in meta):
        for item in value:  # a bound on a list of numbers bounds every element
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                try:
                    _check_field(key, item, meta)
                except FieldError as err:
                    raise FieldError(key, f"{err.problem} (in {list(value)})") from None
        return
    if "choices" in meta and value not in meta["choices"]:
        raise FieldError(key, f"expected one of {', '.join(meta['choices'])}, got {value!r}")
    if "min" in meta and isinstance(value, (int, float)) and value < meta["min"]:
        raise FieldError(key, f"expected a value >= {meta['min']}, got {value!r}")
    if "max" in meta and isinstance(value, (int, float)) and value > meta["max"]:
        raise FieldError(key, f"expected a value <= {meta['max']}, got {value!r}")


def _check_rules(cfg: Config) -> None:
    """Rules that span fields or need more than a min/max."""
    r, s = cfg.reward, cfg.sampling
    if not r.names:
        raise FieldError("reward.names", "expected at least one reward name")
    if r.weights and len(r.weights) != len(r.names):
        raise FieldError("reward.weights", f"expected {len(r.names)} weights (one per "
                         f"reward.names entry), got {len(r.weights)}")
    if r.weights and not any(r.weights):
        raise FieldError("reward.weights", f"every weight is 0, so no reward reaches the "
                         f"policy; got {list(r.weights)}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise FieldError("optim.betas", f"expected two numbers in [0, 1), got "
                         f"{list(cfg.optim.betas)}")
    if s.top_p <= 0.0 or s.top_k == 1:
        which = "sampling.top_p" if s.top_p <= 0.0 else "sampling.top_k"
        raise FieldError(which, "keeps only the most likely token, so every sample of a group is "
                         "the same and nothing can be learned; use top_p in (0, 1] and top_k 0 "
                         "or >= 2")
    template = cfg.model.prompt_template
    if template:
        try:
            ok = "{prompt}" in template and template.format(prompt="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise FieldError("model.prompt_template", f"expected a template with {{prompt}} and "
                             f"no other {{...}} fields, got {template!r}")
        mangled = re.search(r"</(\w+)/>", template)
        if mangled:  # a copy of an old docs/config.md, which printed <|User|> as </User/>
            raise FieldError("model.prompt_template", f"{mangled.group(0)!r} is not a Janus role "
                             f"tag; the tags are written with pipes: '<|{mangled.group(1)}|>' "
                             f"(got {template!r})")
    if not 0 <= cfg.run.seed < 2 ** 63:
        raise FieldError("run.seed", f"expected a value in [0, 2**63), got {cfg.run.seed}")
    _check_algo_rules(cfg.algo)
    if cfg.log.eval_suite not in suite_names():
        raise FieldError("log.eval_suite", f"unknown shapes suite {cfg.log.eval_suite!r}; "
                         f"choose from {', '.join(suite_names())}")


def _check_train_rules(cfg: Config) -> None:
    """:func:`_check_rules`, and the rules of a training run (``load_config(train=True)``)."""
    _check_rules(cfg)
    if cfg.optim.warmup_steps > cfg.run.steps:
        raise FieldError("optim.warmup_steps", f"{cfg.optim.warmup_steps} warmup steps are more "
                         f"than the run's run.steps={cfg.run.steps}, so the learning rate would "
                         f"never reach optim.lr; use at most {cfg.run.steps}")
    if cfg.run.mixed_precision == "fp16" and (cfg.run.cpu or not _has_gpu()):
        where = "run.cpu=true" if cfg.run.cpu else "no GPU is visible"
        raise FieldError("run.mixed_precision", f"fp16 needs a GPU ({where}): on the CPU "
                         f"accelerate has no fp16 autocast and would train in fp32 without a "
                         f"word; use bf16 (CPU autocast) or no")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _normalise(cfg: Config) -> None:
    """YAML reads a bare ``off`` as False and a bare ``no`` as False."""
    if str(cfg.algo.entropy_reward) in ("False", "false"):
        cfg.algo.entropy_reward = "off"
    if str(cfg.run.mixed_precision) in ("False", "false"):
        cfg.run.mixed_precision = "no"


def _check_tree(obj: Any, prefix: str) -> None:
    """:func:`_check_field` on every field of a dataclass tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_tree(value, f"{prefix}{f.name}.")
        else:
            _check_field(f"{prefix}{f.name}", value, f.metadata)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check_algo_rules(a: Any) -> None:
    """The peer methods' combinations that have no meaning (docs/algorithm.md §10, §11)."""
    if a.token_select == "gcpo":
        stage = [f"algo.{k}=true" for k in ("reweight", "kl_reweight") if getattr(a, k)]
        if a.partner_set != "fixed":
            stage.append(f"algo.partner_set={a.partner_set}")
        if stage:
            raise FieldError("algo.token_select", f"gcpo (algo.preset=gcpo) selects its own tokens "
                             f"and cannot take STAGE's token weights ({', '.join(stage)}); use "
                             "reweight=false, kl_reweight=false, partner_set=fixed")
    if a.ratio_level == "sequence":
        per_token = [k for k, on in (("algo.reweight", a.reweight),
                                     ("algo.token_select=gcpo", a.token_select == "gcpo")) if on]
        if per_token:
            raise FieldError("algo.ratio_level", f"'sequence' gives every token of a sequence one "
                             f"ratio, so per-token weights ({', '.join(per_token)}) lose their "
                             "meaning; use ratio_level=token or turn them off")


def needs_reference(cfg: Config) -> bool:
    """A reference policy is needed for the KL term, the entropy reward or GCPO's κ."""
    return cfg.algo.beta > 0 or cfg.algo.entropy_reward != "off" or cfg.algo.token_select == "gcpo"

"""Every subcommand's options are one typed dataclass (:mod:`stagerl.config_schema` for ``train``;
``PretrainOptions``, ``StudyOptions``, ``EvalOptions``, ``SampleOptions`` for the others), given in
three ways that merge in this order: an optional YAML file, ``--flags`` (one per field, generated
here from the dataclass and its ``help``), and dotted ``key=value`` overrides. Loading and every
error message are :func:`stagerl.config.load_options`, the same code as ``train``'s config.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Callable

from stagerl.config import load_options
from stagerl.errors import UserError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    """The value a dataclass field takes when not given."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _default_text(f: dataclasses.Field) -> str:
    value = field_default(f)
    if value is None or value == [] or value == "":
        return "none"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def add_option_flags(parser: argparse.ArgumentParser, cls: type,
                     positional: str | None = "options") -> None:
    """One ``--flag`` per field of ``cls`` (fields with ``metadata["cli"] = False`` excepted),
    plus, under ``positional``, ``[options.yaml] [key=value ...]``. A flag's value is kept as
    typed; :func:`stagerl.config.load_options` converts and checks it, so a flag and the same
    ``key=value`` give the same error."""
    if positional:
        parser.add_argument(positional, nargs="*", metavar="FILE.yaml|KEY=VALUE",
                            help="a YAML file of these options, then key=value overrides of "
                                 "them (the flags below are the same fields)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        help_ = f.metadata.get("help", "")
        if "default:" not in help_:
            help_ += f" (default: {_default_text(f)})"
        help_ = help_.replace("%", "%%")  # argparse expands %-formats
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        t = hints[f.name]
        if t is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(t) is list:
            parser.add_argument(flag(f.name), nargs="*" if f.metadata.get("empty_ok") else "+",
                                **kw)
        else:
            parser.add_argument(flag(f.name), **kw)


def split_positional(items: list[str], cls: type,
                     other: Callable[[str], bool] | None = None) -> tuple[str | None, list[str],
                                                                          list[str]]:
    """``[options.yaml] [key=value ...]`` -> (YAML path, overrides, the rest). An item is an
    override when its key names a field of ``cls``; the first ``*.yaml``/``*.yml`` item is the
    file; anything else is refused, unless ``other(item)`` claims it (``sample``'s prompts)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    path, overrides, rest = None, [], []
    for it in items:
        key = it.split("=", 1)[0].split(".", 1)[0].split("[", 1)[0]
        if "=" in it and key in fields:
            overrides.append(it)
        elif path is None and it.endswith((".yaml", ".yml")) and not overrides:
            if not Path(it).is_file():
                raise UserError(f"options file not found: {it}")
            path = it
        elif other is not None and other(it):
            rest.append(it)
        elif "=" in it:
            close = difflib.get_close_matches(key, sorted(fields), n=1, cutoff=0.5)
            hint = f"Did you mean '{close[0]}'?" if close \
                else f"Options: {', '.join(sorted(fields))}"
            raise UserError(f"unknown option '{key}' in {it!r}. {hint}")
        else:
            raise UserError(f"unexpected argument {it!r}: give one options file (.yaml), then "
                            f"key=value overrides")
    return path, overrides, rest


def _split_commas(value: Any) -> Any:
    """A list flag takes space- or comma-separated values: ``--rows a,b`` = ``--rows a b``
    (except fields marked ``raw``, whose items are overrides that may hold commas)."""
    if not isinstance(value, list):
        return value
    return [part for item in value for part in str(item).split(",") if part != ""]


def options_from_args(cls: type, args: argparse.Namespace, items: list[str] | None = None,
                      check: Callable[[Any], None] | None = None,
                      rest_to: str | None = None) -> Any:
    """The command's options from its parsed flags and ``items`` (``[options.yaml] [key=value
    ...]``), loaded and checked like the training config. With ``rest_to``, the other items are
    that list field's values (``sample``'s prompts) instead of an error."""
    path, overrides, rest = split_positional(list(items or []), cls,
                                             other=(lambda item: True) if rest_to else None)
    flags = {f.name: getattr(args, f.name) if f.metadata.get("raw")
             else _split_commas(getattr(args, f.name)) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    labels = {name: flag(name) for name in flags}
    if rest_to and rest:
        flags[rest_to] = rest
    return load_options(cls, path, overrides, flags, labels, check)


def options_help(cls: type) -> list[tuple[str, str, str]]:
    """(field, default, help) for every option of ``cls``, for docs/config.md."""
    return [(f.name, repr(field_default(f)), f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)]

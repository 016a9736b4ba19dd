"""A command line built from a config dataclass: one `--flag` per field, so the dataclass is the one
statement of what a command takes (type, default, help, choices) and the parsed flags build it by
name, never by position.

    @dataclass
    class EvaluateConfig:
        shards: Path = flag(help="pair shard directory")          # no default: a required flag
        split: str = flag("test", choices=("train", "val", "test"))
        progress: bool = True                                     # --progress / --no-progress

    add_config_flags(parser, EvaluateConfig)
    config = EvaluateConfig(**config_values(parser.parse_args(argv), EvaluateConfig))
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence

PARSERS = {int: int, float: float, str: str, Path: Path}


def flag(default: Any = dataclasses.MISSING, help: str | None = None, choices: Sequence | None = None,  # noqa: A002
         nargs: str | None = None):
    """A dataclass field with what its command-line flag says: `x: int = flag(3, "what x is")`;
    `nargs` ("+", "*") lets a tuple field take any number of values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "nargs": nargs})


def add_config_flags(parser: argparse.ArgumentParser, config: type, *, only: Sequence[str] | None = None,
                     skip: Sequence[str] = (), unset: bool = False) -> None:
    """One `--field-name` per field of the dataclass `config` (those named in `only`, in that order;
    none named in `skip`). int, float, str and Path parse as such, `X | None` as X; a bool is
    --name / --no-name; a tuple default takes that many values. A field without a default is a
    required flag. With `unset` every default is None, so the caller can tell which flags were given."""
    hints = typing.get_type_hints(config)
    by_name = {f.name: f for f in dataclasses.fields(config)}
    for name in only if only is not None else list(by_name):
        if name in skip:
            continue
        spec = by_name[name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        required = default is dataclasses.MISSING
        options: dict[str, Any] = {"help": spec.metadata.get("help"), "default": None if unset or required else default}
        if spec.metadata.get("choices") is not None:
            options["choices"] = list(spec.metadata["choices"])
        kind = without_none(hints[name])
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            options.update(type=typing.get_args(kind)[0], nargs=spec.metadata.get("nargs") or len(default))
        else:
            options.update(type=PARSERS[kind], required=required)
        parser.add_argument("--" + name.replace("_", "-"), **options)


def without_none(hint: Any) -> Any:
    """`X | None` -> X; anything else as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def config_values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The parsed flags that are fields of `config`, by name."""
    names = {f.name for f in dataclasses.fields(config)}
    return {name: value for name, value in vars(args).items() if name in names}

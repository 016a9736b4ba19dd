"""A command line built from a config dataclass: one `--flag` per field, so the dataclass is the one
statement of what a command takes (type, default, help, choices, range) and the parsed flags build
it by name, never by position.

    @dataclass
    class EvaluateConfig:
        shards: Path = flag(help="pair shard directory")          # no default: a required flag
        split: str = flag("test", choices=("train", "val", "test"))
        batch_size: int = flag(64, "pairs per batch", min=1)      # checked at parse time
        lr: float = flag(1e-3, above=0)                           # floats are finite unless finite=False
        progress: bool = True                                     # --progress / --no-progress

    add_config_flags(parser, EvaluateConfig)
    config = EvaluateConfig(**config_values(parser.parse_args(argv), EvaluateConfig))

A value out of range is refused where it is parsed, as one UserError naming the flag
(`--batch-size must be >= 1 (got 0)`), so run_cli prints one `error:` line. The same rules check a
whole instance (`check_fields`), for values that did not come through a flag (`--set`, a preset,
a Python caller); a command whose flags are plain argparse uses `checked_type` for the same rule.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from common.errors import UserError

PARSERS = {int: int, float: float, str: str, Path: Path}

# Upper bounds of numbers that cannot work past them, one statement for every command (a flag's
# error names the bound: `--threads must be <= 256 (got 100000)`).
MAX_THREADS = 256           # threads or worker processes per rank: more than any machine here has cores,
                            # and each costs a stack (100,000 loader threads: "terminate called", rc 134)
MAX_BATCH = 4096            # pairs per batch on one rank: 4096 pairs' frames alone are 1.1 GB in fp32, the
                            # model's activations many times that (and DALI's batch size is a 32-bit int)
MAX_SEED = 2**31 - 1        # numpy, ALE and DALI take 32-bit seeds
KIND_WORDS = {int: "an integer", float: "a number"}


def flag(default: Any = dataclasses.MISSING, help: str | None = None, choices: Sequence | None = None, *,  # noqa: A002
         min: float | None = None, max: float | None = None, above: float | None = None,  # noqa: A002
         below: float | None = None, finite: bool = True, nargs: str | None = None):
    """A dataclass field with what its command-line flag says: `x: int = flag(3, "what x is", min=0)`.
    min / max: inclusive bounds; above / below: exclusive ones (a learning rate: above=0; Adam's
    betas: min=0, below=1); finite: a float flag refuses nan and inf unless finite=False. Each
    element of a tuple field is checked; `nargs` ("+", "*") lets a tuple field take any number of values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max,
                                                        "above": above, "below": below, "finite": finite,
                                                        "nargs": nargs})


# ------------------------------------------------------------------------------------ rules
def value_problem(value: Any, rules: Mapping[str, Any]) -> str | None:
    """What is wrong with one value by a field's rules (`flag`'s metadata), or None. A float field
    without rules is still held to being finite: no setting of this project means anything at nan."""
    if value is None or isinstance(value, bool):
        return None
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}"
    if not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and rules.get("finite", True) and not math.isfinite(value):
        return "must be a finite number"
    low, high, above, below = rules.get("min"), rules.get("max"), rules.get("above"), rules.get("below")
    if low is not None and value < low:
        return f"must be >= {low}"
    if above is not None and not value > above:
        return f"must be > {above}"
    if high is not None and value > high:
        return f"must be <= {high}"
    if below is not None and not value < below:
        return f"must be < {below}"
    return None


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def check_value(label: str, value: Any, rules: Mapping[str, Any]) -> None:
    """One UserError `<label> must be ... (got <value>)` when `value` breaks `rules`; each element
    of a tuple or list on its own."""
    for item in value if isinstance(value, (tuple, list)) else (value,):
        problem = value_problem(item, rules)
        if problem:
            raise UserError(f"{label} {problem} (got {item!r})")


def check_fields(config: Any, label: Callable[[str], str] = flag_name, prefix: str = "") -> None:
    """Check every field of the dataclass instance `config` (and of dataclasses inside it) by its
    rules: the same rules a flag is parsed by, for values that came another way. `label` names a
    field in the message (`--max-grids` by default; `lambda name: name` for `--set` fields)."""
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_fields(value, label, prefix)
        elif spec.default is dataclasses.MISSING or value != spec.default:     # a default is no mistake
            check_value(prefix + label(spec.name), value, spec.metadata)


def checked_type(kind: type, label: str, rules: Mapping[str, Any] | None = None,
                 default: Any = None) -> Callable[[str], Any]:
    """An argparse `type=` that parses one value as `kind` and checks it by `rules`; a bad value is
    one UserError naming the flag (argparse's own error would print a usage block as well). The
    field's own default passes unchecked: argparse also runs a string default through `type`, and
    a default is not the user's mistake."""
    rules = rules or {}
    parse = PARSERS[kind]

    def convert(text: str) -> Any:
        if isinstance(default, str) and text == default:
            return parse(text)
        try:
            value = parse(text)
        except ValueError:
            raise UserError(f"{label}: expected {KIND_WORDS.get(kind, kind.__name__)}, got {text!r}") from None
        check_value(label, value, rules)
        return value

    convert.__name__ = kind.__name__          # argparse names the type in its own messages
    return convert


# ------------------------------------------------------------------------------------ flags
def add_config_flags(parser: argparse.ArgumentParser, config: type, *, only: Sequence[str] | None = None,
                     skip: Sequence[str] = (), unset: bool = False) -> None:
    """One `--field-name` per field of the dataclass `config` (those named in `only`, in that order;
    none named in `skip`). int, float, str and Path parse as such, `X | None` as X, each value
    checked by the field's rules (`flag`); a bool is --name / --no-name; a tuple default takes that
    many values. A field without a default is a required flag. With `unset` every default is None,
    so the caller can tell which flags were given."""
    hints = typing.get_type_hints(config)
    by_name = {f.name: f for f in dataclasses.fields(config)}
    for name in only if only is not None else list(by_name):
        if name in skip:
            continue
        spec = by_name[name]
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        required = default is dataclasses.MISSING
        options: dict[str, Any] = {"help": spec.metadata.get("help"), "default": None if unset or required else default}
        kind = without_none(hints[name])
        label = flag_name(name)
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            options.update(type=checked_type(typing.get_args(kind)[0], label, spec.metadata),
                           nargs=spec.metadata.get("nargs") or len(default))
        else:
            options.update(type=checked_type(kind, label, spec.metadata, default), required=required)
        if spec.metadata.get("choices") is not None and kind is not bool:
            # checked by the type, in one line; shown in --help as argparse would
            options["metavar"] = "{" + ",".join(map(str, spec.metadata["choices"])) + "}"
        parser.add_argument(label, **options)


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

"""What a shard manifest must hold, checked on every read (pipeline.shards.load_manifest): the fields
readers use, with their types and ranges, and shard paths that stay inside the shard folder. A
manifest is a user's input like any file, so a bad one is one clear line naming the file and the
field (`splits.train.shards[3].file: ...`), never a KeyError deep in a reader. Fields no reader
uses (rejected frames, warnings, ...) are not checked, so older manifests keep loading.

The checks are small composable functions `check(value, field)` that raise SchemaError.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Callable, Mapping, Sequence

SPLIT_NAMES = ("train", "val", "test")
SHA256 = re.compile(r"[0-9a-f]{64}")
PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")

Check = Callable[[Any, str], None]
MIN_COLOURS, MAX_COLOURS = 2, 64        # pipeline/palette.py: a palette game's few colours
MAX_CODES = 65536                       # codes are stored as uint16 at most


class SchemaError(ValueError):
    """`field` (a dotted path: splits.train.shards[0].file) breaks the schema: `problem` says how."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field or 'the manifest'}: {problem}")
        self.field, self.problem = field, problem


def kind_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), f"a {type(value).__name__}")


def child(field: str, key: str | int) -> str:
    """The path of a field's child: `splits.train`, `shards[3]`; a key that is not a plain name
    (a newline, a dot) is quoted, so the path stays one readable line."""
    if isinstance(key, int):
        return f"{field}[{key}]"
    if not PLAIN_KEY.fullmatch(key):
        return f"{field}[{short(key)}]"
    return f"{field}.{key}" if field else key


# ------------------------------------------------------------------------------------ checks
def obj(required: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    """An object with these fields (others allowed and not checked)."""
    def check(value: Any, field: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(field, f"must be an object, got {kind_name(value)}")
        for key, inner in required.items():
            if key not in value:
                raise SchemaError(child(field, key), "missing")
            inner(value[key], child(field, key))
        for key, inner in (optional or {}).items():
            if key in value:
                inner(value[key], child(field, key))
    return check


def list_of(item: Check) -> Check:
    def check(value: Any, field: str) -> None:
        if not isinstance(value, list):
            raise SchemaError(field, f"must be a list, got {kind_name(value)}")
        for position, element in enumerate(value):
            item(element, child(field, position))
    return check


def keyed(names: Sequence[str], item: Check) -> Check:
    """An object whose keys are some of `names`, each value checked by `item`."""
    def check(value: Any, field: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(field, f"must be an object, got {kind_name(value)}")
        for key, element in value.items():
            if key not in names:
                raise SchemaError(child(field, str(key)), f"unknown (expected one of {', '.join(names)})")
            item(element, child(field, key))
    return check


def integer(low: int = 0, high: int | None = None) -> Check:
    def check(value: Any, field: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(field, f"must be an integer, got {kind_name(value)}")
        if value < low:
            raise SchemaError(field, f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise SchemaError(field, f"must be <= {high}, got {value}")
    return check


def text(value: Any, field: str) -> None:
    if not isinstance(value, str):
        raise SchemaError(field, f"must be a string, got {kind_name(value)}")


def one_of(*choices: Any) -> Check:
    def check(value: Any, field: str) -> None:
        if value not in choices:
            raise SchemaError(field, f"must be one of {', '.join(map(repr, choices))}, got {short(value)}")
    return check


def sha256(value: Any, field: str) -> None:
    if not isinstance(value, str) or not SHA256.fullmatch(value):
        raise SchemaError(field, f"must be a sha256 (64 lower-case hex digits), got {short(value)}")


def inside_folder(value: Any, field: str) -> None:
    """A path relative to the shard folder that stays inside it: no absolute path, no `..`, no
    backslash or NUL (which would name something else on another system or to the OS)."""
    text(value, field)
    parts = PurePosixPath(value).parts
    if (not value or value.startswith("/") or ".." in parts or "\\" in value or "\0" in value
            or parts in ((), (".",))):
        raise SchemaError(field, f"must be a file path inside the shard folder, got {short(value)}")


def short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def shards_sum_to_pairs(split: Any, field: str) -> None:
    """A split's `pairs` is the sum of its shards' (when it states one)."""
    if "pairs" in split and split["pairs"] != sum(shard["pairs"] for shard in split["shards"]):
        raise SchemaError(child(field, "pairs"), f"is {split['pairs']}, but its shards hold "
                                                 f"{sum(shard['pairs'] for shard in split['shards'])}")


def colours(value: Any, field: str) -> None:
    """A palette's colours (pipeline/palette.py): MIN_COLOURS to MAX_COLOURS of them, each [r, g, b],
    integers in 0..255. One colour would draw every frame in it, and thousands would cost gigabytes
    to snap a frame to: neither is a game's palette."""
    list_of(colour)(value, field)
    if not MIN_COLOURS <= len(value) <= MAX_COLOURS:
        raise SchemaError(field, f"must hold {MIN_COLOURS} to {MAX_COLOURS} colours, got {len(value)}")


def colour(value: Any, field: str) -> None:
    if not isinstance(value, list) or len(value) != 3:
        raise SchemaError(field, f"must be a colour [r, g, b], got {short(value)}")
    for position, channel in enumerate(value):
        integer(0)(channel, child(field, position))
        if channel > 255:
            raise SchemaError(child(field, position), f"must be <= 255, got {channel}")


def both(*checks: Check) -> Check:
    def check(value: Any, field: str) -> None:
        for one in checks:
            one(value, field)
    return check


# ------------------------------------------------------------------------------------ schemas
SHARD = obj({"file": inside_folder, "index": inside_folder, "pairs": integer(0), "sha256": sha256},
            {"zstd": obj({"file": inside_folder, "sha256": sha256}, {"bytes": integer(0)})})
SPLIT = both(obj({"shards": list_of(SHARD)}, {"pairs": integer(0), "episodes": list_of(text)}), shards_sum_to_pairs)
COMMON = {"format": text, "splits": keyed(SPLIT_NAMES, SPLIT)}
FRAME = obj({"height": integer(1), "width": integer(1)})
PALETTE = obj({"rgb": colours})
PAIRS_SCHEMA = obj(COMMON, {"frame": FRAME, "palette": PALETTE})
CODE_TYPE = one_of("uint8", "uint16")        # pipeline/latent.code_dtype: codes never wrap
LATENT_SCHEMA = obj(COMMON, {"frame": FRAME, "palette": PALETTE, "code_dtype": CODE_TYPE, "action_dtype": CODE_TYPE,
                             "checkpoint": obj({"sha256": sha256},
                                               {"step": integer(0), "color": one_of("gray", "rgb"),
                                                "context": one_of(0, 1), "codebook_size": integer(2, MAX_CODES),
                                                "action_codes": integer(0, MAX_CODES)})})


def validate(value: Any, schema: Check, field: str = "") -> None:
    """Raise SchemaError naming the first field of `value` (a manifest, or the part of one at
    `field`) that breaks `schema`."""
    schema(value, field)

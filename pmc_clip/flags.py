"""Command-line flags declared on the config dataclasses' fields: one declaration per value.

    batch_size: int = option(128, "--batch-size", "samples per step on each rank", type=int)

`option` makes a dataclass field whose metadata carries its flag, its meaning and its
unit (a field named `*_seconds`, `*_minutes` or `*_bytes` has that unit unless told);
`add_options` adds every such field of a dataclass to a parser, with `--help` showing the
meaning, the unit and the dataclass default; `given_options` reads back the values given
on the command line; `parse_nested` parses a dataclass of such dataclasses (one argument
group each); `check_at_least` raises the ValueError that names a field's flag. Flags
default to None in the parser, so the dataclass stays the one place a default lives, and a
flag not given leaves it in force.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

_FLAG = "pmc_clip.flag"
T = TypeVar("T")


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]  # the first is the one messages name
    help: str
    unit: str | None
    argparse_kwargs: dict[str, Any]


def option(
    default: Any, flag: str, help: str, *, unit: str | None = None, **argparse_kwargs: Any
) -> Any:
    """A dataclass field with its flag (`"--image-dir|--image_dir"`: aliases after `|`).
    `argparse_kwargs` are add_argument's (type, nargs, choices, action)."""
    spec = Flag(tuple(flag.split("|")), help, unit, argparse_kwargs)
    return dataclasses.field(default=default, metadata={_FLAG: spec})


def flag_of(cls: type, name: str) -> str:
    """The flag of `cls`'s field `name`, as error messages name it."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return str(field.metadata[_FLAG].names[0])


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, dest_prefix: str = ""
) -> None:
    """Add a flag for every field of `cls` declared with `option`, in declaration order
    (to a parser or to one of its argument groups)."""
    for field in dataclasses.fields(cls):
        spec: Flag | None = field.metadata.get(_FLAG)
        if spec is None:
            continue
        unit_name = spec.unit or _unit_in_name(field.name)
        unit = f" [{unit_name}]" if unit_name else ""
        default = _shown(field.default, spec.argparse_kwargs.get("action"))
        # argparse formats help with %: a literal percent sign must be doubled.
        text = f"{spec.help}{unit} (default: {default})".replace("%", "%%")
        kwargs = dict(spec.argparse_kwargs)
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", field.name.upper())  # not the prefixed dest
        parser.add_argument(
            *spec.names, dest=dest_prefix + field.name, default=None, help=text, **kwargs
        )


def given_options(args: argparse.Namespace, cls: type, dest_prefix: str = "") -> dict[str, Any]:
    """{field name: value} for the flags of `cls` given on the command line (lists as
    tuples: the dataclasses are frozen and hashable)."""
    values = {}
    for field in dataclasses.fields(cls):
        if _FLAG not in field.metadata:
            continue
        value = getattr(args, dest_prefix + field.name)
        if value is not None:
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return values


def nested_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """A parser for `cls`, a dataclass whose fields are dataclasses of options (one per
    concern): one argument group per field, dests "<field>.<option field>"."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for name, concern in typing.get_type_hints(cls).items():
        add_options(parser.add_argument_group(name), concern, f"{name}.")
    return parser


def parse_nested(cls: type[T], argv: Sequence[str] | None, description: str = "") -> T:
    """Parse the command line into `cls` (see nested_parser): every concern built from
    the flags given, its dataclass defaults for the rest."""
    args = nested_parser(cls, description).parse_args(argv)
    concerns = typing.get_type_hints(cls).items()
    return cls(**{name: c(**given_options(args, c, f"{name}.")) for name, c in concerns})


def check_at_least(config: Any, minimum: int, *names: str) -> None:
    """ValueError naming the flag of the first field of `names` whose value is below
    `minimum` (None: unset, not checked)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ValueError(f"{flag_of(type(config), name)} must be >= {minimum}, got {value}")


def _unit_in_name(name: str) -> str | None:
    """The unit a field's name ends in (house style: `timeout_seconds`, `chunk_bytes`)."""
    suffix = name.rsplit("_", 1)[-1]
    return suffix if suffix in ("seconds", "minutes", "bytes") else None


def _shown(default: Any, action: str | None) -> str:
    """The default as the command line sees it: a switch is off unless given (a
    store_false flag clears a field that defaults to True)."""
    if action in ("store_true", "store_false"):
        return "on" if default is (action == "store_true") else "off"
    if isinstance(default, tuple):
        return " ".join(str(v) for v in default) if default else "none"
    return "none" if default is None else str(default)

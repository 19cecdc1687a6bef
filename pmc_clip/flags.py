"""Command-line flags declared on the config dataclasses' fields: one declaration per value.

    batch_size: int = option(128, "--batch-size", "samples per step on each rank", type=int)

`option` makes a dataclass field whose metadata carries its flag, its meaning and its
unit; `add_options` adds every such field of a dataclass to a parser, with `--help`
showing the meaning, the unit and the dataclass default; `given_options` reads back the
values given on the command line. Flags default to None in the parser, so the dataclass
stays the one place a default lives, and a flag not given leaves it in force.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

_FLAG = "pmc_clip.flag"


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


def add_options(parser: argparse.ArgumentParser, cls: type, dest_prefix: str = "") -> None:
    """Add a flag for every field of `cls` declared with `option`, in declaration order."""
    for field in dataclasses.fields(cls):
        spec: Flag | None = field.metadata.get(_FLAG)
        if spec is None:
            continue
        unit = f" [{spec.unit}]" if spec.unit else ""
        default = _shown(field.default)
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


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return " ".join(str(v) for v in default) if default else "none"
    return "none" if default is None else str(default)

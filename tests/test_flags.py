"""pmc_clip/flags.py: flags declared on dataclass fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from pmc_clip.flags import (
    add_options,
    check_at_least,
    flag_of,
    given_options,
    nested_parser,
    option,
    parse_nested,
)


@dataclass(frozen=True)
class _Config:
    batch_size: int = option(128, "--batch-size", "samples per step on each rank", type=int)
    crop_scale: tuple[float, float] = option(
        (0.5, 1.0),
        "--crop-scale",
        "area kept by the random crop",
        unit="fraction",
        type=float,
        nargs=2,
    )
    image_dir: str | None = option(None, "--image-dir|--image_dir", "figures of a CSV: 100% read")
    resampled: bool = option(
        False, "--dataset-resampled", "draw with replacement", action="store_true"
    )
    timeout_seconds: float = option(60.0, "--timeout-seconds", "a read fails after", type=float)
    local: bool = option(True, "--global", "gather everything", action="store_false")
    internal: int = 3  # no flag

    def __post_init__(self) -> None:
        check_at_least(self, 1, "batch_size")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x")
    add_options(parser, _Config, "data.")
    return parser


def test_given_flags_override_defaults_and_others_keep_them() -> None:
    args = _parser().parse_args(["--crop-scale", "0.3", "0.9", "--image_dir", "figs/"])
    values = given_options(args, _Config, "data.")
    assert values == {"crop_scale": (0.3, 0.9), "image_dir": "figs/"}
    config = _Config(**values)
    assert (config.batch_size, config.resampled, config.internal) == (128, False, 3)
    args = _parser().parse_args(["--dataset-resampled", "--batch-size", "4"])
    assert given_options(args, _Config, "data.") == {"resampled": True, "batch_size": 4}


def test_help_shows_meaning_unit_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE samples per step on each rank (default: 128)" in text
    assert "area kept by the random crop [fraction] (default: 0.5 1.0)" in text
    assert "figures of a CSV: 100% read (default: none)" in text
    assert flag_of(_Config, "image_dir") == "--image-dir"
    with pytest.raises(SystemExit):
        _parser().parse_args(["--internal", "4"])


def test_switches_show_off_and_units_come_from_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dataset-resampled draw with replacement (default: off)" in text
    assert "--global gather everything (default: off)" in text  # store_false of a True field
    assert "a read fails after [seconds] (default: 60.0)" in text
    args = _parser().parse_args(["--global"])
    assert given_options(args, _Config, "data.") == {"local": False}


@dataclass(frozen=True)
class _Log:
    every_n_steps: int = option(10, "--log-every", "between lines", unit="steps", type=int)


@dataclass(frozen=True)
class _Run:
    data: _Config
    log: _Log


def test_nested_dataclasses_parse_one_group_each(capsys: pytest.CaptureFixture[str]) -> None:
    run = parse_nested(_Run, ["--log-every", "5", "--batch-size", "2"])
    assert run == _Run(_Config(batch_size=2), _Log(every_n_steps=5))
    assert parse_nested(_Run, []) == _Run(_Config(), _Log())
    nested_parser(_Run, "Run it.").print_help()
    text = capsys.readouterr().out
    assert "Run it." in text and "\ndata:\n" in text and "\nlog:\n" in text


def test_check_at_least_names_the_flag() -> None:
    with pytest.raises(ValueError, match=r"^--batch-size must be >= 1, got 0$"):
        _Config(batch_size=0)
    check_at_least(_Config(), 128, "batch_size", "image_dir")  # at the minimum; None: unset
    with pytest.raises(ValueError, match=r"^--timeout-seconds must be >= 61, got 60\.0$"):
        check_at_least(_Config(), 61, "batch_size", "timeout_seconds")

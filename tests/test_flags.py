"""pmc_clip/flags.py: flags declared on dataclass fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from pmc_clip.flags import add_options, flag_of, given_options, option


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
    internal: int = 3  # no flag


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

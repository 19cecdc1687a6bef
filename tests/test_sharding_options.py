"""pmc_clip/sharding/options.py and cli.py: every flag lands on its ShardOptions field,
defaults live on the dataclass, and the checks name the flag."""

from __future__ import annotations

import os

import pytest

from pmc_clip.sharding.cli import build_parser, options_from_args
from pmc_clip.sharding.figures import FigureOptions
from pmc_clip.sharding.options import ShardOptions, parse_split_fractions

BASE = ["--input", "in.jsonl", "--images", "img", "--output", "out"]


def _parse(*extra: str) -> ShardOptions:
    return options_from_args(build_parser().parse_args([*BASE, *extra]))


def test_defaults_are_the_dataclass_defaults_but_workers() -> None:
    options = _parse()
    expected = ShardOptions(
        input="in.jsonl",
        images="img",
        output="out",
        workers=len(os.sched_getaffinity(0)),  # the command's default: every usable core
    )
    assert options == expected
    assert options.figure == FigureOptions()


def test_every_flag_reaches_its_field() -> None:
    options = _parse(
        "--prefix", "x", "--csv-img-key", "im", "--csv-caption-key", "cap",
        "--csv-separator", ";", "--split-column", "s", "--article-column", "pm",
        "--split-fractions", "a=0.5,b=0.5", "--shard-size", "5", "--max-shard-bytes", "99",
        "--shuffle", "--seed", "3", "--max-caption-chars", "7", "--strict", "--workers", "0",
        "--upload-max-attempts", "2", "--upload-backoff-seconds", "0.5",
        "--num-parts", "4", "--part", "3", "--resize-max-side", "64", "--jpeg-quality", "80",
        "--max-image-pixels", "100", "--max-image-bytes", "200",
    )  # fmt: skip
    assert options == ShardOptions(
        input="in.jsonl", images="img", output="out", prefix="x", img_key="im",
        caption_key="cap", csv_separator=";", split_column="s", article_column="pm",
        split_fractions=(("a", 0.5), ("b", 0.5)), shard_size=5, max_shard_bytes=99,
        shuffle=True, seed=3, max_caption_chars=7, strict=True, workers=0,
        upload_max_attempts=2, upload_backoff_seconds=0.5, num_parts=4, part=3,
        figure=FigureOptions(64, 80, 100, 200),
    )  # fmt: skip
    assert _parse("--split", "val").split == "val"


def test_help_shows_meaning_unit_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a shard's size [samples] (default: 10000)" in text
    assert "every core this process may use" in text


def test_bad_values_name_their_flag() -> None:
    with pytest.raises(ValueError, match="--split-fractions: expected NAME=FRACTION"):
        parse_split_fractions("train")
    with pytest.raises(ValueError, match="--input and --images are required"):
        options_from_args(build_parser().parse_args(["--output", "o"]))
    for extra, message in [
        (("--shard-size", "0"), "--shard-size must be >= 1"),
        (("--part", "2", "--num-parts", "2"), "--part must be in 0..1"),
        (("--split-fractions", "a=0.5,b=0.4"), "sum to 1"),
        (("--prefix", "a.b"), "--prefix may use only"),
        (("--jpeg-quality", "0"), "--jpeg-quality must be in 1..95"),
    ]:
        with pytest.raises(ValueError, match=message):
            _parse(*extra).validate()


def test_fingerprint_leaves_out_what_does_not_change_the_bytes() -> None:
    one = _parse("--workers", "1", "--part", "0", "--num-parts", "2").fingerprint()
    two = _parse("--workers", "5", "--part", "1", "--num-parts", "2", "--strict").fingerprint()
    assert one == two
    assert one["split_fractions"] == [["train", 0.8], ["valid", 0.1], ["test", 0.1]]
    assert _parse("--seed", "1").fingerprint() != _parse().fingerprint()

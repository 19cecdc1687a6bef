"""pmc_clip.data.decode: one sample's decode, its failures (each a bad sample, counted),
and the generators that seed its crop and mask."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from pmc_clip.data.counters import WorkerCounters
from pmc_clip.data.decode import SampleDecoder, SampleProcessor, position_rng, sample_rng
from pmc_clip.data.shard_runs import SKIPPED_KEY


def _png(size: tuple[int, int] = (20, 12)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "blue").save(out, format="PNG")
    return out.getvalue()


def test_a_good_sample_decodes_to_a_crop_its_caption_and_its_generator() -> None:
    rng = sample_rng(seed=0, epoch=0, key="k")
    sample = {"__key__": "k", "png": _png(), "txt": b"a figure"}
    decoded = SampleProcessor(8, None)(sample, rng)
    assert decoded["key"] == "k" and decoded["caption"] == "a figure"
    assert decoded["image"].shape == (8, 8, 3) and decoded["rng"] is rng


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        ({SKIPPED_KEY: ["two .png members"]}, "two .png members"),
        ({"txt": b"a figure"}, "no image member"),
        ({"png": b""}, "no .txt caption member"),
        ({"png": b"", "txt": b" \n"}, "empty caption"),
        ({"png": b"", "txt": b"\xff"}, "can't decode"),
        ({"png": b"not a png", "txt": b"a figure"}, "cannot identify image"),
    ],
)
def test_a_bad_sample_is_counted_and_warned_about(
    sample: dict[str, object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    counters = WorkerCounters()
    decoder = SampleDecoder(SampleProcessor(8, (0.5, 1.0)), counters)
    with caplog.at_level(logging.WARNING, logger="pmc_clip.data"):
        assert decoder({"__key__": "k", **sample}, np.random.default_rng(0)) is None
    assert (counters.samples_read, counters.samples_bad) == (1, 1)
    assert reason in caplog.text and "'k'" in caplog.text


def test_generators_depend_on_every_part_of_their_seed() -> None:
    def draw(rng: np.random.Generator) -> float:
        return float(rng.random())

    base = draw(position_rng(seed=1, epoch=2, stream=3, position=4))
    assert base == draw(position_rng(seed=1, epoch=2, stream=3, position=4))
    for changed in ({"seed": 9}, {"epoch": 9}, {"stream": 9}, {"position": 9}):
        parts = {"seed": 1, "epoch": 2, "stream": 3, "position": 4} | changed
        assert draw(position_rng(**parts)) != base
    assert draw(sample_rng(seed=0, epoch=0, key="a")) != draw(sample_rng(seed=0, epoch=0, key="b"))

"""One sample's decode: an undecoded sample ({__key__, __url__, ext: bytes}) into a
cropped uint8 image, its caption and its own generator (crop and MLM mask), seeded by
the sample's key (evaluation) or its place in the epoch's order (training).

Only image members (jpg/jpeg/png/webp, opened with PIL restricted to those formats),
`.txt` (strict UTF-8) and `.json` are read; shard content is never unpickled.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pmc_clip import storage, transforms
from pmc_clip.data.counters import RateLimitedWarning, WorkerCounters
from pmc_clip.data.shard_runs import SKIPPED_KEY

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
KEPT_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, "txt", "json"))


def sample_rng(*, seed: int, epoch: int, key: str) -> np.random.Generator:
    """An evaluation sample's generator (its MLM mask), from its key."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, int.from_bytes(digest, "little")])


def position_rng(*, seed: int, epoch: int, stream: int, position: int) -> np.random.Generator:
    """A training sample's generator (crop, MLM mask), from its place in the epoch's order
    (sample_order): the same whatever the world size, and a resampled sample drawn twice
    gets two crops."""
    return np.random.default_rng([seed, epoch, stream, position])


@dataclass(frozen=True)
class SampleProcessor:
    """Undecoded sample -> {key, image uint8 [H, W, 3], caption, rng}; raises if bad.

    The caption is tokenized per batch (`BatchBuilder`), with the sample's own generator
    (after the crop's draws), so masks are those of a per-sample tokenizer call."""

    image_size: int
    crop_scale: tuple[float, float] | None  # None: eval transform (centre crop)
    eval_preprocess: str = "fast"  # the eval transform's (transforms.eval_transform)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        key = sample["__key__"]
        if SKIPPED_KEY in sample:
            raise ValueError("; ".join(sample[SKIPPED_KEY]))
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            raise ValueError("no image member")
        if "txt" not in sample:
            raise ValueError("no .txt caption member")
        caption = sample["txt"].decode("utf-8")  # strict: a non-UTF-8 caption is bad
        if not caption.strip():
            raise ValueError("empty caption")  # nothing to contrast the image with
        with Image.open(io.BytesIO(sample[image_ext]), formats=PIL_FORMATS) as image:
            if self.crop_scale is None:
                pixels = transforms.eval_transform(image, self.image_size, self.eval_preprocess)
            else:
                pixels = transforms.train_transform(image, self.image_size, self.crop_scale, rng)
        return {"key": key, "image": pixels, "caption": caption, "rng": rng}


class SampleDecoder:
    """Runs a SampleProcessor on one sample; a bad sample is counted, warned about (rate
    limited) and comes back as None."""

    def __init__(self, processor: SampleProcessor, counters: WorkerCounters) -> None:
        self.processor, self.counters = processor, counters
        self.warn = RateLimitedWarning("bad sample")

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        self.counters.samples_read += 1
        try:
            return self.processor(sample, rng)
        except Exception as exc:  # any decode failure: PIL, UTF-8, truncation, bombs
            self.counters.samples_bad += 1
            url = storage.redact_url(str(sample.get("__url__", "?")))
            self.warn(f"{sample.get('__key__')!r} in {url}: {type(exc).__name__}: {exc}")
            return None

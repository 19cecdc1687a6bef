"""make_shards' options: `ShardOptions`, its checks, what of it decides the output bytes
(`fingerprint`), and where a run (or a part) writes. Each field that has a flag declares
it here (`pmc_clip.flags.option`); the command line is pmc_clip/sharding/cli.py."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from pmc_clip import storage
from pmc_clip.flags import option
from pmc_clip.sharding.figures import FigureOptions
from pmc_clip.sharding.format import PROGRESS_DIR, part_folder
from pmc_clip.sharding.store import upload_retry_policy

# Shard and split names: letters, digits, '_' and '-' (a key, a file name, a brace pattern).
NAME_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")
# Part numbers are written with 5 digits (`part00042`).
_MAX_PARTS = 100_000


@dataclass(frozen=True)
class ShardOptions:
    # The three locations have no default and are flags of the CLI itself (--merge needs
    # only --output): pmc_clip/sharding/cli.py.
    input: str
    images: str
    output: str
    prefix: str = option("pmc-oa", "--prefix", "shard names: PREFIX-SPLIT-NNNNNN.tar")
    img_key: str = option("image", "--csv-img-key", "the input's column of image paths")
    caption_key: str = option("caption", "--csv-caption-key", "the input's column of captions")
    csv_separator: str = option(",", "--csv-separator", "the field separator of a CSV input")
    split: str | None = option(None, "--split", "put every row in this split")
    split_column: str = option(
        "split", "--split-column", "the column naming each row's split; used when the input has it"
    )
    article_column: str = option(
        "pmcid",
        "--article-column",
        "the column naming each row's article (else the figure name's prefix): "
        "an article's rows share one split",
    )
    # The flag's text (NAME=FRACTION,...) is parsed by the CLI (parse_split_fractions).
    split_fractions: tuple[tuple[str, float], ...] = option(
        (("train", 0.8), ("valid", 0.1), ("test", 0.1)),
        "--split-fractions",
        "NAME=FRACTION[,NAME=FRACTION...]: the share of articles in each split",
    )
    shard_size: int = option(10_000, "--shard-size", "a shard's size", unit="samples", type=int)
    max_shard_bytes: int = option(
        1 << 30, "--max-shard-bytes", "a shard closes before it would pass this", unit="bytes",
        type=int,
    )  # fmt: skip
    shuffle: bool = option(
        False, "--shuffle", "shuffle rows within each split", action="store_true"
    )
    seed: int = option(0, "--seed", "the seed of --shuffle", type=int)
    max_caption_chars: int = option(
        100_000, "--max-caption-chars", "longer captions are skipped rows", unit="characters",
        type=int,
    )  # fmt: skip
    figure: FigureOptions = field(default_factory=FigureOptions)
    # No flag here: the CLI's default (every usable core) is not the library's (0: in
    # this process): pmc_clip/sharding/cli.py.
    workers: int = 0
    strict: bool = option(False, "--strict", "stop at the first bad row", action="store_true")
    upload_max_attempts: int = option(
        8,
        "--upload-max-attempts",
        "tries of each call on an object-store --output before the run stops",
        type=int,
    )
    upload_backoff_seconds: float = option(
        1.0,
        "--upload-backoff-seconds",
        "first wait between tries; doubles each time (jittered, at most 60 s)",
        unit="seconds",
        type=float,
    )
    # Scale-out: the input's articles are dealt to `num_parts` parts (`part_for`); this run
    # writes part `part`'s shards (`PREFIX-SPLIT-partIIIII-NNNNNN.tar`) and its summary,
    # and `make_shards --merge` (pmc_clip/sharding/merge.py) writes the global manifest.
    num_parts: int = option(
        1,
        "--num-parts",
        "split the work into this many parts, by article, one run each (a SLURM array: "
        "launch/make_shards_array.sh); then --merge",
        type=int,
    )
    part: int = option(
        0,
        "--part",
        "which part this run writes, 0..NUM_PARTS-1 (resumable per part)",
        type=int,
    )

    @property
    def is_part(self) -> bool:
        return self.num_parts > 1

    def shard_stem(self, split: str) -> str:
        """Shard names without the index: `PREFIX-SPLIT`, or `PREFIX-SPLIT-partIIIII` for a
        part, so parts writing into one folder never collide."""
        return f"{self.prefix}-{split}" + (f"-part{self.part:05d}" if self.is_part else "")

    def progress_folder(self, out_root: str) -> str:
        """Where this run's progress records and lock live: one folder per part, so parts
        run side by side, each resuming on its own."""
        if self.is_part:
            return part_folder(out_root, self.part)
        return storage.join(out_root, PROGRESS_DIR)

    def retry_policy(self) -> storage.RetryPolicy:
        return upload_retry_policy(self.upload_max_attempts, self.upload_backoff_seconds)

    def validate(self) -> None:
        storage.refuse_url_credentials("--input", self.input)
        storage.refuse_url_credentials("--images", self.images)
        storage.refuse_url_credentials("--output", self.output, written=True)
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1 sample, got {self.shard_size}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"--max-shard-bytes must be >= 1, got {self.max_shard_bytes}")
        if not 1 <= self.num_parts <= _MAX_PARTS:
            raise ValueError(f"--num-parts must be in 1..{_MAX_PARTS}, got {self.num_parts}")
        if not 0 <= self.part < self.num_parts:
            raise ValueError(
                f"--part must be in 0..{self.num_parts - 1} (--num-parts {self.num_parts}), "
                f"got {self.part}"
            )
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 = in this process), got {self.workers}")
        if not NAME_SAFE.match(self.prefix):
            raise ValueError(f"--prefix may use only letters, digits, '_' and '-': {self.prefix!r}")
        names = [name for name, _ in self.split_fractions]
        for name in [*names, *([self.split] if self.split else [])]:
            if not NAME_SAFE.match(name):
                raise ValueError(f"split name {name!r}: use only letters, digits, '_' and '-'")
        if len(set(names)) != len(names):
            raise ValueError(f"--split-fractions names a split twice: {names}")
        fractions = [f for _, f in self.split_fractions]
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"--split-fractions must be >= 0 and sum to 1, got {fractions}")
        quality = self.figure.jpeg_quality
        if not 1 <= quality <= 95:
            raise ValueError(f"--jpeg-quality must be in 1..95, got {quality}")
        if self.figure.resize_max_side is not None and self.figure.resize_max_side < 1:
            raise ValueError("--resize-max-side must be >= 1 pixel")
        if self.max_caption_chars < 1:
            raise ValueError("--max-caption-chars must be >= 1")
        self.retry_policy().validate("--upload-max-attempts")

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide the output bytes, redacted, for resume checks and the
        manifest. Worker count, strictness and retries do not change a finished shard; every
        part of one output shares these (the part number only picks its rows)."""
        out = dataclasses.asdict(self)
        for name in ("workers", "strict", "upload_max_attempts", "upload_backoff_seconds", "part"):
            out.pop(name)
        for name in ("input", "images", "output"):
            out[name] = storage.redact_url(out[name])
        out["split_fractions"] = [list(pair) for pair in self.split_fractions]
        return out


def parse_split_fractions(text: str) -> tuple[tuple[str, float], ...]:
    """'train=0.8,valid=0.1,test=0.1' -> (('train', 0.8), ...)."""
    pairs = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((name.strip(), float(value)))
        except ValueError:
            raise ValueError(
                f"--split-fractions: expected NAME=FRACTION[,NAME=FRACTION...], got {text!r}"
            ) from None
    return tuple(pairs)

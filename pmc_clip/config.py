"""Run configuration: one frozen dataclass per concern, parsed once at the CLI edge.

Each dataclass validates itself in `__post_init__` (ValueError naming the flag), so a bad
value fails at start-up, never in a data-loader worker an hour into a run.
"""

from __future__ import annotations

from dataclasses import dataclass

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how the loader streams them (issue 4).

    Shard specs: brace-expanded patterns, several sources joined with `::`, each a local
    path, `s3://` (or any fsspec) URL, or `pipe:` command, e.g.
    `s3://bucket/pmc-oa/pmc-oa-train-{000000..000164}.tar::/data/roco-{0000..0009}.tar`.
    """

    train_data: str | None = None
    val_data: str | None = None
    # One weight per `::` source of train_data (shard draw probability multiplier);
    # only meaningful with dataset_resampled. None: all 1.
    train_data_upsampling_factors: tuple[float, ...] | None = None
    # Override the sample count read from sizes.json / manifest.json (required where a
    # source has no manifest, e.g. a `pipe:` source).
    train_num_samples: int | None = None
    val_num_samples: int | None = None
    dataset_resampled: bool = False
    batch_size: int = 128  # per rank
    val_batch_size: int | None = None  # None: batch_size
    num_workers: int = 8  # data-loader worker processes per rank
    prefetch_factor: int = 4  # batches in flight per worker
    pin_memory: bool = True
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop area fraction (paper: 0.5)
    # Shuffle buffer of undecoded samples per worker (memory: ~this many encoded figures).
    shuffle_buffer_samples: int = 2_000
    shuffle_initial_samples: int = 500
    # Streaming reads of fsspec shards: range requests of this size, one prefetched ahead.
    read_chunk_bytes: int = 16 * 1024 * 1024
    read_max_attempts: int = 6  # per request, then the shard is skipped with a warning
    read_backoff_seconds: float = 0.5  # first retry delay; doubles, with jitter
    read_backoff_max_seconds: float = 30.0
    read_timeout_seconds: float = 60.0  # a stalled connection counts as a transient error
    # Local folder to copy fsspec shards into before reading them (None: stream them).
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ValueError(f"--val-batch-size must be >= 1, got {self.val_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"--prefetch-factor must be >= 1, got {self.prefetch_factor}")
        if self.image_size < 8:
            raise ValueError(f"--image-size must be >= 8 pixels, got {self.image_size}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {low} {high}")
        for name in ("train_num_samples", "val_num_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.shuffle_buffer_samples < 1 or self.shuffle_initial_samples < 1:
            raise ValueError("--shuffle-buffer-samples and its initial fill must be >= 1")
        if self.read_chunk_bytes < 1024:
            raise ValueError(f"--read-chunk-bytes must be >= 1024, got {self.read_chunk_bytes}")
        if self.read_max_attempts < 1:
            raise ValueError(f"--read-max-attempts must be >= 1, got {self.read_max_attempts}")
        if self.read_backoff_seconds < 0 or self.read_backoff_max_seconds < 0:
            raise ValueError("--read-backoff-seconds must be >= 0")
        if self.read_timeout_seconds <= 0:
            raise ValueError("--read-timeout-seconds must be > 0")
        factors = self.train_data_upsampling_factors
        if factors is not None:
            if any(f <= 0 for f in factors):
                raise ValueError(f"--train-data-upsampling-factors must be > 0, got {factors}")
            if not self.dataset_resampled:
                raise ValueError(
                    "--train-data-upsampling-factors needs --dataset-resampled (without "
                    "resampling every shard is read exactly once per epoch)"
                )
            num_sources = len(self.train_data.split("::")) if self.train_data else 0
            if len(factors) != num_sources:
                raise ValueError(
                    f"--train-data-upsampling-factors has {len(factors)} values for "
                    f"{num_sources} '::'-joined --train-data sources"
                )

    @property
    def eval_batch_size(self) -> int:
        return self.val_batch_size or self.batch_size

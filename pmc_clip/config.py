"""Run configuration: one frozen dataclass per concern, parsed once at the CLI edge.

Each dataclass validates itself in `__post_init__` (ValueError naming the flag), so a bad
value fails at start-up, never in a data-loader worker an hour into a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any

from pmc_clip.storage import argument_secrets, redact_url, refuse_url_credentials

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Eval preprocessing (--eval-preprocess): ours, or the original's for its published numbers.
EVAL_PREPROCESS_CHOICES = ("fast", "original")


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
    # Eval centre crop: "fast" (ours) or "original" (the original PMC-CLIP's torchvision
    # steps, full decode: to reproduce its published numbers); see pmc_clip/transforms.py.
    eval_preprocess: str = "fast"
    # Training sample order (pmc_clip/sample_order.py): runs of this many consecutive
    # samples of a shard are shuffled every epoch; a run is one range request. None:
    # 1 (every sample on its own) for local shards or with cache_dir, where a run is a
    # seek; 32 for shards streamed from object storage, where it is a request.
    span_samples: int | None = None
    # Canonical nodes of the sample order; None: this run's node count (world size /
    # ranks per node). The order of an epoch depends on it, never on the world size.
    num_canonical_nodes: int | None = None
    # Reads of fsspec shards: range requests of at most this size, fetched ahead.
    read_chunk_bytes: int = 16 * 1024 * 1024
    # Per request; then a val shard is skipped, a train run's samples substituted (warned).
    read_max_attempts: int = 6
    read_backoff_seconds: float = 0.5  # first retry delay; doubles, with jitter
    read_backoff_max_seconds: float = 30.0
    read_timeout_seconds: float = 60.0  # a stalled connection counts as a transient error
    # Longest wait for a data-loader worker's next batch before the run stops with an
    # error (a stuck worker must not stall a 64-GPU job). Must outlast a run's retries
    # (read_max_attempts x (read_timeout_seconds + read_backoff_max_seconds), ~9 min by
    # default) and, with cache_dir, the first download of a node's shards.
    batch_timeout_seconds: float = 1800.0
    # Node-local folder that keeps a copy of every remote shard the node reads (shared
    # by the node's ranks and workers); None: read remote shards by range requests.
    cache_dir: str | None = None
    cache_limit_bytes: int | None = None  # None: unbounded; else least recently used evicted
    # Largest shard member (image, caption, json) the loader reads; a bigger one makes a
    # bad sample without being read. make_shards' --max-image-bytes default.
    max_member_bytes: int = 64 * 1024 * 1024
    # --val-data may also be a CSV/JSONL table of (image path, caption) rows, as in the
    # original PMC-CLIP: its figures are under image_dir (folder, URL or images.zip).
    image_dir: str | None = None
    csv_img_key: str = "image"
    csv_caption_key: str = "caption"
    csv_separator: str = ","

    def __post_init__(self) -> None:
        for flag, url in (
            ("--train-data", self.train_data),
            ("--val-data", self.val_data),
            ("--image-dir", self.image_dir),
        ):
            refuse_url_credentials(flag, url)
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
        if self.eval_preprocess not in EVAL_PREPROCESS_CHOICES:
            raise ValueError(
                f"--eval-preprocess must be one of {EVAL_PREPROCESS_CHOICES}, "
                f"got {self.eval_preprocess!r}"
            )
        for name in ("train_num_samples", "val_num_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.span_samples is not None and self.span_samples < 1:
            raise ValueError(f"--shuffle-span-samples must be >= 1, got {self.span_samples}")
        if self.num_canonical_nodes is not None and self.num_canonical_nodes < 1:
            raise ValueError(f"--num-canonical-nodes must be >= 1, got {self.num_canonical_nodes}")
        if self.cache_limit_bytes is not None:
            if self.cache_dir is None:
                raise ValueError("--cache-limit-bytes needs --cache-dir")
            if self.cache_limit_bytes < 1:
                raise ValueError(f"--cache-limit-bytes must be >= 1, got {self.cache_limit_bytes}")
        if self.max_member_bytes < 1:
            raise ValueError(f"--max-member-bytes must be >= 1, got {self.max_member_bytes}")
        if self.read_chunk_bytes < 1024:
            raise ValueError(f"--read-chunk-bytes must be >= 1024, got {self.read_chunk_bytes}")
        if self.read_max_attempts < 1:
            raise ValueError(f"--read-max-attempts must be >= 1, got {self.read_max_attempts}")
        if self.read_backoff_seconds < 0 or self.read_backoff_max_seconds < 0:
            raise ValueError("--read-backoff-seconds must be >= 0")
        if self.read_timeout_seconds <= 0:
            raise ValueError("--read-timeout-seconds must be > 0")
        if self.batch_timeout_seconds <= 0:
            raise ValueError("--data-timeout-seconds must be > 0")
        factors = self.train_data_upsampling_factors
        if factors is not None:
            if any(f <= 0 for f in factors):
                raise ValueError(f"--train-data-upsampling-factors must be > 0, got {factors}")
            if not self.dataset_resampled:
                raise ValueError(
                    "--train-data-upsampling-factors needs --dataset-resampled (without "
                    "resampling every sample is read exactly once per epoch)"
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


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # paper recipe
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 500
    min_lr: float = 0.0
    grad_clip_norm: float | None = None  # None: no clipping (the norm is still logged)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--wd must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--beta1/--beta2 must be in [0, 1), got {self.beta1} {self.beta2}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup must be >= 0 steps, got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"--grad-clip-norm must be > 0, got {self.grad_clip_norm}")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build and how to run it (architecture files: pmc_clip/model/configs)."""

    model: str = "RN50_fusion4"
    # Pretrained BERT (hub id or local dir) for the text tower; None: random init.
    text_encoder: str | None = None
    # Tokenizer (hub id or local dir); None: the text encoder's, else PubMedBERT's.
    tokenizer: str | None = None
    mlm: bool = False
    mlm_probability: float = 0.15
    precision: str = "amp_bf16"
    grad_checkpointing: bool = False
    torch_compile: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")


PRECISIONS = ("amp_bf16", "amp", "fp32")


@dataclass(frozen=True)
class LossConfig:
    clip_weight: float = 0.5
    mlm_weight: float = 0.5
    # Each rank computes its B x (B * world) logits against gathered features (with
    # gradient). False: every rank builds the full (B * world)^2 logits.
    local_loss: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    accum_freq: int = 1  # micro-batches per optimizer step
    seed: int = 0
    # Stop (with a checkpoint of the last good state) after this many non-finite steps
    # in a row; isolated ones are skipped and counted.
    max_consecutive_nonfinite: int = 20

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.accum_freq < 1:
            raise ValueError(f"--accum-freq must be >= 1, got {self.accum_freq}")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError("--max-consecutive-nonfinite must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    # Folder or fsspec URL; None: <logs>/<name>/checkpoints.
    checkpoint_dir: str | None = None
    save_frequency: int = 1  # epochs; 0: only at the end
    save_every_n_steps: int = 0  # 0: off
    save_every_minutes: float = 0.0  # 0: off
    keep_last: int = 3  # step checkpoints kept (epoch checkpoints are all kept)
    # None (fresh), "latest" (this run's latest, or fresh if there is none), a path or
    # URL, or "PMC_CLIP:beta" (the released weights from --pmc-clip-beta).
    resume: str | None = None
    pmc_clip_beta: str | None = None  # local path or URL of the released checkpoint.pt

    def __post_init__(self) -> None:
        refuse_url_credentials("--checkpoint-dir", self.checkpoint_dir, written=True)
        refuse_url_credentials("--pmc-clip-beta", self.pmc_clip_beta)
        if self.resume not in (None, "latest", RELEASED_CHECKPOINT):
            refuse_url_credentials("--resume", self.resume)
        if self.save_frequency < 0 or self.save_every_n_steps < 0 or self.save_every_minutes < 0:
            raise ValueError("--save-frequency/--save-every-n-steps/--save-every-minutes >= 0")
        if self.keep_last < 1:
            raise ValueError(f"--keep-last must be >= 1, got {self.keep_last}")
        if self.resume == RELEASED_CHECKPOINT and not self.pmc_clip_beta:
            raise ValueError(
                f"--resume {RELEASED_CHECKPOINT} needs --pmc-clip-beta PATH_OR_URL of the released "
                "checkpoint.pt (no hub download happens at run time)"
            )


RELEASED_CHECKPOINT = "PMC_CLIP:beta"


@dataclass(frozen=True)
class EvalConfig:
    val_frequency: int = 1  # epochs; 0: only at the end
    test_2000: bool = False  # evaluate on 2,000 pairs drawn without replacement
    test_2000_seed: int = 0
    # Image-folder dataset (one folder per class) for zero-shot classification.
    zeroshot_data: str | None = None
    similarity_chunk_size: int = 4096  # queries per similarity block (memory bound)

    def __post_init__(self) -> None:
        if self.val_frequency < 0:
            raise ValueError(f"--val-frequency must be >= 0, got {self.val_frequency}")
        if self.similarity_chunk_size < 1:
            raise ValueError("--similarity-chunk-size must be >= 1")


REPORTERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class LogConfig:
    logs: str = "./logs"
    name: str | None = None  # None: a timestamped name
    report_to: tuple[str, ...] = ("tensorboard",)  # any of REPORTERS
    log_every_n_steps: int = 10
    wandb_project: str = "pmc_clip"

    def __post_init__(self) -> None:
        unknown = set(self.report_to) - set(REPORTERS)
        if unknown:
            raise ValueError(
                f"--report-to accepts {' and '.join(REPORTERS)} (or nothing), got {sorted(unknown)}"
            )
        if "wandb" in self.report_to and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "--report-to wandb needs the wandb package: pip install 'pmc_clip[wandb]'"
            )
        if self.log_every_n_steps < 1:
            raise ValueError(f"--log-every-n-steps must be >= 1, got {self.log_every_n_steps}")


@dataclass(frozen=True)
class DistConfig:
    device: str = "auto"  # auto: CUDA when present
    dist_backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    dist_timeout_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.dist_backend not in (None, "nccl", "gloo"):
            raise ValueError(f"--dist-backend must be nccl or gloo, got {self.dist_backend!r}")
        if self.dist_timeout_seconds <= 0:
            raise ValueError("--dist-timeout-seconds must be > 0")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelSpec
    loss: LossConfig
    optim: OptimConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    log: LogConfig
    dist: DistConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain types, credentials redacted: saved with the run and in checkpoints."""
        return _redacted(dataclasses.asdict(self))


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    if isinstance(value, str):
        redacted = redact_url(value) if "://" in value else value
        # A plain path may carry a secret-looking query too (`--resume x.pt?token=...`).
        for secret in argument_secrets(value):
            redacted = redacted.replace(secret, "REDACTED")
        return redacted
    return value


# --------------------------------------------------------------------------- CLI edge

# Flags: the names PMC-CLIP / OpenCLIP users know, mapped to (concern, field).
_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--train-data", "data", "train_data", {}),
    ("--val-data", "data", "val_data", {}),
    ("--train-data-upsampling-factors", "data", "train_data_upsampling_factors",
     {"type": float, "nargs": "+"}),
    ("--train-num-samples", "data", "train_num_samples", {"type": int}),
    ("--val-num-samples", "data", "val_num_samples", {"type": int}),
    ("--dataset-resampled", "data", "dataset_resampled", {"action": "store_true"}),
    ("--batch-size", "data", "batch_size", {"type": int}),
    ("--val-batch-size", "data", "val_batch_size", {"type": int}),
    ("--workers", "data", "num_workers", {"type": int}),
    ("--crop-scale", "data", "crop_scale", {"type": float, "nargs": 2}),
    ("--eval-preprocess", "data", "eval_preprocess", {"choices": EVAL_PREPROCESS_CHOICES}),
    ("--shuffle-span-samples", "data", "span_samples", {"type": int}),
    ("--num-canonical-nodes", "data", "num_canonical_nodes", {"type": int}),
    ("--cache-dir", "data", "cache_dir", {}),
    ("--cache-limit-bytes", "data", "cache_limit_bytes", {"type": int}),
    ("--max-member-bytes", "data", "max_member_bytes", {"type": int}),
    ("--data-timeout-seconds", "data", "batch_timeout_seconds", {"type": float}),
    ("--image-dir|--image_dir", "data", "image_dir", {}),
    ("--csv-img-key", "data", "csv_img_key", {}),
    ("--csv-caption-key", "data", "csv_caption_key", {}),
    ("--csv-separator", "data", "csv_separator", {}),
    ("--model", "model", "model", {}),
    ("--text-encoder", "model", "text_encoder", {}),
    ("--tokenizer", "model", "tokenizer", {}),
    ("--mlm", "model", "mlm", {"action": "store_true"}),
    ("--mlm-probability", "model", "mlm_probability", {"type": float}),
    ("--precision", "model", "precision", {"choices": PRECISIONS}),
    ("--grad-checkpointing", "model", "grad_checkpointing", {"action": "store_true"}),
    ("--torchcompile", "model", "torch_compile", {"action": "store_true"}),
    ("--channels-last", "model", "channels_last", {"action": "store_true"}),
    ("--clip-loss-weight", "loss", "clip_weight", {"type": float}),
    ("--mlm-loss-weight", "loss", "mlm_weight", {"type": float}),
    ("--global-loss", "loss", "local_loss", {"action": "store_false"}),
    ("--lr", "optim", "lr", {"type": float}),
    ("--wd", "optim", "weight_decay", {"type": float}),
    ("--beta1", "optim", "beta1", {"type": float}),
    ("--beta2", "optim", "beta2", {"type": float}),
    ("--eps", "optim", "eps", {"type": float}),
    ("--warmup", "optim", "warmup_steps", {"type": int}),
    ("--min-lr", "optim", "min_lr", {"type": float}),
    ("--grad-clip-norm", "optim", "grad_clip_norm", {"type": float}),
    ("--epochs", "train", "epochs", {"type": int}),
    ("--accum-freq", "train", "accum_freq", {"type": int}),
    ("--seed", "train", "seed", {"type": int}),
    ("--max-consecutive-nonfinite", "train", "max_consecutive_nonfinite", {"type": int}),
    ("--checkpoint-dir", "checkpoint", "checkpoint_dir", {}),
    ("--save-frequency", "checkpoint", "save_frequency", {"type": int}),
    ("--save-every-n-steps", "checkpoint", "save_every_n_steps", {"type": int}),
    ("--save-every-minutes", "checkpoint", "save_every_minutes", {"type": float}),
    ("--keep-last", "checkpoint", "keep_last", {"type": int}),
    ("--resume", "checkpoint", "resume", {}),
    ("--pmc-clip-beta", "checkpoint", "pmc_clip_beta", {}),
    ("--val-frequency", "eval", "val_frequency", {"type": int}),
    ("--test-2000", "eval", "test_2000", {"action": "store_true"}),
    ("--zeroshot-data", "eval", "zeroshot_data", {}),
    ("--similarity-chunk-size", "eval", "similarity_chunk_size", {"type": int}),
    ("--logs", "log", "logs", {}),
    ("--name", "log", "name", {}),
    ("--report-to", "log", "report_to", {"nargs": "*"}),
    ("--log-every-n-steps", "log", "log_every_n_steps", {"type": int}),
    ("--wandb-project", "log", "wandb_project", {}),
    ("--device", "dist", "device", {"choices": ("auto", "cuda", "cpu")}),
    ("--dist-backend", "dist", "dist_backend", {"choices": ("nccl", "gloo")}),
    ("--dist-timeout-seconds", "dist", "dist_timeout_seconds", {"type": float}),
]  # fmt: skip
_CONCERNS: dict[str, type] = {
    "data": DataConfig, "model": ModelSpec, "loss": LossConfig, "optim": OptimConfig,
    "train": TrainConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig,
    "log": LogConfig, "dist": DistConfig,
}  # fmt: skip


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every flag defaults to None here; the dataclass default applies unless given, so
    the dataclasses are the one place defaults live."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for flag, concern, name, kwargs in _FLAGS:
        default = getattr(_CONCERNS[concern](), name)
        help_text = f"{concern}.{name} (default: {default})"
        parser.add_argument(
            *flag.split("|"), dest=f"{concern}.{name}", default=None, help=help_text, **kwargs
        )
    return parser


def parse_run_config(argv: list[str] | None, description: str = "") -> RunConfig:
    """Parse the command line into a RunConfig. Unknown flags and bad values are a
    ValueError/SystemExit here, at start-up, on every rank alike."""
    args = vars(build_parser(description).parse_args(argv))
    values: dict[str, dict[str, Any]] = {concern: {} for concern in _CONCERNS}
    for _flag, concern, name, _kwargs in _FLAGS:
        value = args[f"{concern}.{name}"]
        if value is None:  # not on the command line: the dataclass default applies
            continue
        if isinstance(value, list):
            value = tuple(value)
        values[concern][name] = value
    return RunConfig(**{c: cls(**values[c]) for c, cls in _CONCERNS.items()})

"""Run configuration: one frozen dataclass per concern, parsed once at the CLI edge.

Every value is declared once, on its field, with its flag, meaning and unit
(pmc_clip/flags.py): `python -m pmc_clip.train --help` lists them with their defaults.
Each dataclass validates itself in `__post_init__` (ValueError naming the flag), so a bad
value fails at start-up, never in a data-loader worker an hour into a run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any

from pmc_clip import storage
from pmc_clip.data import shard_reader
from pmc_clip.flags import check_at_least, flag_of, option, parse_nested

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Eval preprocessing (--eval-preprocess): ours, or the original's for its published numbers.
EVAL_PREPROCESS_CHOICES = ("fast", "original")
PRECISIONS = ("amp_bf16", "amp", "fp32")
RELEASED_CHECKPOINT = "PMC_CLIP:beta"
REPORTERS = ("tensorboard", "wandb")
DEVICES = ("auto", "cuda", "cpu")
DIST_BACKENDS = ("nccl", "gloo")
_TABLE = "of a CSV/JSONL --val-data table"
# The shard reader's defaults (one home: data/shard_reader.py, storage.RetryPolicy) are
# the read flags' defaults.
_READ, _RETRY = shard_reader.ShardReadOptions(), storage.RetryPolicy()


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how the loader streams them (issue 4).

    Shard specs: brace-expanded patterns, several sources joined with `::`, each a local
    path, `s3://` (or any fsspec) URL, or `pipe:` command, e.g.
    `s3://bucket/pmc-oa/pmc-oa-train-{000000..000164}.tar::/data/roco-{0000..0009}.tar`.
    """

    train_data: str | None = option(None, "--train-data", "training shards (specs joined by ::)")
    val_data: str | None = option(
        None, "--val-data", "validation shards, or a CSV/JSONL table of (image path, caption)"
    )
    train_data_upsampling_factors: tuple[float, ...] | None = option(
        None,
        "--train-data-upsampling-factors",
        "shard draw weight of each :: source (with --dataset-resampled); none: all 1",
        type=float,
        nargs="+",
    )
    train_num_samples: int | None = option(
        None, "--train-num-samples", "none: from sizes.json/manifest.json", unit="samples", type=int
    )
    val_num_samples: int | None = option(
        None, "--val-num-samples", "none: from sizes.json/manifest.json", unit="samples", type=int
    )
    dataset_resampled: bool = option(
        False, "--dataset-resampled", "draw shards with replacement", action="store_true"
    )
    batch_size: int = option(128, "--batch-size", "per step on each rank", unit="samples", type=int)
    val_batch_size: int | None = option(
        None, "--val-batch-size", "per rank; none: --batch-size", unit="samples", type=int
    )
    num_workers: int = option(8, "--workers", "data-loader processes per rank", type=int)
    prefetch_factor: int = option(
        4, "--prefetch-factor", "in flight per data-loader worker", unit="batches", type=int
    )
    pin_memory: bool = True
    # The model's input size: its architecture file decides it (no flag); the trainer sets
    # it from the model it built. A loader built without the trainer must be given it.
    image_size: int | None = None
    crop_scale: tuple[float, float] = option(
        (0.5, 1.0), "--crop-scale", "random crop's area", unit="fraction", type=float, nargs=2
    )
    eval_preprocess: str = option(
        "fast",
        "--eval-preprocess",
        "eval centre crop: ours, or the original PMC-CLIP's torchvision steps (full decode: "
        "its published numbers); pmc_clip/transforms.py",
        choices=EVAL_PREPROCESS_CHOICES,
    )
    span_samples: int | None = option(
        None,
        "--shuffle-span-samples",
        "consecutive samples of a shard shuffled as one run, one range request; none: 1 "
        "locally or with --cache-dir (a run is a seek), 32 from object storage",
        unit="samples",
        type=int,
    )
    num_canonical_nodes: int | None = option(
        None,
        "--num-canonical-nodes",
        "the sample order's nodes (it never depends on the world size); none: this run's",
        type=int,
    )
    read_chunk_bytes: int = option(
        _READ.chunk_bytes, "--read-chunk-bytes", "largest range request of a remote shard", type=int
    )
    read_max_attempts: int = option(
        _RETRY.max_attempts,
        "--read-max-attempts",
        "per request; then a val shard is skipped, a train run's samples replaced (warned)",
        type=int,
    )
    read_backoff_seconds: float = option(
        _RETRY.backoff_seconds,
        "--read-backoff-seconds",
        "first retry delay (doubles, with jitter)",
        type=float,
    )
    read_backoff_max_seconds: float = option(
        _RETRY.backoff_max_seconds, "--read-backoff-max-seconds", "longest retry delay", type=float
    )
    read_timeout_seconds: float = option(
        _READ.timeout_seconds, "--read-timeout-seconds", "a stalled request fails after", type=float
    )
    # A stuck worker must not stall a 64-GPU job; the wait must outlast a request's retries
    # (read_max_attempts x (read_timeout_seconds + read_backoff_max_seconds), ~9 min by
    # default) and, with cache_dir, the first download of a node's shards.
    batch_timeout_seconds: float = option(
        1800.0, "--data-timeout-seconds", "longest wait for a worker's next batch", type=float
    )
    cache_dir: str | None = option(
        None, "--cache-dir", "node-local copy of remote shards; none: range requests"
    )
    cache_limit_bytes: int | None = option(
        None, "--cache-limit-bytes", "least recently used shards evicted; none: unbounded", type=int
    )
    max_member_bytes: int = option(
        64 * 1024 * 1024,
        "--max-member-bytes",
        "largest shard member read: a bigger one makes a bad sample, unread",
        type=int,
    )
    image_dir: str | None = option(None, "--image-dir|--image_dir", f"figures {_TABLE}")
    csv_img_key: str = option("image", "--csv-img-key", f"image column {_TABLE}")
    csv_caption_key: str = option("caption", "--csv-caption-key", f"caption column {_TABLE}")
    csv_separator: str = option(",", "--csv-separator", f"column separator {_TABLE}")

    def __post_init__(self) -> None:
        for name in ("train_data", "val_data", "image_dir"):
            storage.refuse_url_credentials(flag_of(DataConfig, name), getattr(self, name))
        check_at_least(self, 1, "batch_size", "val_batch_size")
        check_at_least(self, 0, "num_workers")
        check_at_least(self, 1, "prefetch_factor")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {self.image_size}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {low} {high}")
        if self.eval_preprocess not in EVAL_PREPROCESS_CHOICES:
            raise ValueError(
                f"--eval-preprocess must be one of {EVAL_PREPROCESS_CHOICES}, "
                f"got {self.eval_preprocess!r}"
            )
        names = ("train_num_samples", "val_num_samples", "span_samples", "num_canonical_nodes")
        check_at_least(self, 1, *names)
        if self.cache_limit_bytes is not None:
            if self.cache_dir is None:
                raise ValueError("--cache-limit-bytes needs --cache-dir")
            check_at_least(self, 1, "cache_limit_bytes")
        check_at_least(self, 1, "max_member_bytes")
        check_at_least(self, 1024, "read_chunk_bytes")
        check_at_least(self, 1, "read_max_attempts")
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

    @property
    def loader_image_size(self) -> int:
        """`image_size`, which a loader needs: the model's, set by the trainer."""
        if self.image_size is None:
            raise ValueError(
                "image_size is the model's input size (model.config.image_size): set it in the "
                "DataConfig of a loader built without the trainer"
            )
        return self.image_size


@dataclass(frozen=True)
class OptimConfig:
    lr: float = option(1e-4, "--lr", "peak AdamW learning rate (paper recipe)", type=float)
    weight_decay: float = option(0.1, "--wd", "AdamW weight decay", type=float)
    beta1: float = option(0.9, "--beta1", "AdamW beta1", type=float)
    beta2: float = option(0.98, "--beta2", "AdamW beta2", type=float)
    eps: float = option(1e-6, "--eps", "AdamW epsilon", type=float)
    warmup_steps: int = option(
        500, "--warmup", "linear warmup to --lr, then cosine decay", unit="steps", type=int
    )
    min_lr: float = option(0.0, "--min-lr", "learning rate at the end of the decay", type=float)
    grad_clip_norm: float | None = option(
        None, "--grad-clip-norm", "gradient norm clip; none: off (still logged)", type=float
    )

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

    model: str = option(
        "RN50_fusion4", "--model", "bundled name or JSON file; decides the input image size"
    )
    text_encoder: str | None = option(
        None, "--text-encoder", "pretrained BERT (hub id or local dir); none: random init"
    )
    tokenizer: str | None = option(
        None, "--tokenizer", "hub id or local dir; none: the text encoder's, else PubMedBERT's"
    )
    mlm: bool = option(
        False, "--mlm", "train the masked-language-model head too", action="store_true"
    )
    mlm_probability: float = option(
        0.15, "--mlm-probability", "caption tokens masked", unit="fraction", type=float
    )
    precision: str = option(
        "amp_bf16", "--precision", "amp: fp16 autocast with a grad scaler", choices=PRECISIONS
    )
    grad_checkpointing: bool = option(
        False, "--grad-checkpointing", "recompute activations (less memory)", action="store_true"
    )
    torch_compile: bool = option(
        False, "--torchcompile", "compile the model (torch.compile)", action="store_true"
    )
    channels_last: bool = option(
        False, "--channels-last", "channels-last image tower", action="store_true"
    )

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")


@dataclass(frozen=True)
class LossConfig:
    clip_weight: float = option(
        0.5, "--clip-loss-weight", "contrastive loss weight (paper: 0.5, MLM 0.5)", type=float
    )
    mlm_weight: float = option(0.5, "--mlm-loss-weight", "MLM loss weight (with --mlm)", type=float)
    local_loss: bool = option(
        True,
        "--global-loss",
        "every rank builds all (B * world)^2 logits, not its B x (B * world) against the "
        "gathered features",
        action="store_false",
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(100, "--epochs", "passes over the training data", type=int)
    accum_freq: int = option(1, "--accum-freq", "micro-batches per optimizer step", type=int)
    seed: int = option(0, "--seed", "initial weights, sample order, masks", type=int)
    max_consecutive_nonfinite: int = option(
        20,
        "--max-consecutive-nonfinite",
        "non-finite steps in a row that stop the run, with a checkpoint of the last good state "
        "(isolated ones are skipped and counted)",
        type=int,
    )

    def __post_init__(self) -> None:
        check_at_least(self, 1, "epochs", "accum_freq")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError("--max-consecutive-nonfinite must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    checkpoint_dir: str | None = option(
        None, "--checkpoint-dir", "folder or fsspec URL; none: <logs>/<name>/checkpoints"
    )
    save_frequency: int = option(
        1, "--save-frequency", "between checkpoints; 0: only at the end", unit="epochs", type=int
    )
    save_every_n_steps: int = option(
        0, "--save-every-n-steps", "between step checkpoints; 0: off", unit="steps", type=int
    )
    save_every_minutes: float = option(
        0.0, "--save-every-minutes", "between step checkpoints; 0: off", type=float
    )
    keep_last: int = option(3, "--keep-last", "step checkpoints kept (epoch ones: all)", type=int)
    resume: str | None = option(
        None,
        "--resume",
        "none: fresh; latest: this run's latest (fresh if none); a path or URL; "
        f"{RELEASED_CHECKPOINT}: the released weights from --pmc-clip-beta",
    )
    pmc_clip_beta: str | None = option(
        None, "--pmc-clip-beta", "local path or URL of the released checkpoint.pt"
    )

    def __post_init__(self) -> None:
        storage.refuse_url_credentials("--checkpoint-dir", self.checkpoint_dir, written=True)
        storage.refuse_url_credentials("--pmc-clip-beta", self.pmc_clip_beta)
        if self.resume not in (None, "latest", RELEASED_CHECKPOINT):
            storage.refuse_url_credentials("--resume", self.resume)
        if self.save_frequency < 0 or self.save_every_n_steps < 0 or self.save_every_minutes < 0:
            raise ValueError("--save-frequency/--save-every-n-steps/--save-every-minutes >= 0")
        check_at_least(self, 1, "keep_last")
        if self.resume == RELEASED_CHECKPOINT and not self.pmc_clip_beta:
            raise ValueError(
                f"--resume {RELEASED_CHECKPOINT} needs --pmc-clip-beta PATH_OR_URL of the released "
                "checkpoint.pt (no hub download happens at run time)"
            )


@dataclass(frozen=True)
class EvalConfig:
    val_frequency: int = option(
        1, "--val-frequency", "between evaluations; 0: only at the end", unit="epochs", type=int
    )
    test_2000: bool = option(
        False, "--test-2000", "eval on 2,000 pairs drawn without replacement", action="store_true"
    )
    test_2000_seed: int = 0
    zeroshot_data: str | None = option(
        None, "--zeroshot-data", "image folders (one per class) for zero-shot classification"
    )
    similarity_chunk_size: int = option(
        4096, "--similarity-chunk-size", "queries per block (bounds memory)", type=int
    )

    def __post_init__(self) -> None:
        check_at_least(self, 0, "val_frequency")
        if self.similarity_chunk_size < 1:
            raise ValueError("--similarity-chunk-size must be >= 1")


@dataclass(frozen=True)
class LogConfig:
    logs: str = option("./logs", "--logs", "folder of the run folders")
    name: str | None = option(None, "--name", "run folder; none: a timestamped name")
    report_to: tuple[str, ...] = option(
        ("tensorboard",), "--report-to", f"any of {' '.join(REPORTERS)}, or none", nargs="*"
    )
    log_every_n_steps: int = option(
        10, "--log-every-n-steps", "between metric log lines", unit="steps", type=int
    )
    wandb_project: str = option("pmc_clip", "--wandb-project", "with --report-to wandb")

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
        check_at_least(self, 1, "log_every_n_steps")


@dataclass(frozen=True)
class DistConfig:
    device: str = option("auto", "--device", "auto: CUDA when present", choices=DEVICES)
    dist_backend: str | None = option(
        None, "--dist-backend", "none: nccl on CUDA, gloo on CPU", choices=DIST_BACKENDS
    )
    # A peer that died (kill -9, OOM, lost node) must not leave the others waiting for
    # NCCL's default 30 minutes in a collective.
    dist_timeout_seconds: float = option(
        600.0, "--dist-timeout-seconds", "a collective fails after", type=float
    )

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.dist_backend not in (None, *DIST_BACKENDS):
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
        redacted = storage.redact_url(value) if "://" in value else value
        # A plain path may carry a secret-looking query too (`--resume x.pt?token=...`).
        for secret in storage.argument_secrets(value):
            redacted = redacted.replace(secret, "REDACTED")
        return redacted
    return value


def parse_run_config(argv: list[str] | None, description: str = "") -> RunConfig:
    """Parse the command line into a RunConfig (one argument group per concern). Unknown
    flags and bad values are a ValueError/SystemExit here, at start-up, on every rank alike.
    Flags not given leave the dataclass defaults in force: the one place defaults live."""
    return parse_nested(RunConfig, argv, description)

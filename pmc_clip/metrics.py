"""Where numbers go: a console line, a plain-text log, TensorBoard and Weights & Biases
(rank 0 only).

Other ranks log warnings and errors to stderr only, so a 64-rank job's log reads like a
one-rank job's. Scalars passed here are already averaged over ranks by the caller.

Every entry point installs the secret filter (`install_secret_filter`) first: whatever a
log record says, a credential given on the command line or in the environment comes out
as `***`, a second line of defence behind the redaction of every URL we print.

Training's numbers: a `StepWindow` sums the step losses between two log lines on the
device (no host sync), `train_scalars` turns a window into the logged scalars, and
`RunRecords` writes them (and evaluation results) to the writers and the run folder's
`metrics.jsonl` / `eval.jsonl`. torch is imported where it is used: make_shards logs
through this module and never loads torch.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm import tqdm

from pmc_clip.storage import argument_secrets

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

LOGGER_NAME = "pmc_clip"
MASK = "***"
# Environment variables whose values are credentials: AWS and S3-compatible stores
# (s3fs/botocore), the Hugging Face hub (tokenizer and text-encoder downloads), and Azure
# storage (adlfs). Paths to credential files (GOOGLE_APPLICATION_CREDENTIALS) are no secret.
CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
)
# Shorter values are masked nowhere: no store issues credentials that short (AWS key ids
# have 16+ characters, secrets 40), and masking `?sig=1` would turn every 1 in the log
# into ***.
MIN_SECRET_CHARS = 8


def setup_logging(log_dir: str | None, rank: int) -> logging.Logger:
    """Configure the `pmc_clip` logger: INFO to stderr and `log_dir/out.log` on rank 0,
    WARNING and above (prefixed with the rank) elsewhere."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if rank == 0 and log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(log_dir, "out.log"))
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


class SecretMasker:
    """Replaces every known secret in a text by `MASK`."""

    def __init__(self) -> None:
        self.secrets: list[str] = []

    def add(self, secrets: Sequence[str]) -> None:
        known = set(self.secrets) | {s for s in secrets if len(s) >= MIN_SECRET_CHARS}
        # Longest first: a secret containing another is masked whole.
        self.secrets = sorted(known, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


_masker: SecretMasker | None = None


def install_secret_filter(argv: Sequence[str] | None = None) -> None:
    """Mask, in every log record of this process (any logger, any handler, the message,
    its exception traceback and stack), the credentials of the command line `argv`
    (default sys.argv[1:]: user info and secret-looking query values of its paths and
    URLs) and the values of CREDENTIAL_ENV_VARS. Call it first thing in an entry point's
    main. Installed once per process (as a log record factory, so it also covers loggers
    and handlers created later, and forked data-loader workers); a later call adds its
    argv's secrets. Text printed outside logging goes through `mask_secrets`."""
    global _masker
    if _masker is None:
        _masker = SecretMasker()
        logging.setLogRecordFactory(_masking_factory(logging.getLogRecordFactory(), _masker))
    arguments = sys.argv[1:] if argv is None else argv
    # `--flag=value` carries the value after the first "=".
    values = [a.partition("=")[2] if a.startswith("--") else a for a in arguments]
    _masker.add([s for value in values for s in argument_secrets(value)])
    _masker.add([os.environ[name] for name in CREDENTIAL_ENV_VARS if os.environ.get(name)])


def mask_secrets(text: str) -> str:
    """`text` with every secret the installed filter knows masked (unchanged before
    install_secret_filter is called)."""
    return text if _masker is None else _masker.mask(text)


_EXCEPTION_FORMATTER = logging.Formatter()


def _masking_factory(
    make_record: Callable[..., logging.LogRecord], masker: SecretMasker
) -> Callable[..., logging.LogRecord]:
    def make_masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:
            return record  # a bad format string: the handler reports it as usual
        record.msg, record.args = masker.mask(message), None
        if record.exc_info:
            # Formatted now, masked; formatters reuse exc_text instead of formatting again.
            traceback_text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
            record.exc_text = masker.mask(traceback_text)
        if record.stack_info:
            record.stack_info = masker.mask(record.stack_info)
        return record

    return make_masked_record


# The x-axis of every Weights & Biases chart: the optimizer step, logged as a value rather
# than as wandb's own step counter, so a requeued run that resumes from a checkpoint older
# than its last logged step still has its new points plotted (wandb drops `step=` values
# that go back).
WANDB_STEP_METRIC = "trainer/step"
# In the run directory: the id of its wandb run, so `--resume latest` continues that run.
WANDB_RUN_ID_FILE = "wandb_run_id"


class ScalarWriter:
    """TensorBoard and Weights & Biases scalars on rank 0; a no-op elsewhere or without
    --report-to. `wandb_run`: from start_wandb_run."""

    def __init__(self, tensorboard_dir: str | None, wandb_run: Any = None) -> None:
        self._writer: Any = None
        self._wandb_run = wandb_run
        if tensorboard_dir is not None:
            # Imported only where used: tensorboard pulls in a large dependency tree.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(tensorboard_dir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.log({**scalars, WANDB_STEP_METRIC: step})
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def start_wandb_run(run_dir: str, *, name: str, project: str, config: dict[str, Any]) -> Any:
    """Start (or, when `run_dir` names one, continue) the run's Weights & Biases run.
    `config` must be the redacted RunConfig.to_dict(). wandb's files go under WANDB_DIR,
    else under `run_dir`; WANDB_MODE=offline keeps them local."""
    # The optional extra: LogConfig checked at start-up that it is installed.
    import wandb

    id_path = os.path.join(run_dir, WANDB_RUN_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(8)  # wandb takes any [a-z0-9] id
        os.makedirs(run_dir, exist_ok=True)
        staged = f"{id_path}.tmp-{os.getpid()}"
        with open(staged, "w") as f:
            f.write(run_id + "\n")
        os.replace(staged, id_path)
    run = wandb.init(
        project=project,
        name=name,
        id=run_id,
        resume="allow",
        config=config,
        dir=os.environ.get("WANDB_DIR") or run_dir,
        # No system metadata: it holds the raw command line (sys.argv), where a presigned
        # URL's signature or a URL's user info would reach wandb unmasked.
        settings=wandb.Settings(x_disable_meta=True),
    )
    run.define_metric(WANDB_STEP_METRIC)
    run.define_metric("*", step_metric=WANDB_STEP_METRIC)
    return run


def progress_bar(
    items: Iterable[T], description: str, enabled: bool = True, total: int | None = None
) -> Iterable[T]:
    """`items`, with a tqdm bar on stderr when `enabled` and stderr is a terminal (tqdm's
    disable=None): a batch job's log file gets no bar redrawn thousands of times."""
    return tqdm(items, description, total=total, leave=False, disable=None if enabled else True)


def format_scalars(scalars: dict[str, float]) -> str:
    """'loss 1.2345 | lr 1.00e-04 | ...' for the console line."""
    parts = []
    for name, value in scalars.items():
        short = name.split("/")[-1]
        parts.append(
            f"{short} {value:.3e}" if abs(value) < 1e-2 and value else f"{short} {value:.4g}"
        )
    return " | ".join(parts)


# --------------------------------------------------------------------------- training's numbers

CONSOLE_KEYS = (
    "train/loss",
    "train/contrastive_loss",
    "train/mlm_loss",
    "train/lr",
    "train/logit_scale",
    "perf/samples_per_second",
    "perf/wait_fraction",
)


class StepWindow:
    """Loss sums and counts between two log lines, kept on the device (no host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.num_steps = 0
        self.num_samples = 0
        self.start = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], num_samples: int) -> None:
        """One step's `losses` (detached, on the device) over `num_samples` samples."""
        import torch

        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, torch.zeros((), device=self.device)) + value
        self.num_steps += 1
        self.num_samples += num_samples

    def mean(self, world_size: int) -> dict[str, float]:
        """Mean loss per step over the window and the ranks (a collective)."""
        import torch

        from pmc_clip.distributed import all_reduce_mean

        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names]) / max(self.num_steps, 1)
        averaged = all_reduce_mean(stacked, world_size)
        return dict(zip(names, averaged.tolist(), strict=True))

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: the GPU's allocations, or the CPU process's RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def train_scalars(
    window: StepWindow,
    *,
    means: dict[str, float],
    state: dict[str, float],
    loader_meter: dict[str, float],
    world_size: int,
    device: torch.device,
) -> dict[str, float]:
    """The scalars of one log line: the window's mean losses (`means`, from
    `window.mean`), the trainer's `state` (lr, logit scale, ...: already named
    `train/...`), throughput and memory, and the loader's meter (`data/...` -> `perf/...`)."""
    seconds = window.seconds()
    global_rate = window.num_samples * world_size / seconds
    return {
        **{f"train/{name}": value for name, value in means.items()},
        **state,
        "perf/samples_per_second": global_rate,
        "perf/samples_per_second_per_device": global_rate / world_size,
        "perf/step_seconds": seconds / window.num_steps,
        "perf/memory_gb": memory_gb(device),
        **{f"perf/{k.split('/', 1)[1]}": v for k, v in loader_meter.items()},
    }


class RunRecords:
    """Rank 0's records of a run: scalars to the writers, one JSON line per log line
    (`metrics.jsonl`) and per evaluation (`eval.jsonl`) in the run folder, a console line."""

    def __init__(self, run_dir: str, scalars: ScalarWriter, log: logging.Logger) -> None:
        self.run_dir, self.scalars, self.log = run_dir, scalars, log

    def train(self, scalars: dict[str, float], *, epoch: int, step: int, total_steps: int) -> None:
        self.scalars.write(step, scalars)
        self._append("metrics.jsonl", {"epoch": epoch, "step": step, **scalars})
        self.log.info(
            "epoch %d step %d/%d | %s",
            epoch,
            step,
            total_steps,
            format_scalars({k: scalars[k] for k in CONSOLE_KEYS if k in scalars}),
        )

    def evaluation(self, results: dict[str, float], *, epoch: int, step: int) -> None:
        self.scalars.write(step, {f"val/{k}": v for k, v in results.items()})
        self.log.info("eval at step %d: %s", step, json.dumps(results))
        self._append("eval.jsonl", {"epoch": epoch, "step": step, **results})

    def close(self) -> None:
        self.scalars.close()

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(os.path.join(self.run_dir, name), "a") as f:
            f.write(json.dumps(record) + "\n")

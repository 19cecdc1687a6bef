"""What a data-loader worker counts (shipped to the trainer's process with each batch,
summed there by the loader's meter) and its rate-limited warnings."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from pmc_clip.data import shard_reader

_log = logging.getLogger(__name__)

_WARN_FIRST = 10  # warnings logged per worker and kind before only every _WARN_EVERY-th
_WARN_EVERY = 1000


@dataclass
class WorkerCounters:
    """One worker's counters for one epoch (shipped to the main process with each batch)."""

    worker: int = 0
    samples_read: int = 0
    samples_bad: int = 0
    samples_delivered: int = 0
    # Train: bad or unreadable samples replaced by another of their batch (fill_step).
    samples_substituted: int = 0
    runs_read: int = 0  # train: runs of consecutive samples fetched
    stream_errors: int = 0
    # Samples a shard's manifest count promised but the shard did not hold (a tar cut at
    # a member boundary reads as a shorter, valid archive: only the count shows the loss).
    samples_missing: int = 0
    # Samples a val shard held beyond its manifest count (the manifest is of another version).
    samples_unlisted: int = 0
    # Batch image buffers allocated in shared memory; once the pool is warm only a consumer
    # that keeps batches alive (or more of them than the pool holds) makes this grow.
    batch_buffers_allocated: int = 0
    read: shard_reader.ShardReadCounters = dataclasses.field(
        default_factory=shard_reader.ShardReadCounters
    )

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "read"}
        out |= {f"shard_{k}": v for k, v in self.read.as_dict().items()}
        return out


class RateLimitedWarning:
    """Logs the first _WARN_FIRST warnings of a kind, then every _WARN_EVERY-th."""

    def __init__(self, what: str) -> None:
        self.what, self.count = what, 0

    def __call__(self, message: str) -> None:
        self.count += 1
        if self.count <= _WARN_FIRST or self.count % _WARN_EVERY == 0:
            _log.warning("%s #%d: %s", self.what, self.count, message)

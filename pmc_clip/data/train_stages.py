"""The training stages of one data-loader worker: its steps of the pass, read as runs of
consecutive samples (never a sample before the resume point), decoded, filled to exactly
the batch size.

    worker_step_runs (steps w, w + num_workers, ... of the pass: sample_order)
      -> read_steps (runs of consecutive samples by byte range, read ahead: shard_runs)
      -> decode_step (crop and MLM mask seeded by the sample's place in the order)
      -> fill_step (exactly batch_size) -> (batches: stream)
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from pmc_clip.data.counters import RateLimitedWarning, WorkerCounters
from pmc_clip.data.decode import SampleDecoder, position_rng
from pmc_clip.data.epoch_plan import EpochPlan
from pmc_clip.data.sample_order import EpochOrder, Run
from pmc_clip.data.shard_runs import RunReader, RunResult


def worker_step_runs(
    order: EpochOrder,
    plan: EpochPlan,
    *,
    rank: int,
    consumed: int,
    worker: int,
    num_workers: int,
) -> Iterator[list[Run]]:
    """The runs of this worker's steps of the pass that starts after `consumed` samples:
    the DataLoader takes one batch from each worker in turn, so worker w makes the
    pass's steps w, w + num_workers, ..."""
    for step in range(worker, plan.num_batches_after(consumed), num_workers):
        start = consumed + step * plan.global_batch
        yield order.rank_runs(
            consumed=start, global_batch=plan.global_batch, rank=rank, batch_size=plan.batch_size
        )


def read_steps(
    steps: Iterable[list[Run]], reader: RunReader, counters: WorkerCounters
) -> Iterator[list[RunResult]]:
    """Each step's runs fetched (reading ahead across step boundaries)."""
    runs_per_step: collections.deque[int] = collections.deque()

    def all_runs() -> Iterator[Run]:
        for runs in steps:
            runs_per_step.append(len(runs))
            yield from runs

    results = reader.read_all(all_runs())
    warn = RateLimitedWarning("unreadable run")
    for first in results:
        group = [first, *itertools.islice(results, runs_per_step.popleft() - 1)]
        for result in group:
            counters.runs_read += 1
            if result.error is not None:
                counters.stream_errors += 1
                warn(str(result.error))
        yield group


def decode_step(
    results: list[RunResult], decoder: SampleDecoder, *, seed: int, epoch: int
) -> list[dict[str, Any] | None]:
    """The step's samples in order, None where a sample was bad or its run unreadable."""
    out: list[dict[str, Any] | None] = []
    for result in results:
        run = result.run
        if result.error is not None:
            out += [None] * run.num_samples
            continue
        for offset, sample in enumerate(result.samples):
            rng = position_rng(
                seed=seed, epoch=epoch, stream=run.stream, position=run.position + offset
            )
            out.append(decoder(sample, rng))
    return out


def fill_step(
    samples: list[dict[str, Any] | None], counters: WorkerCounters
) -> list[dict[str, Any]]:
    """Exactly the step's batch size: every rank must hand the same shapes to the
    collectives (a short batch would hang the all-gather). A bad or unreadable sample is
    replaced by another sample of the same batch (counted as samples_substituted); the
    duplicate keeps the batch full at the price of one repeated pair."""
    good = [sample for sample in samples if sample is not None]
    if len(good) == len(samples):
        return good
    if not good:
        raise RuntimeError(
            f"a whole batch of {len(samples)} samples was unreadable or bad: check the "
            "warnings above for the shards and the storage behind them"
        )
    counters.samples_substituted += len(samples) - len(good)
    filled = []
    for i, sample in enumerate(samples):
        filled.append(sample if sample is not None else good[i % len(good)])
    return filled

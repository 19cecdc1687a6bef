"""The loaders the trainer and the evaluator iterate: one rank's stream through a
DataLoader, metered (`ThroughputMeter`), batches unpacked (`batches.unpack_batch`).
`TrainLoader` follows the state_dict contract: `state_dict()` is where the epoch stands,
`load_state_dict()` continues there at this loader's world size and worker count.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from pmc_clip.config import DataConfig
from pmc_clip.data.batches import POOL_SLOTS_BEYOND_PREFETCH, BatchBufferPool, unpack_batch
from pmc_clip.data.epoch_plan import EpochPlan, check_plan, plan_train_epoch
from pmc_clip.data.sources import resolve_dataset, resolve_val_dataset, train_shards
from pmc_clip.data.stream import ShardStream, StreamSpec
from pmc_clip.tokenize import CaptionTokenizer


class ThroughputMeter:
    """Samples/s and time the trainer waited for data, plus the workers' counters.

    The trainer logs `snapshot()` and may `reset()` the window after each log line.
    """

    def __init__(self) -> None:
        self.worker_counters: dict[int, dict[str, int]] = {}
        self.reset()

    def reset(self) -> None:
        self.window_start = time.perf_counter()
        self.num_samples = 0
        self.num_batches = 0
        self.data_wait_seconds = 0.0

    def update(self, num_samples: int, wait_seconds: float, stats: dict[str, int]) -> None:
        self.num_samples += num_samples
        self.num_batches += 1
        self.data_wait_seconds += wait_seconds
        self.worker_counters[stats["worker"]] = stats

    def totals(self) -> dict[str, int]:
        """Worker counters summed over this rank's workers (this epoch)."""
        out: dict[str, int] = {}
        for stats in self.worker_counters.values():
            for name, value in stats.items():
                if name != "worker":
                    out[name] = out.get(name, 0) + value
        return out

    def snapshot(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        return {
            "data/samples_per_second": self.num_samples / elapsed,
            "data/wait_seconds": self.data_wait_seconds,
            "data/wait_fraction": self.data_wait_seconds / elapsed,
            **{f"data/{k}": float(v) for k, v in self.totals().items()},
        }


class _Loader:
    """Iterates one epoch of a rank's stream through a DataLoader and meters it.

    With `persistent_workers` the DataLoader's worker processes (and their pooled image
    buffers, tokenizer, filesystems, shard indexes and warm heaps) serve epoch after
    epoch: starting a worker costs CPU (fork, fresh shared buffers, first-touch page
    faults: bench/RESULTS.md, issue 4 follow-up 4), and at 64 GPUs x 8 workers a
    worker's share of a PMC-OA epoch is only ~3,000 samples. They are kept only after a
    complete pass; a pass the consumer left early (a resume, a stop) takes the DataLoader
    with it, and the next pass starts fresh workers.
    """

    persistent_workers = False

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.meter = ThroughputMeter()
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        # (DataLoader, its workers' buffer pool), kept between complete passes.
        self._dataloader: tuple[DataLoader[dict[str, Any]], BatchBufferPool | None] | None = None

    def _new_dataloader(self) -> tuple[DataLoader[dict[str, Any]], BatchBufferPool | None]:
        config = self.spec.config
        num_workers = config.num_workers
        buffers = (
            BatchBufferPool(
                num_workers=num_workers,
                num_slots=config.prefetch_factor + POOL_SLOTS_BEYOND_PREFETCH,
            )
            if num_workers
            else None
        )
        loader = DataLoader(
            ShardStream(self.spec, buffers, self._position),
            batch_size=None,  # batches are made inside the workers
            num_workers=num_workers,
            pin_memory=config.pin_memory and torch.cuda.is_available(),
            prefetch_factor=config.prefetch_factor if num_workers else None,
            persistent_workers=self.persistent_workers and num_workers > 0,
            # A worker that hangs (a read that never returns) becomes an error in this
            # process instead of a stalled job; without workers there is nothing to wait on.
            timeout=config.batch_timeout_seconds if num_workers else 0,
            # Every random choice in the stream is seeded explicitly; a private generator
            # keeps the DataLoader from drawing its base seed from the global torch RNG,
            # which the trainer restores on resume for dropout (bit-identical resumes).
            generator=torch.Generator(),
        )
        return loader, buffers

    def _batches(self) -> Iterator[dict[str, Any]]:
        self.meter.worker_counters = {}
        # Read by every worker when its pass begins (after iter() below).
        self._position.copy_(torch.tensor([self.spec.epoch, self.spec.consumed]))
        (loader, buffers), self._dataloader = self._dataloader or self._new_dataloader(), None
        iterator = iter(loader)
        while True:
            wait_start = time.perf_counter()
            try:
                # next() blocks while no worker has a batch ready.
                batch, origin = unpack_batch(next(iterator))
            except StopIteration:
                break
            if buffers is not None:
                buffers.release_when_unused(batch["images"], worker=origin.worker, slot=origin.slot)
            self.meter.update(len(batch["keys"]), time.perf_counter() - wait_start, origin.stats)
            yield batch
            # Only the consumer holds it now: its buffer goes back to the pool as soon as
            # the consumer lets go, not when the next batch has arrived.
            del batch
        if self.persistent_workers:
            # A complete pass: every worker ended its part, no batch is in flight, and each
            # delivered one went through release_when_unused. Ready for the next epoch.
            self._dataloader = loader, buffers


class TrainLoader(_Loader):
    """A rank's training loader: `len()` batches per epoch, the same on every rank.

    Resumable: `state_dict()` is a few integers, the epoch, the samples all ranks
    consumed in it, and the sample order's own parameters; `load_state_dict()` continues
    there at this loader's world size and worker count (the rest of the same epoch, no
    sample repeated or lost), reading nothing before that point. Its workers persist from
    one complete epoch to the next.
    """

    persistent_workers = True

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__(spec)
        self._pass_start = spec.consumed

    @property
    def plan(self) -> EpochPlan:
        assert self.spec.plan is not None
        return self.spec.plan

    @property
    def epoch(self) -> int:
        return self.spec.epoch

    @property
    def num_batches(self) -> int:
        """Per whole epoch, for this rank (and every other)."""
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        """Per whole epoch, over all ranks."""
        return self.plan.num_samples

    def __len__(self) -> int:
        """Batches of the current (or next) pass: the whole epoch, or the rest of it after
        a resume or a pass left early."""
        return self.plan.num_batches_after(self._pass_start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        global_batch = self.plan.global_batch
        self._pass_start = self.spec.consumed
        for batch in self._batches():
            # Counted before the consumer sees the batch: a checkpoint taken after its
            # step resumes with the next one.
            self.spec = dataclasses.replace(self.spec, consumed=self.spec.consumed + global_batch)
            yield batch
        assert self.plan.num_batches_after(self.spec.consumed) == 0, (self.spec, self.plan)

    def set_epoch(self, epoch: int) -> None:
        self.spec = dataclasses.replace(self.spec, epoch=epoch, consumed=0)
        self._pass_start = 0

    def state_dict(self) -> dict[str, int]:
        order = self.plan.order
        return {
            "epoch": self.spec.epoch,
            "samples_consumed": self.spec.consumed,
            "seed": order.seed,
            "num_canonical_nodes": order.num_canonical_nodes,
            "span_samples": order.span_samples,
            "resampled": int(order.resampled),
            "samples_per_epoch": order.samples_per_epoch,
            "num_shards": len(self.spec.shards.urls) if self.spec.shards else 0,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch. Its order's own parameters (canonical node count,
        span) are the saved ones; world size, workers, batch size and the cache may differ,
        as long as the global batch stays a multiple of the canonical node count."""
        if "samples_consumed" not in state:
            raise ValueError(
                "this checkpoint's data position predates sample-exact epochs (it counts "
                "batches of the old shard-per-reader order) and cannot be continued mid-epoch; "
                "resume from an end-of-epoch checkpoint"
            )
        mine = self.state_dict()
        changed = [
            f"{name} {state.get(name)} -> {mine[name]}"
            for name in ("seed", "resampled", "samples_per_epoch", "num_shards")
            if state.get(name) != mine[name]
        ]
        if changed:
            raise ValueError(
                "cannot continue the data stream where it stopped: it was saved with other "
                f"data settings ({', '.join(changed)}). Resume with the same --train-data, "
                "--seed and sampling flags, or start the next epoch afresh"
            )
        order = dataclasses.replace(
            self.plan.order,
            num_canonical_nodes=state["num_canonical_nodes"],
            span_samples=state["span_samples"],
        )
        plan = dataclasses.replace(self.plan, order=order)
        check_plan(plan)
        consumed = state["samples_consumed"]
        if not 0 <= consumed <= order.samples_per_epoch or consumed % order.num_canonical_nodes:
            raise ValueError(f"saved position {consumed} is not a position of this epoch")
        if plan != self.plan:
            self._dataloader = None  # persistent workers hold the old plan
        self.spec = dataclasses.replace(
            self.spec, plan=plan, epoch=state["epoch"], consumed=consumed
        )
        self._pass_start = consumed


class EvalLoader(_Loader):
    """Every val sample once across ranks; batch counts may differ between ranks."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches()

    @property
    def num_samples(self) -> int:
        """Samples in the val set (manifest or --val-num-samples), over all ranks."""
        return self.spec.dataset.num_samples

    def rank_num_samples(self) -> int | None:
        """Samples this rank will see (bad samples aside); None without a manifest."""
        spec = self.spec
        sizes = [
            spec.dataset.shard_size(u) for u in spec.dataset.urls[spec.rank :: spec.world_size]
        ]
        return None if any(n is None for n in sizes) else sum(n or 0 for n in sizes)


def build_train_loader(
    config: DataConfig,
    tokenizer: CaptionTokenizer,
    *,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int = 0,
    ranks_per_node: int = 1,
) -> TrainLoader:
    """The training loader of one rank. Reads the manifests (or the shard indexes), checks
    that every shard is indexed and fixes the epoch plan now, so a bad --train-data fails
    at start-up on every rank alike. `ranks_per_node` sets the default canonical node
    count (world_size / ranks_per_node): ranks are numbered node by node."""
    if config.train_data is None:
        raise ValueError("--train-data is required for training")
    _check_rank(rank, world_size)
    # Counts from the manifests (or, without one, the indexes); --train-num-samples is
    # the epoch length of plan_train_epoch, not a shard count.
    dataset = resolve_dataset(
        config.train_data,
        None,
        weights=config.train_data_upsampling_factors,
        need_sizes=False,
    )
    shards = train_shards(dataset, config)
    plan = plan_train_epoch(
        shards, config, world_size=world_size, ranks_per_node=ranks_per_node, seed=seed
    )
    spec = StreamSpec(
        dataset,
        config,
        tokenizer,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        plan=plan,
        shards=shards,
    )
    return TrainLoader(spec)


def build_eval_loader(
    config: DataConfig, tokenizer: CaptionTokenizer, *, rank: int, world_size: int, seed: int = 0
) -> EvalLoader:
    """Every val sample exactly once across ranks (shards split by rank, then worker), in
    a fixed order, centre crops, last batch partial. Ranks may get different batch counts:
    evaluation must not run a collective per batch."""
    if config.val_data is None:
        raise ValueError("--val-data is required for evaluation")
    _check_rank(rank, world_size)
    dataset = resolve_val_dataset(config)
    spec = StreamSpec(dataset, config, tokenizer, rank=rank, world_size=world_size, seed=seed)
    return EvalLoader(spec)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")

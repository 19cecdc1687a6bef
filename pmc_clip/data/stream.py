"""The worker stream: one rank's part of an epoch as an IterableDataset, each data-loader
worker iterating its own share (training: its steps of the pass, `train_stages`;
evaluation: its val shards, `eval_stages`) into packed batches (`batches`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from pmc_clip import storage, transforms
from pmc_clip.config import DataConfig
from pmc_clip.data import shard_reader
from pmc_clip.data.batches import BatchBufferPool, BatchBuilder, BatchOrigin
from pmc_clip.data.counters import WorkerCounters
from pmc_clip.data.decode import KEPT_EXTENSIONS, SampleDecoder, SampleProcessor
from pmc_clip.data.epoch_plan import EpochPlan, TrainShards
from pmc_clip.data.eval_stages import decode_and_transform, read_shards, shard_urls
from pmc_clip.data.sample_order import EpochOrder
from pmc_clip.data.shard_runs import RunReader
from pmc_clip.data.sources import Dataset
from pmc_clip.data.train_stages import decode_step, fill_step, read_steps, worker_step_runs
from pmc_clip.tokenize import CaptionTokenizer


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its part of one epoch (plain, picklable data)."""

    dataset: Dataset
    config: DataConfig
    tokenizer: CaptionTokenizer
    _: KW_ONLY
    rank: int
    world_size: int
    seed: int
    epoch: int = 0
    plan: EpochPlan | None = None  # train only; eval: every sample once, the last batch partial
    shards: TrainShards | None = None  # train only
    consumed: int = 0  # train: samples of the epoch consumed before this pass (all ranks)

    @property
    def train(self) -> bool:
        return self.plan is not None

    @property
    def read_options(self) -> shard_reader.ShardReadOptions:
        c = self.config
        return shard_reader.ShardReadOptions(
            chunk_bytes=c.read_chunk_bytes,
            retry=storage.RetryPolicy(
                max_attempts=c.read_max_attempts,
                backoff_seconds=c.read_backoff_seconds,
                backoff_max_seconds=c.read_backoff_max_seconds,
            ),
            timeout_seconds=c.read_timeout_seconds,
            cache_dir=c.cache_dir,
            cache_limit_bytes=c.cache_limit_bytes,
        )


class ShardStream(IterableDataset):
    """One rank's stream; each DataLoader worker iterates its own part of it."""

    def __init__(
        self,
        spec: StreamSpec,
        buffers: BatchBufferPool | None = None,
        position: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.buffers = buffers  # for DataLoader workers
        # Each reading process makes its own on first use (see ShardFilesystems), and a
        # persistent worker keeps them (and the shard indexes) for its later epochs.
        self.filesystems = shard_reader.ShardFilesystems(spec.read_options)
        self._reader: RunReader | None = None
        self._order: EpochOrder | None = None
        # Shared int64 [epoch, samples consumed], set by the loader before each pass:
        # persistent workers outlive the epoch their copy of `spec` was made for.
        self.position = position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position is not None:
            epoch, consumed = self.position.tolist()
            # This process's copy of the stream (a worker's own, or the loader's with no
            # workers): the rest of the pass reads self.spec.
            self.spec = dataclasses.replace(self.spec, epoch=epoch, consumed=consumed)
        spec = self.spec
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if spec.plan is not None:
            assert num_workers == spec.plan.num_workers, (num_workers, spec.plan)
        counters = WorkerCounters(worker=worker)
        if spec.train:
            samples = self._train_samples(worker, num_workers, counters)
        else:
            samples = self._eval_samples(worker, num_workers, counters)
        if info is not None:
            # One tokenizer thread per worker: the workers already occupy the cores, and a
            # Rust thread pool per worker would oversubscribe them (an explicit setting
            # inherited from the parent wins).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        batch_size = spec.config.batch_size if spec.train else spec.config.eval_batch_size
        image_size = spec.config.loader_image_size

        def new_images() -> tuple[torch.Tensor, int]:
            if info is None or self.buffers is None:
                return transforms.empty_batch(batch_size, image_size), -1
            return self.buffers.acquire(
                worker=worker, batch_size=batch_size, image_size=image_size, counters=counters
            )

        for builder, slot in self._batches(samples, batch_size, new_images):
            counters.samples_delivered += len(builder)
            yield builder.build(BatchOrigin(stats=counters.as_dict(), worker=worker, slot=slot))

    def _batches(
        self,
        samples: Iterable[dict[str, Any]],
        batch_size: int,
        new_images: Callable[[], tuple[torch.Tensor, int]],
    ) -> Iterator[tuple[BatchBuilder, int]]:
        """Full builders, each with its buffer's slot (-1: a one-off buffer)."""
        builder: BatchBuilder | None = None  # a buffer is taken at a batch's first sample
        for sample in samples:
            if builder is None:
                images, slot = new_images()
                builder = BatchBuilder(self.spec.tokenizer, images)
            builder.add(sample)
            if len(builder) == batch_size:
                yield builder, slot
                builder = None
        if builder is not None:
            # Every train step is a whole batch (fill_step): a partial one is a bug.
            assert not self.spec.train, f"partial train batch of {len(builder)}"
            yield builder, slot

    def _train_samples(
        self, worker: int, num_workers: int, counters: WorkerCounters
    ) -> Iterator[dict[str, Any]]:
        """This worker's steps of the pass, batch after batch: the runs of each step are
        read (never a sample before the resume point), decoded, and filled to B."""
        spec = self.spec
        assert spec.plan is not None and spec.shards is not None
        if self._order is None or self._order.epoch != spec.epoch:
            shards = spec.shards
            self._order = EpochOrder(
                shard_sizes=np.asarray(shards.num_samples),
                shard_weights=np.asarray(shards.weights),
                config=spec.plan.order,
                epoch=spec.epoch,
            )
        if self._reader is None:
            self._reader = RunReader(
                spec.shards.urls,
                spec.shards.num_samples,
                self.filesystems,
                counters.read,
                KEPT_EXTENSIONS,
                spec.config.max_member_bytes,
            )
        self._reader.counters = counters.read  # this pass's counters
        decoder = SampleDecoder(
            SampleProcessor(spec.config.loader_image_size, spec.config.crop_scale), counters
        )
        steps = worker_step_runs(
            self._order,
            spec.plan,
            rank=spec.rank,
            consumed=spec.consumed,
            worker=worker,
            num_workers=num_workers,
        )
        for results in read_steps(steps, self._reader, counters):
            samples = decode_step(results, decoder, seed=spec.seed, epoch=spec.epoch)
            yield from fill_step(samples, counters)

    def _eval_samples(
        self, worker: int, num_workers: int, counters: WorkerCounters
    ) -> Iterator[dict[str, Any]]:
        """Every sample of this rank's val shards (split by rank, then worker), in order."""
        spec = self.spec
        # Filesystems are created lazily in this process (s3fs is not fork-safe).
        opener = shard_reader.ShardOpener(self.filesystems, counters.read)
        urls = spec.dataset.urls[spec.rank :: spec.world_size][worker::num_workers]
        processor = SampleProcessor(
            spec.config.loader_image_size, None, spec.config.eval_preprocess
        )
        decoder = SampleDecoder(processor, counters)
        pipeline = wds.DataPipeline(
            shard_urls(urls, opener),
            read_shards(opener, counters, spec.dataset.shard_size, spec.config.max_member_bytes),
            lambda src: decode_and_transform(src, decoder, spec.seed),
        )
        yield from pipeline

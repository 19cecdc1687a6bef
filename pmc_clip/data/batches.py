"""Batching in a data-loader worker, and the one format a batch crosses to the trainer's
process in: `pack_batch` (worker side) and `unpack_batch` (trainer side) are its two
directions.

Batches cross in shared memory. Each worker reuses a small pool of image buffers
(`BatchBufferPool`): a slot goes back to the worker once the trainer's process holds no
tensor on it (or the pin-memory thread has copied it), so a consumer may keep any batch as
long as it likes; keeping many only costs fresh buffers (counted as
`batch_buffers_allocated`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pmc_clip import transforms
from pmc_clip.data.counters import WorkerCounters
from pmc_clip.tokenize import CaptionTokenizer

STATS_KEY = "_stats"  # the worker's counters as of the batch
BUFFER_KEY = "_buffer"  # (worker, pool slot) of the batch's image buffer
# (names, [N, B, L] tensor): the batch's token tensors stacked, so a worker ships one
# shared tensor instead of N (each costs the trainer's process a socket connection to the
# worker for its file descriptor, then an mmap: bench/RESULTS.md, issue 4 follow-up 3);
# unpack_batch makes them views again.
TOKENS_KEY = "_tokens"
# Image buffers per worker beyond its prefetched batches: the batch the trainer holds, the
# one the previous step's variables still hold, and the one being filled.
POOL_SLOTS_BEYOND_PREFETCH = 3


@dataclass(frozen=True, kw_only=True)
class BatchOrigin:
    """What rides along a batch from its worker: the worker's counters, and where its
    image buffer lives."""

    stats: dict[str, int]  # WorkerCounters.as_dict() once the batch was delivered
    worker: int
    slot: int  # in the worker's BatchBufferPool; -1: a one-off buffer


def pack_batch(
    images: torch.Tensor,
    keys: list[str],
    tokens: dict[str, torch.Tensor],
    origin: BatchOrigin,
) -> dict[str, Any]:
    """Worker side: the batch as it crosses to the trainer's process."""
    return {
        "images": images,
        "keys": keys,
        TOKENS_KEY: (list(tokens), torch.stack(list(tokens.values()))),
        STATS_KEY: origin.stats,
        BUFFER_KEY: (origin.worker, origin.slot),
    }


def unpack_batch(packed: dict[str, Any]) -> tuple[dict[str, Any], BatchOrigin]:
    """Trainer side: the batch as the consumer sees it ({images, keys, input_ids,
    attention_mask, ...}: `packed`, changed in place) and where it came from."""
    stats = packed.pop(STATS_KEY)
    worker, slot = packed.pop(BUFFER_KEY)
    names, tokens = packed.pop(TOKENS_KEY)
    packed.update(zip(names, tokens.unbind(0), strict=True))
    return packed, BatchOrigin(stats=stats, worker=worker, slot=slot)


class BatchBuilder:
    """Collects decoded samples into one batch: images, keys and tokens (`pack_batch`).

    Each image is written into the batch's pixel buffer (`images`, uint8 [capacity, 3, H, W])
    as it arrives, so a sample's decoded pixels are freed (and their pages reused by the
    next decode) at once instead of 64 of them living until the batch is stacked: every
    fresh page faults (bench/RESULTS.md, issue 4). In a data-loader worker the buffer is
    shared memory (`BatchBufferPool`), so the batch reaches the trainer's process without
    the copy torch makes of a private tensor. Captions are tokenized (and MLM-masked) in
    one call per batch.
    """

    def __init__(self, tokenizer: CaptionTokenizer, images: torch.Tensor) -> None:
        self.tokenizer = tokenizer
        self.images = images
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.rngs: list[np.random.Generator] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, sample: dict[str, Any]) -> None:
        transforms.write_image(self.images[len(self.keys)], sample["image"])
        self.keys.append(sample["key"])
        self.captions.append(sample["caption"])
        self.rngs.append(sample["rng"])

    def build(self, origin: BatchOrigin) -> dict[str, Any]:
        # A partial (last eval) batch is a view of the first rows: its shared buffer keeps
        # the unused rows, once per eval pass, rather than paying a copy.
        images = self.images[: len(self.keys)]
        tokens = self.tokenizer.batch(self.captions, self.rngs)
        return pack_batch(images, self.keys, tokens, origin)


class BatchBufferPool:
    """Shared-memory image buffers that data-loader workers reuse from batch to batch.

    A fresh shared buffer per batch costs the worker a page fault (and the kernel a zeroed
    page) per 4 KiB, about a tenth of a sample's decode (bench/RESULTS.md, issue 4
    follow-up 2). A worker takes a free slot
    (allocating its buffer on first use); the trainer's process marks the slot free again
    once nothing there holds the batch's images: at once when the pin-memory thread has
    copied them, otherwise when the last tensor on the buffer is garbage-collected (views
    included: a storage lives as long as any tensor on it). A worker with no free slot
    allocates a one-off buffer, so a consumer that keeps batches never blocks a worker and
    never sees its batch overwritten.

    Created in the main process before the workers start; `in_use` is shared memory, the
    buffers are per worker process.
    """

    def __init__(self, *, num_workers: int, num_slots: int) -> None:
        self.in_use = torch.zeros((num_workers, num_slots), dtype=torch.uint8).share_memory_()
        self._buffers: dict[int, torch.Tensor] = {}  # this worker's, by slot

    def acquire(
        self,
        *,
        worker: int,
        batch_size: int,
        image_size: int,
        counters: WorkerCounters,
    ) -> tuple[torch.Tensor, int]:
        """(buffer, slot) in a worker; slot -1 for a one-off buffer."""
        free = [slot for slot, busy in enumerate(self.in_use[worker].tolist()) if not busy]
        # Lowest free slot first: a consumer that lets go promptly keeps few buffers busy.
        slot = free[0] if free else -1
        buffer = self._buffers.get(slot)
        if buffer is None:
            buffer = transforms.empty_batch(batch_size, image_size).share_memory_()
            counters.batch_buffers_allocated += 1
            if slot >= 0:
                self._buffers[slot] = buffer
        assert buffer.shape == (batch_size, 3, image_size, image_size), buffer.shape
        if slot >= 0:
            self.in_use[worker, slot] = 1
        return buffer, slot

    def release_when_unused(self, images: torch.Tensor, *, worker: int, slot: int) -> None:
        """In the trainer's process, for a batch received from `worker`."""
        if slot < 0:
            return
        if images.is_pinned():  # the pin-memory thread's copy; the shared buffer is gone
            self.in_use[worker, slot] = 0
        else:
            release = weakref.finalize(
                images.untyped_storage(), _mark_free, self.in_use, worker=worker, slot=slot
            )
            release.atexit = False  # nothing to hand back once the process exits


def _mark_free(in_use: torch.Tensor, *, worker: int, slot: int) -> None:
    in_use[worker, slot] = 0

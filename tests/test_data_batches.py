"""pmc_clip.data.batches: the worker -> trainer batch format both ways, and the pool of
shared image buffers, without a DataLoader."""

from __future__ import annotations

import gc

import torch

from pmc_clip.data.batches import BatchBufferPool, BatchOrigin, pack_batch, unpack_batch
from pmc_clip.data.counters import WorkerCounters


def test_unpack_gives_back_what_was_packed_with_tokens_as_views() -> None:
    images = torch.zeros((2, 3, 4, 4), dtype=torch.uint8)
    tokens = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "attention_mask": torch.ones(2, 2)}
    origin = BatchOrigin(stats={"worker": 1, "samples_read": 2}, worker=1, slot=0)
    packed = pack_batch(images, ["a", "b"], tokens, origin)
    batch, got = unpack_batch(packed)
    assert got == origin
    assert list(batch) == ["images", "keys", "input_ids", "attention_mask"]
    assert batch["images"] is images and batch["keys"] == ["a", "b"]
    for name, tensor in tokens.items():
        assert torch.equal(batch[name], tensor.to(batch[name].dtype))
    # One stacked tensor crossed: every token tensor is a view of the same storage.
    storages = {batch[name].untyped_storage().data_ptr() for name in tokens}
    assert len(storages) == 1


def test_pool_reuses_a_slot_once_the_consumer_lets_go_and_never_blocks() -> None:
    pool = BatchBufferPool(num_workers=1, num_slots=2)
    counters = WorkerCounters()
    sizes = {"batch_size": 2, "image_size": 4, "counters": counters}
    first, slot_a = pool.acquire(worker=0, **sizes)
    _, slot_b = pool.acquire(worker=0, **sizes)
    one_off, slot_c = pool.acquire(worker=0, **sizes)  # every slot busy: a fresh buffer
    assert (slot_a, slot_b, slot_c) == (0, 1, -1)
    assert counters.batch_buffers_allocated == 3
    # The trainer's process receives its own tensor on the worker's shared buffer.
    received = torch.zeros((2, 3, 4, 4), dtype=torch.uint8)
    pool.release_when_unused(received, worker=0, slot=slot_a)
    held = received[:1]  # a view keeps the storage alive
    del received
    gc.collect()
    assert pool.in_use[0].tolist() == [1, 1]  # the consumer still holds a view
    del held
    gc.collect()
    assert pool.in_use[0].tolist() == [0, 1]
    again, slot = pool.acquire(worker=0, **sizes)
    assert slot == 0 and again is first and counters.batch_buffers_allocated == 3
    pool.release_when_unused(one_off, worker=0, slot=slot_c)  # a one-off: nothing to free
    assert pool.in_use[0].tolist() == [1, 1]

"""The epoch order on its own (pmc_clip/data/sample_order.py): numbers only, no shards read.
The loader tests (test_data.py, test_streaming_s3.py) check the same properties end to end
on real shards."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pmc_clip.data.sample_order import EpochOrder, OrderConfig, Run

# The 8-node ratio at small scale: 512 readers over ~132 shards is ~4 readers a shard and
# a reader's share ~1/4 shard; here 5 shards of unequal sizes for up to 24 readers.
SHARD_SIZES = np.array([40, 13, 70, 7, 30])
TOTAL = int(SHARD_SIZES.sum())


def order(epoch: int = 0, nodes: int = 2, span: int = 4, **kw: object) -> EpochOrder:
    config = OrderConfig(
        seed=kw.pop("seed", 7),  # type: ignore[arg-type]
        num_canonical_nodes=nodes,
        span_samples=span,
        resampled=bool(kw.pop("resampled", False)),
        samples_per_epoch=int(kw.pop("samples_per_epoch", TOTAL)),  # type: ignore[call-overload]
    )
    weights = kw.pop("weights", np.ones(len(SHARD_SIZES)))
    return EpochOrder(
        shard_sizes=SHARD_SIZES, shard_weights=np.asarray(weights), config=config, epoch=epoch
    )


def samples_of(runs: list[Run]) -> list[tuple[int, int]]:
    return [(run.shard, i) for run in runs for i in range(run.first, run.stop)]


def play(
    epoch_order: EpochOrder,
    world_size: int,
    batch_size: int,
    consumed: int = 0,
    steps: int | None = None,
) -> tuple[list[tuple[int, int]], int]:
    """Every rank's batches from `consumed` on: (samples in order, samples consumed after)."""
    global_batch = world_size * batch_size
    num_steps = epoch_order.num_steps(global_batch, consumed=consumed) if steps is None else steps
    seen = []
    for _step in range(num_steps):
        for rank in range(world_size):
            runs = epoch_order.rank_runs(
                consumed=consumed, global_batch=global_batch, rank=rank, batch_size=batch_size
            )
            assert sum(run.num_samples for run in runs) == batch_size
            seen += samples_of(runs)
        consumed += global_batch
    return seen, consumed


@pytest.mark.parametrize(
    ("nodes", "span", "world_size", "batch_size"),
    [(1, 1, 1, 3), (2, 4, 2, 2), (2, 4, 8, 3), (3, 32, 6, 2), (4, 4, 24, 2), (2, 5, 4, 7)],
)
def test_every_sample_once_per_epoch_and_the_remainder_rotates(
    nodes: int, span: int, world_size: int, batch_size: int
) -> None:
    global_batch = world_size * batch_size
    missed: set[tuple[int, int]] = set()
    everything = {(s, i) for s, n in enumerate(SHARD_SIZES) for i in range(n)}
    for epoch in range(3):
        seen, _ = play(order(epoch, nodes, span), world_size, batch_size)
        assert len(seen) == len(set(seen)), "a sample repeated within an epoch"
        assert len(seen) == (TOTAL // global_batch) * global_batch
        left = everything - set(seen)
        assert len(left) == TOTAL % global_batch < global_batch
        missed = left if epoch == 0 else missed & left
    if TOTAL % global_batch:
        assert not missed, "the same samples were left out of every epoch"


def test_orders_differ_by_epoch_and_seed_and_repeat_exactly() -> None:
    first, _ = play(order(0), 2, 4)
    assert first == play(order(0), 2, 4)[0]
    assert first != play(order(1), 2, 4)[0]
    assert first != play(order(0, seed=8), 2, 4)[0]


@pytest.mark.parametrize(("stop_world", "resume_world"), [(4, 2), (4, 3), (2, 6), (6, 4)])
def test_resume_on_another_world_size_continues_the_same_epoch(
    stop_world: int, resume_world: int
) -> None:
    """The consumed set depends only on how many samples were consumed: stop after 5 steps
    at one world size, finish at another, and the epoch is every sample once."""
    nodes, batch_size = 2, 4
    epoch_order = order(0, nodes)
    before, consumed = play(epoch_order, stop_world, batch_size, steps=5)
    after, end = play(epoch_order, resume_world, batch_size, consumed=consumed)
    assert not set(before) & set(after)
    assert len(set(before + after)) == len(before) + len(after) == end
    assert TOTAL - end < resume_world * batch_size  # only a last partial batch waits
    # The samples consumed first are those of any world size: here one rank of batch 2.
    one_rank, _ = play(order(0, nodes), 1, 2, steps=consumed // 2)
    assert set(one_rank) == set(before)


def test_a_node_reads_the_same_shards_every_epoch() -> None:
    """Two nodes x 2 ranks, C = 2: node 0's ranks only ever read the shards of stream 0."""
    shards_by_node: dict[int, set[int]] = collections.defaultdict(set)
    for epoch in range(3):
        epoch_order = order(epoch, nodes=2)
        consumed = 0
        for _ in range(epoch_order.num_steps(16)):
            for rank in range(4):
                runs = epoch_order.rank_runs(
                    consumed=consumed, global_batch=16, rank=rank, batch_size=4
                )
                node = rank // 2
                assert {run.stream for run in runs} == {node}
                shards = {run.shard for run in runs}
                if epoch:
                    assert shards <= shards_by_node[node], "a node read another node's shard"
                shards_by_node[node] |= shards
            consumed += 16
    assert len(shards_by_node[0] & shards_by_node[1]) <= 1  # at most the straddling shard


def test_span_runs_are_contiguous_and_at_most_a_span_long() -> None:
    epoch_order = order(0, nodes=2, span=8)
    runs = epoch_order.rank_runs(consumed=0, global_batch=64, rank=0, batch_size=32)
    assert all(1 <= run.num_samples <= 8 for run in runs)
    assert len(runs) <= 32 // 8 + 1 + 2  # spans cut at shard ends add a few
    assert all(0 <= run.first < run.stop <= SHARD_SIZES[run.shard] for run in runs)


def test_resampled_positions_are_uniform_within_shards_and_follow_the_weights() -> None:
    sizes_in_tens = np.array([40, 10, 70, 20, 30])  # deciles fall on whole samples
    weights = np.array([1.0, 1.0, 3.0, 1.0, 1.0])
    config = OrderConfig(
        seed=3, num_canonical_nodes=2, span_samples=8, resampled=True, samples_per_epoch=400_000
    )
    epoch_order = EpochOrder(
        shard_sizes=sizes_in_tens, shard_weights=weights, config=config, epoch=0
    )
    deciles = np.zeros(10)
    per_shard = np.zeros(5)
    for stream in range(2):
        stream_order = epoch_order.stream(stream)
        for shard, first, length in zip(
            stream_order.shard, stream_order.first, stream_order.length, strict=True
        ):
            positions = np.arange(first, first + length)
            np.add.at(deciles, positions * 10 // sizes_in_tens[shard], 1)
            per_shard[shard] += length
    deciles /= deciles.sum()
    # Every tenth of a shard equally often (the start of a shard included): within 3%.
    assert np.all(np.abs(deciles - 0.1) < 0.003), deciles
    expected = sizes_in_tens * weights / (sizes_in_tens * weights).sum()
    assert np.allclose(per_shard / per_shard.sum(), expected, atol=0.01)


def test_resampled_epochs_are_seeded_and_sample_exact_in_length() -> None:
    a = order(0, resampled=True, samples_per_epoch=100)
    seen, consumed = play(a, 2, 4)
    assert consumed == 96 and len(seen) == 96
    assert seen == play(order(0, resampled=True, samples_per_epoch=100), 2, 4)[0]
    assert seen != play(order(1, resampled=True, samples_per_epoch=100), 2, 4)[0]
    # Elastic resume of a resampled epoch: the draws are the same sequence.
    before, consumed = play(a, 4, 2, steps=3)
    after, _ = play(a, 2, 2, consumed=consumed)
    whole, _ = play(order(0, resampled=True, samples_per_epoch=100), 1, 2)
    assert collections.Counter(before + after) == collections.Counter(whole[: len(before + after)])

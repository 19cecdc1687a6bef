"""pmc_clip.data.train_stages on their own: a worker's steps of a pass, and filling a step
to exactly its batch size."""

from __future__ import annotations

import numpy as np
import pytest

from pmc_clip.data.counters import WorkerCounters
from pmc_clip.data.epoch_plan import EpochPlan
from pmc_clip.data.sample_order import EpochOrder, OrderConfig
from pmc_clip.data.train_stages import fill_step, worker_step_runs


def test_fill_step_replaces_bad_samples_by_others_of_the_batch() -> None:
    counters = WorkerCounters()
    good = [{"key": "a"}, {"key": "b"}]
    assert fill_step(good, counters) == good and counters.samples_substituted == 0
    filled = fill_step([{"key": "a"}, None, {"key": "c"}, None], counters)
    # Slot i gets good[i % len(good)]: the bad slots 1 and 3 both get "c".
    assert [s["key"] for s in filled] == ["a", "c", "c", "c"]
    assert counters.samples_substituted == 2
    with pytest.raises(RuntimeError, match="a whole batch of 2 samples was unreadable"):
        fill_step([None, None], counters)


def test_workers_take_turns_and_together_make_every_step_of_the_pass_once() -> None:
    order_config = OrderConfig(
        seed=0, num_canonical_nodes=1, span_samples=1, resampled=False, samples_per_epoch=40
    )
    plan = EpochPlan(batch_size=4, world_size=2, num_workers=3, order=order_config)
    order = EpochOrder(
        shard_sizes=np.array([25, 15]), shard_weights=np.ones(2), config=order_config, epoch=0
    )
    consumed = 16  # a resume after two steps: 3 of the epoch's 5 steps are left
    for rank in range(2):
        steps = [
            list(
                worker_step_runs(order, plan, rank=rank, consumed=consumed, worker=w, num_workers=3)
            )
            for w in range(3)
        ]
        assert [len(s) for s in steps] == [1, 1, 1]
        expected = [
            order.rank_runs(consumed=consumed + step * 8, global_batch=8, rank=rank, batch_size=4)
            for step in range(3)
        ]
        assert [s[0] for s in steps] == expected

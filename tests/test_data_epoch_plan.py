"""pmc_clip.data.epoch_plan: the plan of a fresh run from the shards' counts and the data
config, and the start-up checks it shares with a resumed one."""

from __future__ import annotations

import pytest

from pmc_clip.config import DataConfig
from pmc_clip.data.epoch_plan import (
    SPAN_SAMPLES_RANDOM_ACCESS,
    SPAN_SAMPLES_STREAMING,
    TrainShards,
    plan_train_epoch,
)

LOCAL = TrainShards(("/d/a.tar", "/d/b.tar"), (30, 20), (1.0, 1.0))
REMOTE = TrainShards(("s3://b/a.tar", "s3://b/b.tar"), (30, 20), (1.0, 3.0))


def config(**overrides: object) -> DataConfig:
    return DataConfig(**({"train_data": "x", "batch_size": 4, "num_workers": 0} | overrides))  # type: ignore[arg-type]


def test_plan_counts_whole_global_batches_and_picks_the_span_by_storage() -> None:
    plan = plan_train_epoch(LOCAL, config(), world_size=4, ranks_per_node=2, seed=5)
    assert (plan.global_batch, plan.num_batches, plan.num_samples) == (16, 3, 48)
    assert plan.num_workers == 1 and plan.num_batches_after(32) == 1
    assert plan.order.num_canonical_nodes == 2 and plan.order.seed == 5
    assert plan.order.span_samples == SPAN_SAMPLES_RANDOM_ACCESS
    remote = plan_train_epoch(REMOTE, config(), world_size=1, ranks_per_node=1, seed=0)
    assert remote.order.span_samples == SPAN_SAMPLES_STREAMING
    cached = plan_train_epoch(
        REMOTE, config(cache_dir="/c"), world_size=1, ranks_per_node=1, seed=0
    )
    assert cached.order.span_samples == SPAN_SAMPLES_RANDOM_ACCESS
    resampled = plan_train_epoch(
        REMOTE, config(dataset_resampled=True), world_size=1, ranks_per_node=1, seed=0
    )
    assert resampled.order.samples_per_epoch == 30 + 3 * 20  # weighted by upsampling


def test_plans_that_cannot_run_are_start_up_errors() -> None:
    with pytest.raises(ValueError, match="world size 3 is not a multiple of 2 per node"):
        plan_train_epoch(LOCAL, config(), world_size=3, ranks_per_node=2, seed=0)
    with pytest.raises(ValueError, match="without --dataset-resampled an epoch is every"):
        plan_train_epoch(
            LOCAL, config(train_num_samples=10), world_size=1, ranks_per_node=1, seed=0
        )
    with pytest.raises(ValueError, match="multiple of the 3 canonical nodes"):
        plan_train_epoch(
            LOCAL, config(num_canonical_nodes=3), world_size=2, ranks_per_node=1, seed=0
        )
    with pytest.raises(ValueError, match="less than one global batch"):
        plan_train_epoch(LOCAL, config(batch_size=64), world_size=1, ranks_per_node=1, seed=0)

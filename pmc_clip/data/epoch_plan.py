"""The epoch plan: how one rank's training batches are cut from the epoch's sample order
(`sample_order`), fixed at start-up from the shards' sample counts and the data config.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmc_clip import storage
from pmc_clip.config import DataConfig
from pmc_clip.data.sample_order import OrderConfig

# Default span of the sample order (--shuffle-span-samples), measured in bench/RESULTS.md:
# where a run is a seek (local or node-cached shards), every sample is placed on its own,
# and a global batch mixes as many articles as it has samples; where a run is a request to
# object storage, 32 consecutive samples (~1-6 MB for PMC-OA figures) keep the requests
# per sample at 1/32, at the price of fewer articles a batch when shards hold an
# article's subfigures side by side (make_shards --shuffle writes them apart).
SPAN_SAMPLES_RANDOM_ACCESS = 1
SPAN_SAMPLES_STREAMING = 32


@dataclass(frozen=True)
class TrainShards:
    """The training shards as the sample order sees them: samples and weight per shard."""

    urls: tuple[str, ...]
    num_samples: tuple[int, ...]
    weights: tuple[float, ...]  # the upsampling factor of each shard's source


@dataclass(frozen=True, kw_only=True)
class EpochPlan:
    """How one rank's training batches are cut from the epoch's sample order
    (sample_order): global step t takes the next `global_batch` samples."""

    batch_size: int  # per rank
    world_size: int
    num_workers: int  # >= 1: 0 DataLoader workers means one stream in the main process
    order: OrderConfig

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_batches(self) -> int:
        """Per rank, in a whole epoch (the same on every rank)."""
        return self.order.samples_per_epoch // self.global_batch

    @property
    def num_samples(self) -> int:
        """Over all ranks, per whole epoch."""
        return self.num_batches * self.global_batch

    def num_batches_after(self, consumed: int) -> int:
        """Per rank, left in the epoch after `consumed` samples (a resume)."""
        return (self.order.samples_per_epoch - consumed) // self.global_batch


def plan_train_epoch(
    shards: TrainShards,
    config: DataConfig,
    *,
    world_size: int,
    ranks_per_node: int,
    seed: int,
) -> EpochPlan:
    """The plan of a fresh run; the canonical node count defaults to this run's nodes."""
    if world_size % ranks_per_node:
        raise ValueError(f"world size {world_size} is not a multiple of {ranks_per_node} per node")
    num_canonical_nodes = config.num_canonical_nodes or world_size // ranks_per_node
    total = sum(shards.num_samples)
    if config.dataset_resampled:
        samples_per_epoch = config.train_num_samples or round(
            sum(n * w for n, w in zip(shards.num_samples, shards.weights, strict=True))
        )
    else:
        if config.train_num_samples not in (None, total):
            raise ValueError(
                f"--train-num-samples {config.train_num_samples}: without --dataset-resampled "
                f"an epoch is every training sample once ({total} in --train-data's "
                "manifests/indexes); drop the flag, or add --dataset-resampled to draw "
                "epochs of that length"
            )
        samples_per_epoch = total
    random_access = config.cache_dir is not None or all(map(storage.is_local_url, shards.urls))
    span_samples = config.span_samples or (
        SPAN_SAMPLES_RANDOM_ACCESS if random_access else SPAN_SAMPLES_STREAMING
    )
    order = OrderConfig(
        seed=seed,
        num_canonical_nodes=num_canonical_nodes,
        span_samples=span_samples,
        resampled=config.dataset_resampled,
        samples_per_epoch=samples_per_epoch,
    )
    plan = EpochPlan(
        batch_size=config.batch_size,
        world_size=world_size,
        num_workers=max(1, config.num_workers),
        order=order,
    )
    check_plan(plan)
    return plan


def check_plan(plan: EpochPlan) -> None:
    """Start-up checks shared by a fresh plan and a resumed one."""
    nodes = plan.order.num_canonical_nodes
    if plan.global_batch % nodes:
        raise ValueError(
            f"the global batch ({plan.batch_size} x {plan.world_size} ranks = "
            f"{plan.global_batch}) must be a multiple of the {nodes} canonical nodes of the "
            "sample order (--num-canonical-nodes, or the run's node count): every step takes "
            "an equal share of every node's samples. Change --batch-size"
        )
    if plan.num_batches < 1:
        raise ValueError(
            f"an epoch of {plan.order.samples_per_epoch} samples is less than one global batch "
            f"({plan.batch_size} x {plan.world_size} ranks = {plan.global_batch}): lower "
            "--batch-size"
        )

"""Shuffle quality and coverage of the training order at cluster scale, computed from the
orders themselves (no image is decoded): the old shard-per-reader stream against the
sample-exact order (pmc_clip/data/sample_order.py).

    .venv/bin/python bench/bench_shuffle.py            # PMC-OA on 8 nodes x 8 GPUs x 8 workers

The data: --num-shards shards of --shard-size samples (the last one shorter), samples in
the order make_shards writes them without --shuffle: the input's order, where the
subfigures of one article are neighbours (1 + Poisson(3.3) pairs an article: PMC-OA's 4.3
pairs per figure; --shuffled-shards: rows in random order, as make_shards --shuffle).
Per global batch (batch x ranks samples) and per rank batch it prints the mean number
of distinct shards and articles, and over --epochs epochs the share of distinct samples
delivered, of repeats within an epoch, and where in their shards the samples sat.

  old      the stream this project had before sample-exact epochs, with the 8-node
           script's --dataset-resampled (without it, fewer shards than readers was
           refused): every reader draws shards with replacement, reads each from its
           start through a 2,000-sample shuffle buffer (500 initial), and stops at its
           quota of whole batches. Simulated with webdataset's own shuffle stage.
  spans-S  the sample-exact order with spans of S samples (--span-samples), C = nodes.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from pmc_clip.data.sample_order import EpochOrder, OrderConfig


def article_ids(num_samples: int, seed: int = 0) -> np.ndarray:
    """Article of each sample, articles contiguous in the sample order."""
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(3.3, size=num_samples)
    return np.repeat(np.arange(num_samples), sizes)[:num_samples]


def old_order(
    shard_sizes: np.ndarray, ranks: int, workers: int, batch: int, epoch: int
) -> list[list[np.ndarray]]:
    """[step][rank] -> global sample ids, as the old resampled stream delivered them."""
    import webdataset as wds

    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    total = int(starts[-1])
    quota_batches = total // (batch * ranks * workers)
    per_worker: dict[tuple[int, int], list[np.ndarray]] = {}
    for rank in range(ranks):
        for worker in range(workers):
            rng = np.random.default_rng([0, epoch, rank, worker, 0])
            draws = rng.choice(len(shard_sizes), size=len(shard_sizes))
            stream = ({"id": int(i)} for s in draws for i in range(starts[s], starts[s + 1]))
            shuffle_rng = random.Random(hash((epoch, rank, worker)))
            shuffled = wds.filters._shuffle(stream, 2000, 500, rng=shuffle_rng)
            ids = np.fromiter(
                (x["id"] for _, x in zip(range(quota_batches * batch), shuffled, strict=False)),
                dtype=np.int64,
            )
            per_worker[rank, worker] = np.split(ids, quota_batches)
    steps = []
    for step in range(quota_batches * workers):
        worker, index = step % workers, step // workers
        steps.append([per_worker[rank, worker][index] for rank in range(ranks)])
    return steps


def new_order(
    shard_sizes: np.ndarray, nodes: int, ranks: int, batch: int, span: int, epoch: int
) -> list[list[np.ndarray]]:
    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    config = OrderConfig(
        seed=0,
        num_canonical_nodes=nodes,
        span_samples=span,
        resampled=False,
        samples_per_epoch=int(starts[-1]),
    )
    order = EpochOrder(
        shard_sizes=shard_sizes,
        shard_weights=np.ones(len(shard_sizes)),
        config=config,
        epoch=epoch,
    )
    global_batch = ranks * batch
    steps = []
    for step in range(order.num_steps(global_batch)):
        per_rank = []
        for rank in range(ranks):
            runs = order.rank_runs(
                consumed=step * global_batch,
                global_batch=global_batch,
                rank=rank,
                batch_size=batch,
            )
            per_rank.append(
                np.concatenate([np.arange(r.first, r.stop) + starts[r.shard] for r in runs])
            )
        steps.append(per_rank)
    return steps


def measure(
    steps: list[list[np.ndarray]], shard_of: np.ndarray, article_of: np.ndarray
) -> dict[str, float]:
    global_shards, global_articles, rank_shards, rank_articles = [], [], [], []
    for per_rank in steps[:: max(1, len(steps) // 50)]:  # 50 steps spread over the epoch
        ids = np.concatenate(per_rank)
        global_shards.append(len(np.unique(shard_of[ids])))
        global_articles.append(len(np.unique(article_of[ids])))
        rank_shards += [len(np.unique(shard_of[r])) for r in per_rank]
        rank_articles += [len(np.unique(article_of[r])) for r in per_rank]
    return {
        "global batch: shards": float(np.mean(global_shards)),
        "global batch: articles": float(np.mean(global_articles)),
        "rank batch: shards": float(np.mean(rank_shards)),
        "rank batch: articles": float(np.mean(rank_articles)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-shards", type=int, default=132)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--span-samples", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--shuffled-shards",
        action="store_true",
        help="rows in random order in the shards (make_shards --shuffle): articles apart",
    )
    args = parser.parse_args(argv)

    sizes = np.full(args.num_shards, args.shard_size, dtype=np.int64)
    sizes[-1] = args.shard_size * 2 // 3  # the last shard of a split is shorter
    total = int(sizes.sum())
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    article_of = article_ids(total)
    if args.shuffled_shards:
        article_of = np.random.default_rng(1).permutation(article_of)
    ranks = args.nodes * args.gpus_per_node
    print(
        f"{total} samples ({len(np.unique(article_of))} articles) in {len(sizes)} shards; "
        f"{args.nodes} nodes x {args.gpus_per_node} GPUs x {args.workers} workers = "
        f"{ranks * args.workers} readers; batch {args.batch_size}/GPU, global "
        f"{ranks * args.batch_size}; {args.epochs} epochs"
    )
    contenders = {"old": lambda e: old_order(sizes, ranks, args.workers, args.batch_size, e)}
    for span in args.span_samples:
        contenders[f"spans-{span}"] = lambda e, s=span: new_order(
            sizes, args.nodes, ranks, args.batch_size, s, e
        )
    for name, build in contenders.items():
        start = time.perf_counter()
        seen = np.zeros(total, dtype=np.int64)
        repeats, delivered, figures = 0, 0, []
        deciles = np.zeros(10)
        for epoch in range(args.epochs):
            steps = build(epoch)
            ids = np.concatenate([r for per_rank in steps for r in per_rank])
            counts = np.bincount(ids, minlength=total)
            repeats += int((counts[counts > 1] - 1).sum())
            delivered += len(ids)
            seen += counts
            starts = np.concatenate([[0], np.cumsum(sizes)])
            position = (ids - starts[shard_of[ids]]) / sizes[shard_of[ids]]
            deciles += np.bincount((position * 10).astype(int), minlength=10)
            figures.append(measure(steps, shard_of, article_of))
        summary = {k: np.mean([f[k] for f in figures]) for k in figures[0]}
        print(f"{name:10s} ({time.perf_counter() - start:5.1f} s)")
        for key, value in summary.items():
            print(f"    {key:24s} {value:8.1f}")
        print(
            f"    distinct samples over {args.epochs} epochs: {(seen > 0).mean():.1%}; "
            f"repeats within an epoch: {repeats / delivered:.1%} of delivered; "
            f"shard deciles read: {np.round(deciles / deciles.sum(), 3).tolist()}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

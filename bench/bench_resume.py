"""Time to the first batch of a resumed training loader: at 90% of an epoch against 0%.

    .venv/bin/python bench/bench_resume.py

A resume positions the sample order at the saved sample count and reads from there (by
index: nothing before the resume point is read or decoded). Each run builds the loader a
restarted trainer builds, loads a saved position (0% or 90% of the epoch) and times from
`load_state_dict` to the first batch, worker start-up included; runs alternate, best of
--repeats. It also prints the samples the resumed pass decoded up to its first batch
(target: only that batch's) and the ratio 90% / 0% (target <= 1.5).

Same synthetic shards as bench_loader.py (cached under bench_out/loader).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_loader import add_data_arguments, caption_tokenizer, prepare  # noqa: E402


def first_batch_seconds(
    pattern: str, tokenizer_dir: Path, fraction: float, args: argparse.Namespace
) -> tuple[float, int]:
    """(seconds from load_state_dict to the first batch, samples decoded by then)."""
    from pmc_clip.config import DataConfig
    from pmc_clip.data.loaders import build_train_loader

    tokenizer = caption_tokenizer(tokenizer_dir, 0.15)
    config = DataConfig(
        train_data=pattern,
        batch_size=args.batch_size,
        num_workers=args.workers,
        image_size=args.image_size,
        pin_memory=False,
    )
    loader = build_train_loader(config, tokenizer, rank=0, world_size=1, seed=0)
    state = loader.state_dict()
    state["samples_consumed"] = int(loader.num_batches * fraction) * loader.plan.global_batch
    start = time.perf_counter()
    loader.load_state_dict(state)
    batch = next(iter(loader))
    seconds = time.perf_counter() - start
    decoded = loader.meter.totals()["samples_read"]
    assert len(batch["keys"]) == args.batch_size
    del batch, loader
    return seconds, decoded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    pattern, tokenizer_dir, num_samples = prepare(
        Path(args.out), args.num_articles, args.shard_size
    )
    print(
        f"{num_samples} samples, {args.workers} workers, batch {args.batch_size}, "
        f"{args.image_size} px, best of {args.repeats}"
    )
    best: dict[float, float] = {}
    for repeat in range(args.repeats):
        for fraction in (0.0, 0.9):
            seconds, decoded = first_batch_seconds(pattern, tokenizer_dir, fraction, args)
            best[fraction] = min(best.get(fraction, float("inf")), seconds)
            print(
                f"  repeat {repeat}: resume at {fraction:.0%}: first batch after "
                f"{seconds * 1000:7.1f} ms, {decoded} samples decoded",
                flush=True,
            )
    print(f"first batch at 0%:  {best[0.0] * 1000:7.1f} ms")
    print(f"first batch at 90%: {best[0.9] * 1000:7.1f} ms")
    print(f"90% / 0% (target <= 1.5): {best[0.9] / best[0.0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

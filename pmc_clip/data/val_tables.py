"""--val-data given as a table of image paths and captions (CSV/TSV/JSONL, the original
PMC-CLIP's evaluation input): sharded once by rank 0 with make_shards, then read like any
val shards.
"""

from __future__ import annotations

import dataclasses
import os

from pmc_clip import storage
from pmc_clip.config import DataConfig

# --val-data given as a table of image paths and captions (the original PMC-CLIP's input).
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
# Small shards so that every rank (and loader worker) gets a share of a 2,000-pair table.
VAL_TABLE_SHARD_SIZE = 128


def shard_val_table(config: DataConfig, *, work_dir: str, rank: int, world_size: int) -> DataConfig:
    """`config` with --val-data naming shards: unchanged for shards, or, for a CSV/JSONL
    table with --image-dir (the original PMC-CLIP's evaluation input), the shards rank 0
    writes once into `work_dir`/val_shards with make_shards (every row checked, bad ones
    listed in its skipped.jsonl; a rerun finds it done) while the other ranks wait. Every
    rank calls it."""
    # Imported here: only a table needs the shard writer and the process group.
    from urllib.parse import urlsplit

    from pmc_clip import distributed
    from pmc_clip.sharding.format import Manifest
    from pmc_clip.sharding.options import ShardOptions
    from pmc_clip.sharding.run import make_shards

    table = config.val_data
    if table is None or not urlsplit(table).path.lower().endswith(TABLE_SUFFIXES):
        return config
    if not config.image_dir:
        raise ValueError(
            f"--val-data {storage.redact_url(table)} is a table of image paths and "
            "captions: pass --image-dir with the folder (or images.zip) they are under"
        )
    output = os.path.join(work_dir, "val_shards")
    if rank == 0:
        make_shards(
            ShardOptions(
                input=table,
                images=config.image_dir,
                output=output,
                prefix="pairs",
                img_key=config.csv_img_key,
                caption_key=config.csv_caption_key,
                csv_separator=config.csv_separator,
                split="val",
                shard_size=VAL_TABLE_SHARD_SIZE,
                workers=min(4, os.cpu_count() or 1),
            )
        )
    distributed.barrier(world_size)
    pattern = Manifest.load(*storage.url_to_fs(output)).splits["val"].pattern
    return dataclasses.replace(config, val_data=os.path.join(output, pattern))

"""What `python -m pmc_clip.embed` embeds, cut into parts: our shards (one part per
shard), a folder of images, or a CSV/JSONL table of image paths and captions."""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

from pmc_clip import metrics, shard_index, storage
from pmc_clip.config import DataConfig
from pmc_clip.data.decode import IMAGE_EXTENSIONS
from pmc_clip.data.eval_stages import group_samples
from pmc_clip.data.shard_runs import SKIPPED_KEY
from pmc_clip.data.val_tables import TABLE_SUFFIXES
from pmc_clip.evaluator import IMAGE_SUFFIXES
from pmc_clip.sharding.plan import safe_relative_path
from pmc_clip.sharding.rows import Skip, read_rows

log = logging.getLogger(metrics.LOGGER_NAME)


@dataclass(frozen=True)
class Item:
    key: str
    caption: str | None
    image: bytes | str  # a shard member's bytes, or a path/URL to read


@dataclass(frozen=True)
class Part:
    index: int
    items: Callable[[], Iterator[Item]]
    num_items: int | None  # None: known once read (a shard)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"


def plan_parts(
    source: str, image_dir: str | None, part_size: int, table_keys: tuple[str, str, str]
) -> tuple[str, list[Part]]:
    """(input kind, its parts): "folder", "table" or "shards"."""
    if os.path.isdir(source):
        return "folder", _chunked(_folder_items(source), part_size)
    if urlsplit(source).path.lower().endswith(TABLE_SUFFIXES):
        if image_dir is None:
            raise ValueError(
                f"--input {storage.redact_url(source)} is a table of image paths: pass "
                "--image-dir with the folder they are under"
            )
        return "table", _chunked(_table_items(source, image_dir, *table_keys), part_size)
    urls = [url for urls in storage.expand_spec(source) for url in urls]
    return "shards", [
        Part(index, partial(_shard_items, url), None) for index, url in enumerate(urls)
    ]


def _chunked(items: list[Item], part_size: int) -> list[Part]:
    chunks = [items[start : start + part_size] for start in range(0, len(items), part_size)]
    return [Part(index, partial(iter, chunk), len(chunk)) for index, chunk in enumerate(chunks)]


def _folder_items(folder: str) -> list[Item]:
    items = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_SUFFIXES):
                path = os.path.join(root, name)
                items.append(Item(os.path.relpath(path, folder), None, path))
    if not items:
        raise ValueError(f"--input {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return items


def _table_items(
    table: str, image_dir: str, image_key: str, caption_key: str, separator: str
) -> list[Item]:
    items = []
    for row, record in read_rows(table, csv_separator=separator):
        if isinstance(record, Skip):
            log.warning("row %d of %s skipped: %s", row, storage.redact_url(table), record)
            continue
        if image_key not in record or caption_key not in record:
            raise ValueError(
                f"row {row} of {storage.redact_url(table)} has no {image_key!r} or "
                f"{caption_key!r} column (found {sorted(record)}): set --csv-img-key "
                "and --csv-caption-key"
            )
        relative = safe_relative_path(str(record[image_key]))
        if relative is None:
            log.warning("row %d skipped: image path %r leaves --image-dir", row, record[image_key])
            continue
        items.append(Item(relative, str(record[caption_key]), storage.join(image_dir, relative)))
    return items


def _shard_items(url: str) -> Iterator[Item]:
    """A shard's samples, read as evaluation reads them (shard_index.tar_members checks
    every member's size before reading it)."""
    fs, path = storage.url_to_fs(url)
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        members = shard_index.tar_members(tar, int(fs.size(path)))
        for sample in group_samples(members, url, DataConfig().max_member_bytes):
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if SKIPPED_KEY in sample or image_ext is None:
                log.warning("sample %r in %s skipped: no readable image", sample["__key__"], url)
                continue
            caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
            yield Item(sample["__key__"], caption, sample[image_ext])

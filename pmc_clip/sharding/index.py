"""index_shards: write the sample index `X.idx` (pmc_clip/shard_index.py) beside shards.

    python tools/index_shards.py 's3://bucket/pmc-oa-train-{000000..000131}.tar' --workers 16
    python tools/index_shards.py 'shards/a-{000000..000009}.tar::shards/b-{000000..000003}.tar'

make_shards writes the indexes itself; this is for shards made before it did, or by
other tools. Each shard is read once, front to back, and its index published whole (one
PUT, or a rename). A shard whose index is there and describes a shard of its current
size is kept, so a rerun after a kill continues where it stopped; `--force` rebuilds
every index. Every call on an object store is retried with backoff. A shard that cannot
be indexed (missing, not a tar, truncated) is reported by its redacted URL, the others
are still done, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import fsspec
from tqdm import tqdm

from pmc_clip import metrics, shard_index, storage
from pmc_clip.sharding.store import STORE_TIMEOUT_SECONDS

# s3fs fetches this much per request while tarfile reads the shard sequentially.
_READ_BLOCK_BYTES = 16 * 1024 * 1024


def expand_shards(spec: str) -> list[str]:
    """`::`-joined brace patterns -> shard URLs, each checked to name a `.tar`."""
    urls = [url for source in storage.expand_spec(spec) for url in source]
    for url in urls:
        shard_index.index_url(url)  # ValueError for anything but a .tar
    return urls


def index_shard(
    fs: fsspec.AbstractFileSystem, url: str, force: bool, retry: storage.RetryPolicy
) -> str:
    """Build and publish the index of one shard unless a current one exists; returns
    "built" or "kept". StorageError (message with the redacted URL) when it cannot."""
    path = fs._strip_protocol(url)
    idx_url = shard_index.index_url(url)
    idx_path = fs._strip_protocol(idx_url)
    size = storage.retry_call("stat", url, retry, lambda: int(fs.size(path)))
    if not force and storage.retry_call("check", idx_url, retry, lambda: fs.exists(idx_path)):
        data = storage.retry_call("read", idx_url, retry, lambda: storage.read_bytes(fs, idx_path))
        try:
            existing = shard_index.ShardIndex.from_bytes(data, storage.redact_url(idx_url))
        except ValueError:
            existing = None  # damaged: rebuilt below
        if existing is not None and existing.shard_bytes == size:
            return "kept"

    def build() -> shard_index.ShardIndex:
        # A failed read starts the shard over: one sequential pass, no resume inside it.
        with fs.open(path, "rb", block_size=_READ_BLOCK_BYTES) as f:
            return shard_index.build_index(f, size)

    index = storage.retry_call("index", url, retry, build)
    shard_index.write_index(fs, idx_path, index, retry)
    return "built"


def index_shards(urls: list[str], *, workers: int, force: bool, retry: storage.RetryPolicy) -> int:
    """Index every shard, `workers` at a time; print failures and a summary to stderr.
    Returns the exit code: 1 if any shard failed."""
    filesystems: dict[str | None, fsspec.AbstractFileSystem] = {}
    for url in urls:  # one client per protocol, shared by the threads
        protocol = fsspec.core.split_protocol(url)[0]
        if protocol not in filesystems:
            filesystems[protocol] = storage.url_to_fs_for_retries(url, STORE_TIMEOUT_SECONDS)[0]
    counts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="index") as pool,
        tqdm(total=len(urls), unit="shard", desc="index_shards", disable=None) as progress,
    ):
        futures = {
            pool.submit(
                index_shard, filesystems[fsspec.core.split_protocol(url)[0]], url, force, retry
            ): url
            for url in urls
        }
        for future in as_completed(futures):
            url = futures[future]
            try:
                counts[future.result()] += 1
            except storage.StorageError as e:  # names the object itself, redacted
                counts["failed"] += 1
                failures.append(str(e))
            except (OSError, ValueError) as e:  # a local write of the index
                counts["failed"] += 1
                failures.append(f"{storage.redact_url(url)}: {storage.describe_error(e, url)}")
            progress.update(1)
    for failure in sorted(failures):
        print(f"FAILED {failure}", file=sys.stderr)
    print(
        f"index_shards: {len(urls)} shards: {counts['built']} built, {counts['kept']} kept, "
        f"{counts['failed']} failed",
        file=sys.stderr,
    )
    return 1 if counts["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    metrics.install_secret_filter(argv)
    parser = argparse.ArgumentParser(
        prog="index_shards", description="Write the sample index (.idx) beside each shard."
    )
    parser.add_argument("shards", help="brace pattern(s) of .tar shards, '::'-joined, or a path")
    parser.add_argument("--workers", type=int, default=8, help="shards indexed at once")
    parser.add_argument("--force", action="store_true", help="rebuild indexes that look current")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=storage.RetryPolicy.max_attempts,
        help="tries of each object-store call before a shard counts as failed",
    )
    args = parser.parse_args(argv)
    retry = storage.RetryPolicy(max_attempts=args.max_attempts)
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        retry.validate("--max-attempts")
        urls = expand_shards(args.shards)
    except ValueError as e:
        print(f"index_shards: error: {e}", file=sys.stderr)
        return 2
    return index_shards(urls, workers=args.workers, force=args.force, retry=retry)


if __name__ == "__main__":
    sys.exit(main())

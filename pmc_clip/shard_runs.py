"""Reading runs of consecutive samples out of indexed shards (training).

A run (`sample_order.Run`) is samples [first, stop) of one shard; its bytes are one
contiguous range of the tar, located by the shard's index (`shard_index`). A data-loader
worker reads its runs in order through a `RunReader`:

- local shards: a seek and a read;
- object stores (s3://, gs://, http...): range requests of at most `chunk_bytes`,
  retried with backoff (storage.retry_call), so requests scale with runs, not samples;
- with a node cache (`--cache-dir`): the whole shard is downloaded once per node into
  `shard_cache.ShardCache` and runs are read from the local copy; since a node reads the
  same shards every epoch (sample_order's placement), later epochs read nothing remote.

The next runs are fetched in a background thread while the current one is decoded. Each
run's bytes are parsed with webdataset's own tar reader and checked against the index
(sample count and keys): a shard rewritten after it was indexed is an error naming the
shard and the tool that rebuilds its index, never a silently different sample.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

from pmc_clip import shard_index, storage
from pmc_clip.sample_order import Run

INDEX_TOOL = "python tools/index_shards.py"
_T = TypeVar("_T")
RUNS_READ_AHEAD = 2  # runs fetched ahead of the one being decoded (memory: ~2 runs' bytes)


class StaleIndexError(ValueError):
    """A shard's bytes do not match its index (rewritten or truncated after indexing)."""


@dataclass(frozen=True)
class RunResult:
    """A fetched run: its samples (webdataset dicts of raw members), or why it failed."""

    run: Run
    samples: list[dict[str, Any]]
    error: storage.ShardReadError | None = None


class RunReader:
    """Fetches runs of one data stream's shards; lives in the process that reads (a
    data-loader worker) and keeps each shard's index once loaded."""

    def __init__(
        self,
        urls: tuple[str, ...],
        filesystems: storage.ShardFilesystems,
        counters: storage.ShardReadCounters,
    ) -> None:
        self.urls, self.filesystems, self.counters = urls, filesystems, counters
        self.options = filesystems.options
        self._indexes: dict[int, shard_index.ShardIndex] = {}

    # ------------------------------------------------------------------ indexes

    def index(self, shard: int) -> shard_index.ShardIndex:
        """The shard's index, read once per process (indexes are small: ~10 bytes per
        sample plus its keys)."""
        if shard not in self._indexes:
            url = shard_index.index_url(self.urls[shard])
            data = self._read_small(url)
            self._indexes[shard] = shard_index.ShardIndex.from_bytes(data, storage.redact_url(url))
        return self._indexes[shard]

    def _read_small(self, url: str) -> bytes:
        fs, path = self._fs(url)
        if storage.is_local(fs):
            with open(path, "rb") as file:
                return file.read()
        return self._retrying("read", url, lambda: bytes(fs.cat_file(path)))

    # ------------------------------------------------------------------ bytes

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = fsspec.core.split_protocol(url)[0]
        fs = self.filesystems.get(protocol or "file")
        return fs, fs._strip_protocol(url)

    def _retrying(self, what: str, url: str, call: Callable[[], _T]) -> _T:
        def attempt() -> _T:
            self.counters.requests += 1
            return call()

        def count_retry() -> None:
            self.counters.retries += 1

        return storage.retry_call(
            what, url, self.options.retry, attempt, storage.ShardReadError, count_retry
        )

    def read_bytes(self, run: Run) -> bytes:
        """The bytes of the run's samples (header of its first member to the end of its
        last), by seek on a local or cached file, else by range requests."""
        url = self.urls[run.shard]
        index = self.index(run.shard)
        start, end = index.byte_range(run.first, run.stop)
        fs, path = self._fs(url)
        if storage.is_local(fs):
            return self._read_local(url, path, index, start, end)
        if self.options.cache_dir is not None:
            return self._read_cached(url, index, start, end)
        chunks = []
        for low in range(start, end, self.options.chunk_bytes):
            high = min(low + self.options.chunk_bytes, end)
            chunks.append(self._range(fs, url, path, low, high))
        data = b"".join(chunks)
        self.counters.bytes_read += len(data)
        return data

    def _range(
        self, fs: fsspec.AbstractFileSystem, url: str, path: str, low: int, high: int
    ) -> bytes:
        def call() -> bytes:
            data = fs.cat_file(path, start=low, end=high)
            if len(data) != high - low:  # a truncated body is a transient failure
                raise ConnectionError(f"got {len(data)} of {high - low} bytes at {low}")
            return bytes(data)

        return self._retrying("read", url, call)

    def _read_local(
        self, url: str, path: str, index: shard_index.ShardIndex, start: int, end: int
    ) -> bytes:
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size != index.shard_bytes:
                    raise _stale(url, f"is {size} bytes, its index says {index.shard_bytes}")
                file.seek(start)
                data = file.read(end - start)
        except OSError as exc:
            raise storage.ShardReadError(
                f"read {storage.redact_url(url)}: {storage.describe_error(exc, url)}"
            ) from None
        self.counters.bytes_read += len(data)
        return data

    def _read_cached(self, url: str, index: shard_index.ShardIndex, start: int, end: int) -> bytes:
        with storage.open_cached(url, index.shard_bytes, self.filesystems, self.counters) as file:
            file.seek(start)
            return file.read(end - start)

    # ------------------------------------------------------------------ samples

    def samples(self, run: Run) -> list[dict[str, Any]]:
        """The run's samples as webdataset dicts ({__key__, __url__, ext: bytes}), checked
        against the index."""
        data = self.read_bytes(run)
        url = self.urls[run.shard]
        import webdataset as wds  # torch-heavy import; only data-loading processes need it

        members = (
            member | {"__url__": url}
            for member in wds.tariterators.tar_file_iterator(io.BytesIO(data))
        )
        samples = list(wds.tariterators.group_by_keys(members))
        keys = [sample["__key__"] for sample in samples]
        expected = self.index(run.shard).keys[run.first : run.stop].tolist()
        if keys != expected:
            raise _stale(
                url,
                f"samples {run.first}..{run.stop - 1} hold keys {keys[:2]}... where its index "
                f"lists {expected[:2]}...",
            )
        return samples

    def read_ahead(self, runs: Iterable[Run]) -> Iterator[RunResult]:
        """Each run's samples in order, the next RUNS_READ_AHEAD fetched in a thread. A
        run that cannot be read after every retry comes back with its error."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-read-ahead")
        pending: deque[tuple[Run, Future[list[dict[str, Any]]]]] = deque()
        upcoming = iter(runs)
        try:
            while True:
                while len(pending) <= RUNS_READ_AHEAD:
                    run = next(upcoming, None)
                    if run is None:
                        break
                    pending.append((run, executor.submit(self.samples, run)))
                if not pending:
                    return
                run, future = pending.popleft()
                try:
                    yield RunResult(run, future.result())
                except storage.ShardReadError as exc:
                    self.counters.shards_failed += 1
                    yield RunResult(run, [], exc)
        finally:
            for _, future in pending:
                future.cancel()
            executor.shutdown(wait=False, cancel_futures=True)


def _stale(url: str, what: str) -> StaleIndexError:
    return StaleIndexError(
        f"{storage.redact_url(url)} {what}: the shard changed after it was indexed. Rebuild "
        f"its index: {INDEX_TOOL} --force '{storage.redact_url(url)}'"
    )

"""Reading runs of consecutive samples out of indexed shards (training).

A run (`sample_order.Run`) is samples [first, stop) of one shard; its bytes are one
contiguous range of the tar, located by the shard's index (`shard_index`). Of that range
only the members the loader keeps (images, `.txt`, `.json`) within `--max-member-bytes`
are read, with their headers: sizes are checked in the index before any byte is read, so
a huge or unwanted member (`.pth`) costs neither memory nor, beyond GAP_READ_MAX_BYTES,
reading (one more read call instead). A data-loader worker reads its runs in order
through a `RunReader`:

- local shards: a seek and a read on a file kept open;
- object stores (s3://, gs://, http...): range requests of at most `chunk_bytes`,
  retried with backoff (storage.retry_call), so requests scale with runs, not samples;
  the next runs are fetched in a background thread while the current one is decoded;
- with a node cache (`--cache-dir`): the whole shard is downloaded once per node into
  `shard_cache.ShardCache` and runs are read from the local copy; since a node reads the
  same shards every epoch (sample_order's placement), later epochs read nothing remote.

A run's samples are cut out of its bytes at the member offsets of the index (no tar
parsing), and each member's own tar header is checked against the index (checksum and
size): a shard rewritten after it was indexed is an error naming the shard and the tool
that rebuilds its index, never a silently different sample.
"""

from __future__ import annotations

import collections
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import fsspec

from pmc_clip import shard_index, storage
from pmc_clip.data import shard_reader
from pmc_clip.data.sample_order import Run
from pmc_clip.shard_index import INDEX_TOOL

RUNS_READ_AHEAD = 2  # remote runs fetched ahead of the one being decoded (memory: ~2 runs)
OPEN_FILES = 16  # local or cached shards kept open per reading process
# Unwanted bytes between wanted members (a dropped `.pth`, an oversized image) up to this
# much are read through rather than skipped: a further range request costs about the time
# 1 MiB takes to arrive, and a seek saves nothing worth a second read call. So a normal
# run is still one read; only big unwanted members split it.
GAP_READ_MAX_BYTES = 1 << 20
# A sample's kept members that were not read for their size: a list of reasons, which
# make it a bad sample (data.SampleProcessor). Set by every reader (RunReader, and the
# evaluation's tar stream).
SKIPPED_KEY = "__skipped__"


class StaleIndexError(ValueError):
    """A shard's bytes do not match its index (rewritten or truncated after indexing)."""


@dataclass(frozen=True)
class RunResult:
    """A fetched run: its samples (webdataset dicts of raw members), or why it failed."""

    run: Run
    samples: list[dict[str, Any]]
    error: shard_reader.ShardReadError | None = None


class RunReader:
    """Fetches runs of one data stream's shards; lives in the process that reads (a
    data-loader worker) and keeps each shard's index, and a few open local or cached
    files, once loaded. `extensions`: the members a sample keeps, each read only when it
    is at most `max_member_bytes` (others are never read where the gap they leave is over
    GAP_READ_MAX_BYTES, and never sliced out of what is read, let alone decoded)."""

    def __init__(
        self,
        urls: tuple[str, ...],
        num_samples: tuple[int, ...],
        filesystems: shard_reader.ShardFilesystems,
        counters: shard_reader.ShardReadCounters,
        extensions: frozenset[str],
        max_member_bytes: int,
    ) -> None:
        self.urls, self.num_samples = urls, num_samples  # the counts the order was made of
        self.filesystems, self.counters = filesystems, counters
        self.options = filesystems.options
        self.extensions, self.max_member_bytes = extensions, max_member_bytes
        self._indexes: dict[int, shard_index.ShardIndex] = {}
        self._local = tuple(map(storage.is_local_url, urls))  # per shard: a plain file
        # Open local or cached shards, least recently used first: with one-sample runs
        # an open per run would cost more than the read.
        self._files: collections.OrderedDict[int, IO[bytes]] = collections.OrderedDict()

    # ------------------------------------------------------------------ indexes

    def index(self, shard: int) -> shard_index.ShardIndex:
        """The shard's index, read once per process (small: ~40 bytes per sample)."""
        if shard not in self._indexes:
            url = shard_index.index_url(self.urls[shard])
            data = self._read_small(url)
            index = shard_index.ShardIndex.from_bytes(data, storage.redact_url(url))
            if index.num_samples != self.num_samples[shard]:
                shard_url = storage.redact_url(self.urls[shard])
                raise StaleIndexError(
                    f"{shard_url} has {index.num_samples} samples by its index and "
                    f"{self.num_samples[shard]} by the sizes.json/manifest.json beside it: one "
                    "of them belongs to another version of the shard. Rebuild the index "
                    f"({INDEX_TOOL} --force '{shard_url}') or the manifest"
                )
            self._indexes[shard] = index
        return self._indexes[shard]

    def _read_small(self, url: str) -> bytes:
        fs, path = self._fs(url)
        if storage.is_local(fs):
            with open(path, "rb") as file:
                return file.read()
        return shard_reader.retrying_read(
            "read", url, self.options, self.counters, lambda: bytes(fs.cat_file(path))
        )

    def is_random_access(self, shard: int) -> bool:
        """Local (or node-cached) shards: a run is a seek and a read, no request."""
        return self._local[shard] or self.options.cache_dir is not None

    # ------------------------------------------------------------------ bytes

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = fsspec.core.split_protocol(url)[0]
        fs = self.filesystems.get(protocol or "file")
        return fs, fs._strip_protocol(url)

    def read_bytes(self, shard: int, *, start: int, end: int) -> bytes:
        """Bytes [start, end) of the shard: a seek on a local or cached file, else range
        requests of at most `chunk_bytes`."""
        url = self.urls[shard]
        if self.is_random_access(shard):
            try:
                file = self._open(shard)
                file.seek(start)
                data = file.read(end - start)
            except shard_reader.ShardReadError:
                raise
            except OSError as exc:
                raise shard_reader.ShardReadError(
                    f"read {storage.redact_url(url)}: {storage.describe_error(exc, url)}"
                ) from None
        else:
            fs, path = self._fs(url)
            chunk = self.options.chunk_bytes
            data = b"".join(
                shard_reader.read_range(
                    fs, path, url, low, min(low + chunk, end), self.options, self.counters
                )
                for low in range(start, end, chunk)
            )
        if len(data) != end - start:
            raise _stale(url, f"ends before byte {end}")
        self.counters.bytes_read += len(data)
        return data

    def _open(self, shard: int) -> IO[bytes]:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        url, size = self.urls[shard], self.index(shard).shard_bytes
        if self._local[shard]:
            path = self._fs(url)[1]
            try:
                file, num_bytes = storage.open_regular_file(path)  # kept open, closed on eviction
            except storage.NotARegularFileError:
                raise shard_reader.ShardReadError(
                    f"read {storage.redact_url(url)}: not a regular file"
                ) from None
            if num_bytes != size:
                file.close()
                raise _stale(url, f"is {num_bytes} bytes, its index says {size}")
        else:
            # Only one cached copy open at a time: an open copy keeps its disk space after
            # an eviction, and 64 readers a node holding many would overrun the limit.
            for cached in [s for s in self._files if not self._local[s]]:
                self._files.pop(cached).close()
            file = shard_reader.open_cached(url, size, self.filesystems, self.counters)
        self._files[shard] = file
        if len(self._files) > OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        return file

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    # ------------------------------------------------------------------ samples

    def samples(self, run: Run) -> list[dict[str, Any]]:
        """The run's samples as webdataset dicts ({__key__, __url__, ext: bytes}), cut out
        of the run's bytes at the index's member offsets. Only the members a sample keeps
        (`extensions`) and within `max_member_bytes` are read, each with its own tar header
        (right before its data), which must carry a valid checksum and the index's size: a
        shard rewritten after it was indexed fails here. A kept member over the limit is
        never read: its sample gets the reason under SKIPPED_KEY (a bad sample)."""
        index = self.index(run.shard)
        url = self.urls[run.shard]
        first_member, stop_member = index.member_starts[run.first], index.member_starts[run.stop]
        offsets = index.member_offsets[first_member:stop_member].tolist()
        sizes = index.member_sizes[first_member:stop_member].tolist()
        extensions = index.member_extensions[first_member:stop_member].tolist()
        bounds = (index.member_starts[run.first : run.stop + 1] - first_member).tolist()
        keys = index.keys[run.first : run.stop].tolist()
        wanted = [
            extension in self.extensions and size <= self.max_member_bytes
            for extension, size in zip(extensions, sizes, strict=True)
        ]
        # Where wanted members lie close together (the headers and small members between
        # them), one read covers them; a gap over GAP_READ_MAX_BYTES is skipped.
        spans = [
            (offset - tarfile.BLOCKSIZE, offset + size)
            for offset, size, keep in zip(offsets, sizes, wanted, strict=True)
            if keep
        ]
        pieces = [
            (start, self.read_bytes(run.shard, start=start, end=end))
            for start, end in coalesce(spans, GAP_READ_MAX_BYTES)
        ]
        samples = []
        piece = 0
        for i, key in enumerate(keys):
            sample: dict[str, Any] = {"__key__": key, "__url__": url}
            for m in range(bounds[i], bounds[i + 1]):
                offset, size, extension = offsets[m], sizes[m], extensions[m]
                if extension not in self.extensions:
                    continue
                if not wanted[m]:
                    reason = oversized_member(
                        extension, size=size, max_member_bytes=self.max_member_bytes
                    )
                    sample.setdefault(SKIPPED_KEY, []).append(reason)
                    continue
                while offset + size > pieces[piece][0] + len(pieces[piece][1]):
                    piece += 1  # members come in offset order, and so do the pieces
                start, data = pieces[piece]
                _check_header(data, offset=offset - start, size=size, url=url, key=key)
                sample[extension] = data[offset - start : offset - start + size]
            samples.append(sample)
        return samples

    def read_all(self, runs: Iterable[Run]) -> Iterator[RunResult]:
        """Each run's samples in order. Remote runs are fetched RUNS_READ_AHEAD ahead in a
        thread while the current one is decoded; local and cached ones are read when
        their turn comes (a read from the page cache costs less than the hand-off). A run
        that cannot be read after every retry comes back with its error."""
        executor: ThreadPoolExecutor | None = None
        pending: collections.deque[tuple[Run, Future[list[dict[str, Any]]] | None]] = (
            collections.deque()
        )
        upcoming = iter(runs)
        try:
            while True:
                while len(pending) <= RUNS_READ_AHEAD:
                    run = next(upcoming, None)
                    if run is None:
                        break
                    if self.is_random_access(run.shard):
                        pending.append((run, None))
                        continue
                    if executor is None:
                        executor = ThreadPoolExecutor(1, thread_name_prefix="run-read-ahead")
                    pending.append((run, executor.submit(self.samples, run)))
                if not pending:
                    return
                run, future = pending.popleft()
                try:
                    samples = self.samples(run) if future is None else future.result()
                except shard_reader.ShardReadError as exc:
                    self.counters.shards_failed += 1
                    yield RunResult(run, [], exc)
                else:
                    yield RunResult(run, samples)
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)


def coalesce(spans: list[tuple[int, int]], max_gap: int) -> list[tuple[int, int]]:
    """Byte spans in increasing order -> the reads that cover them: spans less than
    `max_gap` bytes apart share one read."""
    reads: list[tuple[int, int]] = []
    for start, end in spans:
        if reads and start - reads[-1][1] <= max_gap:
            reads[-1] = (reads[-1][0], end)
        else:
            reads.append((start, end))
    return reads


def oversized_member(extension: str, *, size: int, max_member_bytes: int) -> str:
    """Why a kept member was not read (SKIPPED_KEY)."""
    return (
        f"its .{extension} member is {size} bytes, over the limit of {max_member_bytes} "
        "(--max-member-bytes); not read"
    )


def _check_header(data: bytes, *, offset: int, size: int, url: str, key: str) -> None:
    """The ustar header right before a member's data (PAX and GNU long-name records come
    before it) must parse with a valid checksum and give the member's size."""
    header = data[offset - tarfile.BLOCKSIZE : offset]
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise _stale(url, f"has no valid tar header before a member of {key!r} ({exc})") from None
    if info.size != size:
        raise _stale(url, f"holds a member of {key!r} of {info.size} bytes, its index {size}")


def _stale(url: str, what: str) -> StaleIndexError:
    return StaleIndexError(
        f"{storage.redact_url(url)} {what}: the shard changed after it was indexed. Rebuild "
        f"its index: {INDEX_TOOL} --force '{storage.redact_url(url)}'"
    )

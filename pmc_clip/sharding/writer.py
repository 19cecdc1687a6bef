"""Stage 4, write: the main process packs samples in plan order into shards; a shard
closes at --shard-size samples or before --max-shard-bytes. Each shard `X.tar` gets its
sample index `X.idx` (pmc_clip/shard_index.py) beside it, published just before the
shard, so a shard never exists without its index; its record in `_progress/` is written
only once the shard is in place (pmc_clip/sharding/progress.py)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import fsspec
from tqdm import tqdm

from pmc_clip import shard_index, storage
from pmc_clip.sharding import identities
from pmc_clip.sharding.figures import Figure, FigureError
from pmc_clip.sharding.format import ShardRecord, shard_name
from pmc_clip.sharding.lock import OutputLock
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.plan import PlannedSample, describe_skip
from pmc_clip.sharding.progress import input_digests
from pmc_clip.sharding.rows import Skip
from pmc_clip.sharding.store import retried, where_of, write_json
from pmc_clip.sharding.workers import load_figures

# Fixed tar header fields, so a shard's bytes depend only on its samples.
_TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
_TAR_USER = "pmc_clip"
_TAR_MODE = 0o444  # read-only members, as webdataset writes them
# Sizes the byte cap accounts for beyond payloads: a tar header per member, padding.
_TAR_BLOCK = 512


def sample_members(sample: PlannedSample, figure: Figure) -> dict[str, bytes | str]:
    metadata = {
        **sample.extra,
        "key": sample.key,
        "source_path": sample.image,
        "row": sample.row,
        "split": sample.split,
        "article_id": sample.article_id,
        "width": figure.width,
        "height": figure.height,
        "original_width": figure.original_width,
        "original_height": figure.original_height,
        "original_format": figure.original_format,
        "original_mode": figure.original_mode,
        "reencoded": figure.reencoded,
        "conversion": figure.conversion,
    }
    return {
        "__key__": sample.key,
        figure.ext: figure.data,
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def write_sample(tar: tarfile.TarFile, members: dict[str, bytes | str]) -> None:
    """One sample as webdataset.TarWriter writes it, byte for byte: members `KEY.EXT`
    sorted by extension, fixed owner, mode and mtime. Written with tarfile because
    importing webdataset imports torch: seconds of CPU in the main process of every run
    (and of each of hundreds of SLURM parts; bench/RESULTS.md) for a dozen lines of tar
    headers."""
    key = members["__key__"]
    assert isinstance(key, str)
    for ext in sorted(members):
        if ext == "__key__":
            continue
        value = members[ext]
        data = value.encode("utf-8") if isinstance(value, str) else value
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), _TAR_MTIME, _TAR_MODE
        info.uname = info.gname = _TAR_USER
        tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: dict[str, bytes | str]) -> int:
    payload = [len(v) for k, v in members.items() if k != "__key__"]
    return sum(_TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK for n in payload)


class ShardWriterState:
    """Packs samples into the current shard and closes it on the count or byte cap."""

    def __init__(
        self,
        out_fs: fsspec.AbstractFileSystem,
        out_root: str,
        options: ShardOptions,
        *,
        split: str,
        index: int,
        start: int,
        digests: Callable[[int, int], tuple[str, str]],
    ) -> None:
        self.fs, self.root, self.options, self.split = out_fs, out_root, options, split
        self.index, self.start, self.digests = index, start, digests
        # The open shard: samples stream into a staged tar file as they come, so memory
        # holds one sample, not one shard (up to --max-shard-bytes).
        self._staged: str | None = None
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self.num_samples = 0
        self.num_bytes = 0
        self.skipped: list[dict[str, Any]] = []
        self.converted: collections.Counter[str] = collections.Counter()
        self.finished: list[ShardRecord] = []
        # Publishing (rename, or upload to object storage) runs beside the packing of the
        # next shard; one at a time keeps records in order and local disk use bounded.
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        self._publishing: Future[None] | None = None

    def add(
        self, position: int, members: dict[str, bytes | str], conversion: str | None = None
    ) -> None:
        size = _tar_bytes(members)
        if self.num_samples and self.num_bytes + size > self.options.max_shard_bytes:
            self.close(end=position)
        with self._writing():
            if self._tar is None:
                self._staged = storage.staging_path(self.fs, self._dest())
                self._file = open(self._staged, "wb")  # noqa: SIM115 -- closed in close()
                self._tar = tarfile.open(fileobj=self._file, mode="w|")  # noqa: SIM115
            write_sample(self._tar, members)
        if conversion is not None:
            self.converted[conversion] += 1
        self.num_samples += 1
        self.num_bytes += size
        if self.num_samples == self.options.shard_size:
            self.close(end=position + 1)

    def _dest(self) -> str:
        return storage.join(self.root, shard_name(self.options.shard_stem(self.split), self.index))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write of the open shard (disk full, a read-only folder...): a StorageError
        naming the shard; the staged file is removed by `shutdown`."""
        with storage.redacting_errors("write", where_of(self.fs, self._dest())):
            yield

    def close(self, end: int) -> None:
        assert self._tar is not None and self._file is not None and self._staged is not None
        with self._writing():
            self._tar.close()
            self._file.close()
            num_bytes, sha256 = storage.file_digest(self._staged)
        staged, dest = self._staged, self._dest()
        rows_sha256, figures_sha256 = self.digests(self.start, end)
        record = ShardRecord(
            name=os.path.basename(dest),
            split=self.split,
            index=self.index,
            count=self.num_samples,
            bytes=num_bytes,
            sha256=sha256,
            start=self.start,
            end=end,
            skipped=self.skipped,
            converted=dict(sorted(self.converted.items())),
            rows_sha256=rows_sha256,
            figures_sha256=figures_sha256,
        )
        self.wait()
        self._publishing = self._publisher.submit(self._publish, staged, dest, record)
        self.finished.append(record)
        self.index, self.start = self.index + 1, end
        self._staged, self._file, self._tar = None, None, None
        self.num_samples, self.num_bytes, self.skipped = 0, 0, []
        self.converted = collections.Counter()

    def _publish(self, staged: str, dest: str, record: ShardRecord) -> None:
        retry = self.options.retry_policy()
        url = where_of(self.fs, dest)
        try:
            with open(staged, "rb") as f:
                index = shard_index.build_index(f, record.bytes)
            # The index goes first: a crash between the two leaves an index without its
            # shard (the rerun rewrites both, byte for byte), never a shard without it.
            with storage.redacting_errors("write", shard_index.index_url(url)):
                shard_index.write_index(self.fs, shard_index.index_url(dest), index, retry)
            with storage.redacting_errors("publish", url):
                storage.publish(self.fs, staged, dest, retry)
        finally:
            if os.path.exists(staged):  # publish consumes it; an error before it did not
                os.unlink(staged)
        stored = retried(
            self.fs, retry, "check", dest, lambda: identities.object_identity(self.fs, dest)
        )
        record.stored = stored or ""  # "" (not a file?) matches no listing: rewritten
        # Only now, with the shard in place, is it recorded as done.
        progress_path = storage.join(self.options.progress_folder(self.root), record.name + ".json")
        write_json(self.fs, progress_path, dataclasses.asdict(record), retry)

    def wait(self) -> None:
        """Block until the last shard is published; re-raise its error if it failed."""
        if self._publishing is not None:
            self._publishing.result()
            self._publishing = None

    def shutdown(self) -> None:
        """Drop a shard left open by an error or Ctrl-C (it was never recorded), then wait
        for publishing."""
        if self._staged is not None:
            for stream in (self._tar, self._file):  # a full disk may fail their flushes too
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            os.unlink(self._staged)
            self._staged, self._file, self._tar = None, None, None
        elif storage.is_local(self.fs):
            # A Ctrl-C between the staged file's creation (mkstemp) and `self._staged` being
            # set leaves a file this writer does not know by name: only it writes this
            # shard's name, so its staged files go by their pattern.
            storage.remove_stale_staging_files(self.fs, self.root, os.path.basename(self._dest()))
        self._publisher.shutdown(wait=True)


def write_split(
    samples: list[PlannedSample],
    *,
    split: str,
    figures: dict[str, str],
    options: ShardOptions,
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    done: list[ShardRecord],
    progress: tqdm,
    lock: OutputLock,
) -> tuple[list[ShardRecord], list[dict[str, Any]]]:
    """Write one split from where `done` (its finished shards, in order) left off.
    `figures` holds the identity of every figure (`input_digests`). Returns (all shard
    records, rows skipped after the last shard)."""
    start = done[-1].end if done else 0
    progress.update(start)
    writer = ShardWriterState(
        out_fs,
        out_root,
        options,
        split=split,
        index=len(done),
        start=start,
        digests=lambda first, end: input_digests(samples, figures, start=first, end=end),
    )
    try:
        return _fill_shards(writer, samples, start, options, progress, done, lock)
    finally:
        writer.shutdown()


def _fill_shards(
    writer: ShardWriterState,
    samples: list[PlannedSample],
    start: int,
    options: ShardOptions,
    progress: tqdm,
    done: list[ShardRecord],
    lock: OutputLock,
) -> tuple[list[ShardRecord], list[dict[str, Any]]]:
    figures = load_figures(samples[start:], options)
    for position, (sample, figure) in enumerate(
        zip(samples[start:], figures, strict=True), start=start
    ):
        lock.check()
        if isinstance(figure, FigureError):
            skip = Skip(sample.row, figure.reason, figure.detail, sample.image)
            if options.strict:
                raise ValueError(describe_skip(skip))
            writer.skipped.append(skip.to_json())
        else:
            writer.add(position, sample_members(sample, figure), figure.conversion)
        progress.update(1)
    if writer.num_samples:
        writer.close(end=len(samples))
    writer.wait()
    return done + writer.finished, writer.skipped

"""The evaluation stages: every val shard once, front to back, in order.

    shard_urls -> read_shards -> decode_and_transform -> (batches: stream)

Shards are opened with storage's opener and read by `shard_index.tar_members`, so a
member's size is checked in its tar header, against the shard's size, before it is read.
`group_samples` (a shard's members into samples) is also what inspect_shards and embed
read shards with.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pmc_clip import shard_index, storage
from pmc_clip.data import shard_reader
from pmc_clip.data.counters import RateLimitedWarning, WorkerCounters
from pmc_clip.data.decode import KEPT_EXTENSIONS, SampleDecoder, sample_rng
from pmc_clip.data.shard_runs import SKIPPED_KEY, oversized_member


def _stream_error_handler(counters: WorkerCounters) -> Callable[[BaseException], bool]:
    """webdataset handler: an unreadable shard or a broken tar is warned about, counted,
    and skipped (the stream goes on with the next shard)."""
    warn = RateLimitedWarning("skipped shard data")

    def handler(exc: BaseException) -> bool:
        counters.stream_errors += 1
        texts = [arg for arg in exc.args if isinstance(arg, str)]  # webdataset adds the URL
        text = " ".join(t for i, t in enumerate(texts) if not any(t in u for u in texts[:i]))
        warn(f"{type(exc).__name__}: {storage.redact_url(text)}")
        return True

    return handler


def shard_urls(
    urls: Iterable[str], opener: shard_reader.ShardOpener
) -> Callable[[], Iterator[dict[str, str]]]:
    """The pipeline's source: the worker's shards, in order, each opened ahead (a remote
    one, in a background thread) while the one before it is read."""

    def source() -> Iterator[dict[str, str]]:
        upcoming = iter(urls)
        url = next(upcoming, None)
        try:
            while url is not None:
                following = next(upcoming, None)
                if following is not None:
                    opener.open_ahead(following)
                yield {"url": url}  # read_shards opens it (opener.open) and reads it
                url = following
        finally:
            opener.discard_ahead()

    return source


def read_shards(
    opener: shard_reader.ShardOpener,
    counters: WorkerCounters,
    expected_count: Callable[[str], int | None],
    max_member_bytes: int,
) -> Callable[[Iterable[dict[str, str]]], Iterator[dict[str, Any]]]:
    """Evaluation stage: shard URLs ({url}) -> samples ({__key__, __url__, ext: bytes}),
    members grouped by key as webdataset's group_by_keys groups them.

    Each shard is opened with storage's opener (a local file is refused at once unless it
    is a regular file; remote URLs are read with retried range requests) and read through
    shard_index.tar_members, so sizes are checked before reading: a member claiming more
    bytes than the shard holds stops the shard at once, a kept member over
    `max_member_bytes` is not read (SKIPPED_KEY: a bad sample), and members that are not
    an image, caption or json (.pyd/.pth pickles) are skipped over unread. A shard that
    cannot be opened or read to its end is warned about with its URL (redacted) and
    counted (stream_errors); the stream goes on with the next one. Where a shard delivers
    fewer samples than its manifest count the missing ones are counted (samples_missing),
    where more the unlisted ones (samples_unlisted), with a warning unless a stream error
    already named the shard."""
    on_error = _stream_error_handler(counters)
    warn = RateLimitedWarning("shard count")

    def check(url: str, count: int, failed: bool) -> None:
        expected = expected_count(url)
        if expected is None or count == expected:
            return
        if count < expected:
            counters.samples_missing += expected - count
            if not failed:
                warn(
                    f"{storage.redact_url(url)} ended after {count} of its {expected} "
                    "samples (truncated?)"
                )
        else:
            counters.samples_unlisted += count - expected
            warn(
                f"{storage.redact_url(url)} holds {count} samples, its manifest lists "
                f"{expected} (a manifest of another version?)"
            )

    def stage(sources: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for source in sources:
            url, count, failed = source["url"], 0, False
            try:
                with opener.open(url) as stream:
                    for sample in _shard_samples(url, stream, max_member_bytes):
                        count += 1
                        yield sample
            except Exception as exc:  # unreadable, broken or hostile: skip the rest
                exc.args = (*exc.args, url)  # named as webdataset's own stages name it
                on_error(exc)
                failed = True
            check(url, count, failed)

    return stage


def _shard_samples(url: str, stream: Any, max_member_bytes: int) -> Iterator[dict[str, Any]]:
    # "r|": a plain tar only; a compressed stream is "not a readable tar", never inflated.
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        members = shard_index.tar_members(tar, _shard_size(stream))
        yield from group_samples(members, url, max_member_bytes)


def group_samples(
    members: Iterable[shard_index.TarMember], url: str, max_member_bytes: int
) -> Iterator[dict[str, Any]]:
    """A shard's members (shard_index.tar_members) -> the samples the loader decodes
    ({__key__, __url__, ext: bytes}): consecutive members of one key, as webdataset's
    group_by_keys makes them. Only images, `.txt` and `.json` within `max_member_bytes`
    are read; one over it, or a second member of an extension, makes the sample bad
    (SKIPPED_KEY). Where the shard stops (a broken or hostile member) the sample read so
    far comes out before the error (decoding tells whether it is whole)."""
    sample: dict[str, Any] | None = None
    try:
        for member in members:
            if not member.in_sample or member.key is None:
                continue  # as webdataset: folders, links, meta files, names without extension
            if sample is None or member.key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": member.key, "__url__": url}
            extension, size = member.extension, member.info.size
            if extension not in KEPT_EXTENSIONS:
                continue
            if extension in sample:
                sample.setdefault(SKIPPED_KEY, []).append(f"two .{extension} members")
            elif size > max_member_bytes:
                reason = oversized_member(extension, size=size, max_member_bytes=max_member_bytes)
                sample.setdefault(SKIPPED_KEY, []).append(reason)
            else:
                sample[extension] = member.read()
    except Exception:
        if sample is not None:
            yield sample
        raise
    if sample is not None:
        yield sample


def _shard_size(stream: Any) -> int | None:
    """Bytes of an opened shard: a range reader's (object stores), a regular file's
    (local, node cache); None for a `pipe:` (tar_members then stops at its first missing
    byte instead)."""
    raw = getattr(stream, "raw", None)
    if isinstance(raw, shard_reader.RangeReader):
        return raw.size_bytes
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def decode_and_transform(
    samples: Iterable[dict[str, Any]], decoder: SampleDecoder, seed: int
) -> Iterator[dict[str, Any]]:
    """Evaluation stage: bad samples are dropped (counted)."""
    for sample in samples:
        decoded = decoder(sample, sample_rng(seed=seed, epoch=0, key=sample["__key__"]))
        if decoded is not None:
            yield decoded

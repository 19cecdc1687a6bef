"""A sample index beside every shard: `X.tar` -> `X.idx`, so a reader can fetch any run
of consecutive samples with one byte-range request instead of streaming the shard.

What an index holds (one shard of N samples and M members):

    sample_offsets  int64 [N+1]  where sample i's first tar header starts (a PAX extended
                                 header or GNU longname block in front of it included);
                                 [N] is just past the last sample's padded data, where the
                                 end-of-archive blocks start
    keys            str   [N]    webdataset's sample keys (`__key__`)
    member_starts   int64 [N+1]  sample i's members are members[starts[i]:starts[i+1]]
    member_extensions str [M]    the sample-dict key of each member (lower case, as
                                 webdataset's group_by_keys makes it: "jpg", "txt")
    member_offsets  int64 [M]    where each member's data starts
    member_sizes    int64 [M]    each member's data size in bytes
    shard_bytes, format_version  scalars

The contract: the bytes [sample_offsets[i], sample_offsets[j]) of the shard, read as a
tar stream by webdataset (tar_file_iterator + group_by_keys), give exactly samples
i..j-1. Members webdataset skips (folders, links, `__*__` meta files) may sit inside a
range; they are skipped there too. An index is only written for shards that keep the
contract: a key that comes back after another sample, a member without an extension, a
sparse member or a global PAX header that renames members stop `build_index`.

The file is numpy's `.npz` (a zip of `.npy` arrays, deflated): compact (keys compress
well), a standard format any numpy reads, and loaded with `allow_pickle=False` -- reading
an index never runs code from the file. The zip entries carry a fixed timestamp, so the
same shard always gives the same index bytes (make_shards' resume promises identical
output). Build or refresh indexes with `python tools/index_shards.py 'SHARDS'`.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import fsspec
import numpy as np

from pmc_clip import storage

INDEX_SUFFIX = ".idx"
INDEX_FORMAT_VERSION = 1
INDEX_TOOL = "python tools/index_shards.py"  # what every index error tells to run
REBUILD_HINT = f"rebuild it with: {INDEX_TOOL} 'SHARDS' --force"
# np.savez stamps each zip entry with the current time; a fixed one keeps bytes stable.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_ARRAYS = (
    "sample_offsets",
    "keys",
    "member_starts",
    "member_extensions",
    "member_offsets",
    "member_sizes",
)
# Global PAX records that change what a member is called or how long it is: a range
# read starting after the global header would not see them.
_GLOBAL_PAX_KEYS_REFUSED = ("path", "size")


def index_url(shard_url: str) -> str:
    """`.../name.tar` -> `.../name.idx` (a path or any fsspec URL)."""
    if not shard_url.endswith(".tar"):
        raise ValueError(
            f"{storage.redact_url(shard_url)}: a shard index sits beside a `.tar` shard, "
            "and this does not end in .tar"
        )
    return shard_url[: -len(".tar")] + INDEX_SUFFIX


@dataclass(frozen=True, eq=False)
class ShardIndex:
    shard_bytes: int
    sample_offsets: np.ndarray
    keys: np.ndarray
    member_starts: np.ndarray
    member_extensions: np.ndarray
    member_offsets: np.ndarray
    member_sizes: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def byte_range(self, first: int, stop: int) -> tuple[int, int]:
        """Bytes [start, end) of the shard that hold samples first..stop-1."""
        if not 0 <= first < stop <= self.num_samples:
            raise ValueError(
                f"sample range [{first}, {stop}) is not a non-empty part of [0, {self.num_samples})"
            )
        return int(self.sample_offsets[first]), int(self.sample_offsets[stop])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardIndex):
            return NotImplemented
        return self.shard_bytes == other.shard_bytes and all(
            np.array_equal(getattr(self, name), getattr(other, name)) for name in _ARRAYS
        )

    def to_bytes(self) -> bytes:
        """The `.npz` file: what np.savez_compressed writes, with fixed entry timestamps."""
        arrays = {
            "format_version": np.int64(INDEX_FORMAT_VERSION),
            "shard_bytes": np.int64(self.shard_bytes),
            **{name: getattr(self, name) for name in _ARRAYS},
        }
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, value in arrays.items():
                entry = io.BytesIO()
                np.lib.format.write_array(entry, np.asarray(value), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
                archive.writestr(info, entry.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> ShardIndex:
        """Parse an index file; `name` (already redacted) is what errors call it."""

        def invalid(reason: str) -> ValueError:
            return ValueError(f"{name}: not a valid shard index ({reason}); {REBUILD_HINT}")

        arrays: dict[str, np.ndarray] | None = None
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    arrays = {key: loaded[key] for key in loaded.files}
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            raise invalid(f"{type(exc).__name__}: {exc}") from None
        if arrays is None:
            raise invalid("a single array, not an .npz file")
        missing = sorted({"format_version", "shard_bytes", *_ARRAYS} - set(arrays))
        if missing:
            raise invalid(f"no {', '.join(missing)}")
        version, shard_bytes = arrays["format_version"], arrays["shard_bytes"]
        if version.shape != () or version.dtype.kind != "i":
            raise invalid(f"format version {version!r}")
        if int(version) != INDEX_FORMAT_VERSION:
            raise invalid(f"format version {version}, this code reads {INDEX_FORMAT_VERSION}")
        if shard_bytes.shape != () or shard_bytes.dtype.kind != "i":
            raise invalid(f"shard_bytes {shard_bytes!r}")
        index = cls(int(shard_bytes), *(arrays[name] for name in _ARRAYS))
        problem = index._problem()
        if problem is not None:
            raise invalid(problem)
        return index

    def _problem(self) -> str | None:
        """Why the arrays cannot describe a shard, or None: checked on load, so a reader
        never turns a damaged index into wrong byte ranges."""
        for name in _ARRAYS:
            array = getattr(self, name)
            wanted = "U" if name in ("keys", "member_extensions") else "i"
            if array.ndim != 1 or array.dtype.kind != wanted:
                return f"{name} is {array.dtype} of shape {array.shape}"
        num_samples, num_members = len(self.keys), len(self.member_extensions)
        if len(self.sample_offsets) != num_samples + 1 or len(self.member_starts) != (
            num_samples + 1
        ):
            return "sample_offsets, member_starts and keys disagree on the sample count"
        if len(self.member_offsets) != num_members or len(self.member_sizes) != num_members:
            return "the member arrays differ in length"
        if self.member_starts[0] != 0 or self.member_starts[-1] != num_members:
            return "member_starts does not cover the members"
        if np.any(np.diff(self.member_starts) < 1) or np.any(np.diff(self.sample_offsets) < 1):
            return "sample offsets or member starts do not increase"
        if self.sample_offsets[0] < 0 or self.sample_offsets[-1] > self.shard_bytes:
            return f"sample offsets outside the shard's {self.shard_bytes} bytes"
        if num_members and (
            np.any(self.member_sizes < 0)
            # every member's data has its header block in front of it
            or np.any(self.member_offsets < self.sample_offsets[0] + tarfile.BLOCKSIZE)
            or np.any(self.member_offsets + self.member_sizes > self.sample_offsets[-1])
        ):
            return "member bytes outside the samples"
        return None


class _CountingReader:
    """Counts the bytes tarfile reads through it (the shard's length, once drained)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.num_bytes = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.num_bytes += len(data)
        return data


def build_index(fileobj: IO[bytes], shard_bytes: int) -> ShardIndex:
    """Index a shard read once, sequentially, from `fileobj` (`shard_bytes` long).

    Members are grouped into samples exactly as webdataset 1.0.2 reads them. Member data
    is skipped, never held in memory. ValueError (naming the member) for anything that
    would make a byte-range read of the shard differ from a full read, and for a member
    whose header claims more bytes than the shard holds (`tar_members`).
    """
    keys: list[str] = []
    seen: set[str] = set()
    sample_offsets: list[int] = []
    member_starts: list[int] = []
    extensions: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    end = 0
    counted = _CountingReader(fileobj)
    try:
        # "r|": a plain tar read as a stream (offsets in a compressed file mean nothing).
        # (`counted` is duck-typed: tarfile only calls its read.)
        with tarfile.open(fileobj=counted, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar_members(tar, shard_bytes):
                if not member.in_sample:
                    continue
                key, extension = member.key, member.extension
                if key is None:
                    raise ValueError(
                        f"member {member.name!r} has no extension: webdataset would drop it"
                    )
                if member.info.issparse():
                    raise ValueError(f"member {member.name!r} is a sparse file")
                if not keys or key != keys[-1]:
                    if key in seen:
                        raise ValueError(
                            f"member {member.name!r}: sample {key!r} comes back after "
                            "other samples (its members must be consecutive)"
                        )
                    seen.add(key)
                    keys.append(key)
                    # For a long name, tarfile reports the offset of the extended header
                    # (PAX or GNU longname) in front of the member: where a reader starts.
                    sample_offsets.append(member.info.offset)
                    member_starts.append(len(extensions))
                elif extension in extensions[member_starts[-1] :]:
                    raise ValueError(
                        f"member {member.name!r}: sample {key!r} has two {extension!r} members"
                    )
                extensions.append(extension)
                offsets.append(member.info.offset_data)
                sizes.append(member.info.size)
                end = tar.offset  # the next header: this member's data, padded to a block
            global_keys = sorted(set(_GLOBAL_PAX_KEYS_REFUSED) & set(tar.pax_headers))
            if global_keys:
                raise ValueError(
                    f"a global PAX header sets {global_keys} for every later member; a "
                    "range read after it would see other names or sizes"
                )
            end_of_archive = tar.offset  # the header position tarfile stopped at
    except tarfile.TarError as exc:
        raise ValueError(f"not a readable tar: {exc}") from None
    while counted.read(1 << 20):  # the end-of-archive blocks and record padding
        pass
    if counted.num_bytes != shard_bytes:
        raise ValueError(f"the shard is {counted.num_bytes} bytes, expected {shard_bytes}")
    # tarfile ends quietly where a header is missing or cut short; only the two zero
    # blocks of a complete archive tell an intact shard from one cut at a member boundary.
    if end_of_archive + 2 * tarfile.BLOCKSIZE > shard_bytes:
        raise ValueError(
            f"no end-of-archive blocks after byte {end_of_archive}: the shard is truncated"
        )
    return ShardIndex(
        shard_bytes=shard_bytes,
        sample_offsets=np.array([*sample_offsets, end], dtype=np.int64),
        keys=np.array(keys, dtype=str),
        member_starts=np.array([*member_starts, len(extensions)], dtype=np.int64),
        member_extensions=np.array(extensions, dtype=str),
        member_offsets=np.array(offsets, dtype=np.int64),
        member_sizes=np.array(sizes, dtype=np.int64),
    )


@dataclass(frozen=True)
class TarMember:
    """A member of a shard: its header, whether webdataset puts it into a sample (a
    regular file, not a `__meta__` one), and then the sample key and extension its
    group_by_keys gives it (key None: the name has no extension). `read()` returns a
    sample member's data; a member nobody reads is skipped over by `tar_members`."""

    info: tarfile.TarInfo
    in_sample: bool
    key: str | None
    extension: str
    tar: tarfile.TarFile

    @property
    def name(self) -> str:
        return self.info.name

    def read(self) -> bytes:
        data = self.tar.extractfile(self.info)
        assert data is not None  # a regular file (tar_members passes no other)
        return data.read()


# Bytes of a member nobody reads, skipped per read call (memory held while skipping).
_SKIP_CHUNK_BYTES = 1 << 20


def tar_members(tar: tarfile.TarFile, shard_bytes: int | None) -> Iterator[TarMember]:
    """The members of `tar`, opened in stream mode ("r|"), with bounded time and memory
    whatever the headers claim.

    Every reader of a whole shard goes through here (evaluation, index building,
    inspect_shards). A header is trusted only as far as the bytes go: a member whose data
    would end past `shard_bytes` (the shard's size, None where unknown: a `pipe:`) is a
    ValueError before anything is read or skipped, and a member the caller leaves unread
    is skipped in chunks of at most 1 MiB, a tarfile.ReadError at the first missing byte.
    (tarfile's own skip would, at the end of the data, loop once per 10 KiB the header
    claims: hours for a size field of 2**60.)
    """
    for info in tar:
        # Stream mode keeps every TarInfo otherwise (an attribute typeshed does not list).
        tar.members = []  # type: ignore[attr-defined]
        # tar.offset: where tarfile will look for the next header, past this member's data
        if shard_bytes is not None and tar.offset > shard_bytes:
            raise ValueError(
                f"member {info.name!r} claims {info.size} bytes at byte {info.offset_data}, "
                f"which end past the shard's {shard_bytes} bytes: the shard is truncated or "
                "the member's header is damaged"
            )
        in_sample = is_sample_member(info)
        key, extension = split_member_name(info.name) if in_sample else (None, None)
        yield TarMember(info, in_sample, key, (extension or "").lower(), tar)  # lcase=True
        _skip_to(tar, info)


def _skip_to(tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
    """Read past what is left of `info`'s data (to the next header, `tar.offset`)."""
    stream = tar.fileobj
    assert stream is not None
    while (left := tar.offset - stream.tell()) > 0:
        if not stream.read(min(left, _SKIP_CHUNK_BYTES)):
            raise tarfile.ReadError(
                f"unexpected end of data: the shard ends inside member {info.name!r}, whose "
                f"header claims {info.size} bytes"
            )


# webdataset's reading rules, as its tariterators has them (tar_file_iterator's meta_prefix,
# meta_suffix and default skip_meta; base_plus_ext's split): written here because
# importing webdataset imports torch, ~2.5 s of CPU in make_shards' main process, which
# indexes every shard it writes. tests/test_shard_index.py pins them to webdataset's own.
_META_PREFIX = _META_SUFFIX = "__"
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def is_sample_member(member: tarfile.TarInfo) -> bool:
    """Whether webdataset's tar_file_iterator passes `member` on to group_by_keys."""
    name = member.name
    if not member.isreg():
        return False
    if "/" not in name and name.startswith(_META_PREFIX) and name.endswith(_META_SUFFIX):
        return False
    return not _SKIP_META.match(name)


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """(key, extension) as webdataset's base_plus_ext splits a member name: at the first
    dot of its last path component; (None, None) without one."""
    match = _KEY_AND_EXTENSION.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def read_index(fs: fsspec.AbstractFileSystem, path: str, name: str) -> ShardIndex:
    """The index at `path`; `name` (redacted) is what errors call it. FileNotFoundError
    when there is none."""
    return ShardIndex.from_bytes(storage.read_bytes(fs, path), name)


def write_index(
    fs: fsspec.AbstractFileSystem,
    path: str,
    index: ShardIndex,
    retry: storage.RetryPolicy | None = None,
) -> None:
    """Publish `index` at `path` whole or not at all (storage.write_bytes_atomic)."""
    storage.write_bytes_atomic(fs, path, index.to_bytes(), retry)

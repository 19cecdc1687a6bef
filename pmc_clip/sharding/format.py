"""The shard output's format, as make_shards writes it and every reader reads it.

    PREFIX-SPLIT-NNNNNN.tar               a shard (a part's: PREFIX-SPLIT-partIIIII-NNNNNN.tar)
    PREFIX-SPLIT-NNNNNN.idx               its sample index (pmc_clip/shard_index.py)
    sizes.json                            {shard name: samples}: the file OpenCLIP reads
    manifest.json                         `Manifest`: per shard count, bytes, sha256;
                                          options; totals per split with a brace pattern
    skipped.jsonl                         every row not written: row, image, reason, detail
    _progress/                            `ShardRecord`s (one per finished shard), options,
                                          the run's lock; a part's in _progress/part-IIIII/,
                                          with its `PartSummary`

`Manifest` is the typed reader and writer of manifest.json (`Manifest.load`,
`build_manifest`, `write_listings`); `listed_counts` reads the sample counts of either
listing file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pmc_clip import shard_index, storage
from pmc_clip.sharding.store import where_of, write_json

MANIFEST_VERSION = 1
PROGRESS_DIR = "_progress"
# A finished part's manifest, in its progress folder: what `make_shards --merge` reads.
PART_SUMMARY = "summary.json"
MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
SKIPPED_FILE = "skipped.jsonl"
# The files that list shards with their sample counts, the one readers prefer first.
LISTING_FILES = (SIZES_FILE, MANIFEST_FILE)


def merged_listing_paths(out_root: str) -> list[str]:
    """The output's manifest.json and sizes.json: what lists every shard (of every part,
    once merged), removed before any shard they list is rewritten or found gone."""
    return [storage.join(out_root, name) for name in (MANIFEST_FILE, SIZES_FILE)]


def part_folder(out_root: str, part: int) -> str:
    """Part `part`'s progress records, lock and summary (`make_shards --part`)."""
    return storage.join(out_root, PROGRESS_DIR, f"part-{part:05d}")


def shard_name(stem: str, index: int) -> str:
    """`stem` is `ShardOptions.shard_stem(split)`."""
    return f"{stem}-{index:06d}.tar"


def index_name(shard: str) -> str:
    return shard_index.index_url(shard).rsplit("/", 1)[-1]


@dataclass
class ShardRecord:
    """What _progress/ and the manifest keep about one finished shard."""

    name: str
    split: str
    index: int
    count: int
    bytes: int
    sha256: str
    start: int  # first plan position covered (samples and skips)
    end: int  # one past the last plan position covered
    skipped: list[dict[str, Any]]
    converted: dict[str, int] = field(default_factory=dict)  # samples per conversion reason
    # What the shard was made from (`input_digests` of its plan positions), and the
    # stored file's identity (identities.file_identities) once published: a rerun reuses
    # the shard only while all three still hold.
    rows_sha256: str = ""
    figures_sha256: str = ""
    stored: str = ""


@dataclass(frozen=True)
class ShardEntry:
    """One shard in manifest.json. What verifying a shard needs comes first: a manifest
    written by hand for inspect_shards may list only that."""

    name: str
    count: int
    bytes: int
    sha256: str
    split: str = ""


@dataclass(frozen=True)
class SplitSummary:
    """One split in manifest.json; `pattern` names its shards as --train-data takes them."""

    samples: int
    shards: int
    bytes: int
    pattern: str


@dataclass(frozen=True)
class RowCounts:
    """What became of the input's rows: read = written + skipped."""

    read: int
    written: int
    skipped: int
    skipped_by_reason: dict[str, int]
    converted: int
    converted_by_reason: dict[str, int]


@dataclass(frozen=True)
class Manifest:
    """manifest.json. `options` is `ShardOptions.fingerprint()`; `parts` is set when the
    output was written in parts and merged."""

    format_version: int
    options: dict[str, Any]
    shards: list[ShardEntry]
    splits: dict[str, SplitSummary]
    rows: RowCounts
    parts: int | None = None

    def to_json(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        if self.parts is None:
            del document["parts"]
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Manifest:
        """KeyError or TypeError when `document` is not a manifest."""
        return cls(
            format_version=document["format_version"],
            options=document["options"],
            shards=[ShardEntry(**entry) for entry in document["shards"]],
            splits={name: SplitSummary(**s) for name, s in document["splits"].items()},
            rows=RowCounts(**document["rows"]),
            parts=document.get("parts"),
        )

    @classmethod
    def load(cls, fs: fsspec.AbstractFileSystem, folder: str) -> Manifest:
        """The manifest.json in `folder`; FileNotFoundError when there is none."""
        return cls.from_json(
            json.loads(storage.read_bytes(fs, storage.join(folder, MANIFEST_FILE)))
        )


def read_shard_entries(fs: fsspec.AbstractFileSystem, folder: str) -> list[ShardEntry]:
    """The shards the manifest.json in `folder` lists, reading only its `shards` (what
    verifying them needs); FileNotFoundError when there is none."""
    document = json.loads(storage.read_bytes(fs, storage.join(folder, MANIFEST_FILE)))
    return [ShardEntry(**entry) for entry in document["shards"]]


def listed_counts(file_name: str, document: Any) -> list[tuple[Any, Any]]:
    """(shard name, samples) pairs of a parsed listing file (`LISTING_FILES`), unchecked;
    AttributeError, KeyError or TypeError when the document is not one."""
    if file_name == SIZES_FILE:
        return list(document.items())
    return [(entry["name"], entry["count"]) for entry in document["shards"]]


def build_manifest(
    fingerprint: dict[str, Any],
    records: dict[str, list[ShardRecord]],
    skips: list[dict[str, Any]],
    num_rows: int,
) -> Manifest:
    """The manifest of `records` (per split, in order); `fingerprint` is
    `ShardOptions.fingerprint()`, shared by every part of one output."""
    shards = [r for split in sorted(records) for r in records[split]]
    num_written = sum(r.count for r in shards)
    by_reason = collections.Counter(s["reason"] for s in skips)
    converted: collections.Counter[str] = collections.Counter()
    for record in shards:
        converted.update(record.converted)
    return Manifest(
        format_version=MANIFEST_VERSION,
        options=fingerprint,
        shards=[
            ShardEntry(name=r.name, split=r.split, count=r.count, bytes=r.bytes, sha256=r.sha256)
            for r in shards
        ],
        splits={
            split: SplitSummary(
                samples=sum(r.count for r in rs),
                shards=len(rs),
                bytes=sum(r.bytes for r in rs),
                pattern=brace_pattern(f"{fingerprint['prefix']}-{split}-", rs),
            )
            for split, rs in sorted(records.items())
        },
        rows=RowCounts(
            read=num_rows,
            written=num_written,
            skipped=len(skips),
            skipped_by_reason=dict(sorted(by_reason.items())),
            converted=sum(converted.values()),
            converted_by_reason=dict(sorted(converted.items())),
        ),
    )


def brace_pattern(base: str, records: Sequence[ShardRecord]) -> str:
    """One pattern for a split's shards, as --train-data takes it: `BASE{000000..000131}.tar`,
    or for parts `BASE{part00000-{000000..000041},part00001-{000000..000043}}.tar` (each
    part's shards are numbered from 0; braceexpand nests)."""
    counts: dict[str, int] = {}  # stem after `base` -> shards, in order
    for record in records:
        stem = record.name[len(base) :].removesuffix(".tar")[:-7]  # drop "-NNNNNN"
        assert record.name.startswith(base) and record.index == counts.get(stem, 0), record
        counts[stem] = record.index + 1
    ranges = [f"{stem}{'-' if stem else ''}{{{0:06d}..{n - 1:06d}}}" for stem, n in counts.items()]
    if not ranges:
        return ""
    return f"{base}{ranges[0] if len(ranges) == 1 else '{' + ','.join(ranges) + '}'}.tar"


def write_listings(
    fs: fsspec.AbstractFileSystem,
    out_root: str,
    manifest: Manifest,
    skips: list[dict[str, Any]],
    retry: storage.RetryPolicy,
) -> None:
    """The output's sizes.json (OpenCLIP's format), skipped.jsonl, then manifest.json: the
    manifest last, so one that exists describes the files beside it."""
    sizes = {entry.name: entry.count for entry in manifest.shards}
    write_json(fs, storage.join(out_root, SIZES_FILE), sizes, retry)
    skipped_text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skips)
    skipped_path = storage.join(out_root, SKIPPED_FILE)
    with storage.redacting_errors("write", where_of(fs, skipped_path)):
        storage.write_bytes_atomic(fs, skipped_path, skipped_text.encode("utf-8"), retry)
    write_json(fs, storage.join(out_root, MANIFEST_FILE), manifest.to_json(), retry)


@dataclass(frozen=True)
class PartSummary:
    """What `make_shards --merge` needs of a finished part (`PART_SUMMARY`): its manifest,
    plus its shard records (with the stored files' identities, checked against a listing
    at merge), its skipped rows and the row count of the whole input (every part must
    agree). Stored as the manifest's fields with these beside them."""

    manifest: Manifest
    part: int
    num_parts: int
    input_rows: int
    records: list[ShardRecord]
    skipped: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.manifest.to_json(),
            "part": self.part,
            "num_parts": self.num_parts,
            "input_rows": self.input_rows,
            "records": [dataclasses.asdict(r) for r in self.records],
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> PartSummary:
        return cls(
            manifest=Manifest.from_json(document),
            part=document["part"],
            num_parts=document["num_parts"],
            input_rows=document["input_rows"],
            records=[ShardRecord(**r) for r in document["records"]],
            skipped=document["skipped"],
        )

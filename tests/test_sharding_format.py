"""pmc_clip/sharding/format.py: shard names, brace patterns, and manifest.json written and
read back through the typed `Manifest`."""

from __future__ import annotations

import json
from pathlib import Path

import braceexpand
import fsspec
import pytest

from pmc_clip import storage
from pmc_clip.sharding.format import (
    Manifest,
    PartSummary,
    ShardRecord,
    brace_pattern,
    build_manifest,
    index_name,
    listed_counts,
    shard_name,
    write_listings,
)


def _record(name: str, split: str, index: int, count: int = 3, **kwargs: object) -> ShardRecord:
    return ShardRecord(
        name=name,
        split=split,
        index=index,
        count=count,
        bytes=10 * count,
        sha256="ab" * 32,
        start=0,
        end=count,
        skipped=[],
        **kwargs,  # type: ignore[arg-type]
    )


def test_shard_and_index_names() -> None:
    assert shard_name("pmc-oa-train", 7) == "pmc-oa-train-000007.tar"
    assert shard_name("pmc-oa-train-part00002", 0) == "pmc-oa-train-part00002-000000.tar"
    assert index_name("pmc-oa-train-000007.tar") == "pmc-oa-train-000007.idx"


def test_brace_pattern_names_every_shard_of_a_split_once() -> None:
    records = [_record(shard_name("p-train", i), "train", i) for i in range(3)]
    pattern = brace_pattern("p-train-", records)
    assert pattern == "p-train-{000000..000002}.tar"
    assert list(braceexpand.braceexpand(pattern)) == [r.name for r in records]
    assert brace_pattern("p-train-", []) == ""


def test_brace_pattern_of_parts_nests_one_range_per_part() -> None:
    records = [
        _record(shard_name("p-train-part00000", 0), "train", 0),
        _record(shard_name("p-train-part00000", 1), "train", 1),
        _record(shard_name("p-train-part00001", 0), "train", 0),
    ]
    pattern = brace_pattern("p-train-", records)
    assert pattern == "p-train-{part00000-{000000..000001},part00001-{000000..000000}}.tar"
    assert list(braceexpand.braceexpand(pattern)) == [r.name for r in records]


def test_manifest_counts_rows_shards_and_conversions() -> None:
    records = {
        "train": [
            _record("p-train-000000.tar", "train", 0, 4, converted={"exif_orientation": 1}),
            _record("p-train-000001.tar", "train", 1, 2),
        ],
        "test": [_record("p-test-000000.tar", "test", 0, 1)],
    }
    skips = [{"row": 9, "image": None, "reason": "empty_caption", "detail": "caption is empty"}]
    manifest = build_manifest({"prefix": "p"}, records, skips, 8)
    assert [entry.name for entry in manifest.shards] == [
        "p-test-000000.tar",
        "p-train-000000.tar",
        "p-train-000001.tar",
    ]
    assert manifest.splits["train"].samples == 6 and manifest.splits["train"].shards == 2
    assert manifest.splits["train"].bytes == 60
    assert manifest.splits["test"].pattern == "p-test-{000000..000000}.tar"
    assert (manifest.rows.read, manifest.rows.written, manifest.rows.skipped) == (8, 7, 1)
    assert manifest.rows.skipped_by_reason == {"empty_caption": 1}
    assert manifest.rows.converted_by_reason == {"exif_orientation": 1}
    assert "parts" not in manifest.to_json()


def test_listings_written_and_read_back(tmp_path: Path) -> None:
    records = {"train": [_record("p-train-000000.tar", "train", 0, 3)]}
    skips = [{"row": 3, "image": "a.jpg", "reason": "missing_file", "detail": "gone"}]
    manifest = build_manifest({"prefix": "p", "seed": 0}, records, skips, 4)
    fs = fsspec.filesystem("file")
    write_listings(fs, str(tmp_path), manifest, skips, storage.RetryPolicy())

    assert Manifest.load(fs, str(tmp_path)) == manifest
    document = json.loads((tmp_path / "manifest.json").read_text())
    assert Manifest.from_json(document).to_json() == document
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"p-train-000000.tar": 3}
    assert listed_counts("sizes.json", sizes) == listed_counts("manifest.json", document)
    lines = (tmp_path / "skipped.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == skips


def test_a_document_that_is_not_a_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        Manifest.from_json({"format_version": 1})
    with pytest.raises(FileNotFoundError):
        Manifest.load(fsspec.filesystem("file"), str(tmp_path))
    with pytest.raises(AttributeError):
        listed_counts("sizes.json", [1, 2])


def test_part_summary_round_trip() -> None:
    records = {"train": [_record("p-train-part00001-000000.tar", "train", 0, 2, stored="x")]}
    manifest = build_manifest({"prefix": "p"}, records, [], 2)
    summary = PartSummary(
        manifest, part=1, num_parts=3, input_rows=7, records=records["train"], skipped=[]
    )
    document = json.loads(json.dumps(summary.to_json()))
    assert PartSummary.from_json(document) == summary
    assert {**manifest.to_json(), "part": 1}.items() <= document.items()

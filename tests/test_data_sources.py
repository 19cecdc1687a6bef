"""pmc_clip.data.sources on small folders: sample counts from sizes.json or manifest.json,
a spec's sources, weights and samples per epoch, and the errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pmc_clip.data.sources import read_shard_sizes, resolve_dataset


def _folder(root: Path, document: dict[str, object], name: str = "sizes.json") -> Path:
    root.mkdir()
    (root / name).write_text(json.dumps(document))
    return root


def test_counts_come_from_sizes_json_or_the_manifest(tmp_path: Path) -> None:
    sizes = _folder(tmp_path / "a", {"s-0.tar": 3, "s-1.tar": 4})
    manifest = {"shards": [{"name": "m-0.tar", "count": 5}]}
    listed = _folder(tmp_path / "b", manifest, "manifest.json")
    urls = [str(sizes / "s-0.tar"), str(sizes / "s-1.tar"), str(listed / "m-0.tar")]
    assert read_shard_sizes(urls) == dict(zip(urls, [3, 4, 5], strict=True))
    assert read_shard_sizes([str(tmp_path / "x.tar")]) is None  # neither file: unknown
    assert read_shard_sizes([f"pipe:cat {urls[0]}"]) is None
    with pytest.raises(ValueError, match=r"s-2\.tar is not listed in the sizes.json"):
        read_shard_sizes([str(sizes / "s-2.tar")])


def test_a_spec_resolves_to_its_sources_weights_and_epoch_length(tmp_path: Path) -> None:
    first = _folder(tmp_path / "a", {"s-0.tar": 3, "s-1.tar": 4})
    second = _folder(tmp_path / "b", {"t-0.tar": 10})
    spec = f"{first}/s-{{0..1}}.tar::{second}/t-0.tar"
    dataset = resolve_dataset(spec, None, weights=(1.0, 2.5))
    assert dataset.num_samples == 7 + 25  # upsampling factor x samples, per source
    assert dataset.urls == [f"{first}/s-0.tar", f"{first}/s-1.tar", f"{second}/t-0.tar"]
    assert dataset.weights == [1.0, 1.0, 2.5]
    assert dataset.shard_size(f"{second}/t-0.tar") == 10
    assert dataset.shard_size(f"{tmp_path}/other.tar") is None
    assert resolve_dataset(spec, 99).num_samples == 99  # the override, no manifest read


def test_a_source_of_unknown_size_names_the_flag_to_pass(tmp_path: Path) -> None:
    spec = f"{tmp_path}/v-{{0..1}}.tar"
    with pytest.raises(ValueError, match="pass --val-num-samples"):
        resolve_dataset(spec, None, flag="--val-data")
    dataset = resolve_dataset(spec, None, need_sizes=False)  # training: indexes count
    assert dataset.sources[0].shard_sizes is None and dataset.num_samples == 0

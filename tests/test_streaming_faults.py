"""Streaming faults not covered by tests/test_data.py (corrupt members, pickles) and
tests/test_streaming_s3.py (503s, dropped and reset connections, stalls, an object that
never reads): a truncated shard and a missing shard, on local disk and on S3. The epoch
completes, every readable sample arrives once, the counters and the warnings name what was
skipped, and nothing hangs (every read runs under a deadline)."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import pytest
from helpers_data import IMAGE_SIZE, caption_tokenizer, collect, keys_of, make_figures, write_shards

from pmc_clip.config import DataConfig
from pmc_clip.data.loaders import build_eval_loader
from pmc_clip.tokenize import CaptionTokenizer

TRUNCATED = "pmc-oa-train-000001.tar"
MISSING = "pmc-oa-train-000002.tar"


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_figures(tmp_path_factory.mktemp("figures"), 8)  # 32 samples


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CaptionTokenizer:
    return caption_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture()
def local_shards(figures: tuple[str, str], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """32 samples in 4 local shards of 8, written by make_shards: (folder, manifest)."""
    local = tmp_path / "shards"
    return local, write_shards(*figures, output=str(local), shard_size=8)


def _keys_by_shard(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def _complete_keys(shard: Path, cut: int) -> set[str]:
    """Keys whose every member (header and data) lies within the first `cut` bytes."""
    ends: dict[str, int] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            ends[key] = max(ends.get(key, 0), member.offset_data + member.size)
    return {key for key, end in ends.items() if end <= cut}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_truncated_and_missing_shards_are_skipped_counted_and_named(
    where: str,
    figures: tuple[str, str],
    local_shards: tuple[Path, dict[str, Any]],
    tokenizer: CaptionTokenizer,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    local, manifest = local_shards
    assert manifest["splits"]["train"]["shards"] == 4
    keys = {
        name: _keys_by_shard(local / name) for name in sorted(p.name for p in local.glob("*.tar"))
    }
    data = (local / TRUNCATED).read_bytes()
    cut = len(data) // 2  # in the middle of a member
    readable = _complete_keys(local / TRUNCATED, cut)
    assert 0 < len(readable) < 8
    if where == "local":
        root = str(local)
        (local / TRUNCATED).write_bytes(data[:cut])
        (local / MISSING).unlink()
    else:
        root = f"{request.getfixturevalue('s3_bucket')}/shards"
        write_shards(*figures, output=root, shard_size=8)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.pipe_file(f"{root}/{TRUNCATED}", data[:cut])
        fs.rm_file(f"{root}/{MISSING}")
    pattern = f"{root}/{manifest['splits']['train']['pattern']}"
    cfg = DataConfig(
        val_data=pattern,
        val_batch_size=5,
        num_workers=0,  # in this process, so the warnings reach caplog
        image_size=IMAGE_SIZE,
        read_max_attempts=2,
        read_backoff_seconds=0.01,
        read_backoff_max_seconds=0.02,
    )
    loader = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        delivered = keys_of(collect(loader, seconds=60))
    intact = {k for name, ks in keys.items() if name not in (TRUNCATED, MISSING) for k in ks}
    assert len(delivered) == len(set(delivered))
    assert set(delivered) == intact | readable
    totals = loader.meter.totals()
    # The missing shard is one stream error (404: permanent, not retried); the truncated
    # one loses its partial last sample (image without caption), counted as bad.
    assert totals["stream_errors"] == 1 and totals["shard_retries"] == 0
    assert totals["samples_bad"] == 1
    assert totals["samples_read"] - totals["samples_bad"] == len(delivered)
    missing_warning = next(line for line in caplog.text.splitlines() if MISSING in line)
    assert "skipped shard data" in missing_warning and "FileNotFoundError" in missing_warning
    assert f"in {root}/{TRUNCATED}: ValueError: no .txt caption member" in caplog.text
    assert "testing-secret-key" not in caplog.text


def test_shard_truncated_at_a_sample_boundary_is_reported(
    local_shards: tuple[Path, dict[str, Any]],
    tokenizer: CaptionTokenizer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    local, manifest = local_shards
    with tarfile.open(local / TRUNCATED) as tar:
        last = tar.getmembers()[5]  # the last member of the second sample
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    (local / TRUNCATED).write_bytes((local / TRUNCATED).read_bytes()[:end])
    delivered, totals = _evaluate_in_process(local, manifest, tokenizer, caplog)
    assert len(delivered) == 32 - 6  # the two samples before the cut survive
    assert totals["samples_missing"] == 6, totals  # counted against the manifest's 8
    assert f"{TRUNCATED} ended after 2 of its 8 samples" in caplog.text


def test_shard_holding_more_samples_than_its_manifest_lists_is_reported(
    local_shards: tuple[Path, dict[str, Any]],
    tokenizer: CaptionTokenizer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    local, manifest = local_shards
    sizes = json.loads((local / "sizes.json").read_text())
    sizes[TRUNCATED] = 5  # a manifest of another version of the shard
    (local / "sizes.json").write_text(json.dumps(sizes))
    delivered, totals = _evaluate_in_process(local, manifest, tokenizer, caplog)
    assert len(delivered) == 32  # every sample the shards hold
    assert totals["samples_unlisted"] == 3 and totals["samples_missing"] == 0, totals
    assert f"{TRUNCATED} holds 8 samples, its manifest lists 5" in caplog.text


def _evaluate_in_process(
    local: Path,
    manifest: dict[str, Any],
    tokenizer: CaptionTokenizer,
    caplog: pytest.LogCaptureFixture,
) -> tuple[list[str], dict[str, int]]:
    """Every val sample of the shards in `local`, read in this process (warnings reach
    caplog): (keys delivered, the loader's counters)."""
    pattern = str(local / manifest["splits"]["train"]["pattern"])
    cfg = DataConfig(val_data=pattern, val_batch_size=5, num_workers=0, image_size=IMAGE_SIZE)
    loader = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        delivered = keys_of(collect(loader, seconds=60))
    return delivered, loader.meter.totals()

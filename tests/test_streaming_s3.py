"""Streaming shards from a real S3-compatible server on loopback (moto's server mode), with
and without a fault-injecting proxy in front of it: 503 throttling, connections dropped
mid-body, connections reset, stalled responses, and an object that never reads; and the
range requests a shard is read with."""

from __future__ import annotations

import io
import logging
import tarfile
import time
from pathlib import Path

import fsspec
import pytest
from helpers_data import (
    all_keys,
    caption_tokenizer,
    collect,
    data_config,
    keys_of,
    make_figures,
    write_shards,
)
from helpers_s3 import FaultProxy

from pmc_clip.data.loaders import build_eval_loader, build_train_loader
from pmc_clip.data.shard_reader import (
    RangeReader,
    ShardFilesystems,
    ShardReadCounters,
    ShardReadOptions,
    range_end,
)
from pmc_clip.tokenize import CaptionTokenizer

NUM_ARTICLES = 16  # x 4 figures = 64 samples


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_figures(tmp_path_factory.mktemp("figures"), NUM_ARTICLES)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CaptionTokenizer:
    return caption_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def s3_shards(figures: tuple[str, str], bucket: str) -> tuple[str, set[str]]:
    """64 samples in 8 shards of 8 on S3, written by make_shards; (pattern, keys)."""
    manifest = write_shards(*figures, output=f"{bucket}/shards", shard_size=8)
    pattern = f"{bucket}/shards/{manifest['splits']['train']['pattern']}"
    return pattern, all_keys(manifest, figures[0])


def test_s3_epoch_over_two_ranks_is_exactly_the_dataset(
    figures: tuple[str, str], s3_bucket: str, tokenizer: CaptionTokenizer
) -> None:
    pattern, keys = s3_shards(figures, s3_bucket)
    # Small range requests: every shard is streamed in several GETs, none downloaded whole.
    cfg = data_config(pattern, read_chunk_bytes=16 * 1024)
    delivered: list[str] = []
    for rank in range(2):
        loader = build_train_loader(
            cfg, tokenizer, rank=rank, world_size=2, seed=0
        )  # size from S3 manifest
        assert loader.num_samples == 64
        batches = collect(loader)
        assert len(batches) == len(loader) == 4
        delivered += keys_of(batches)
        totals = loader.meter.totals()
        # Runs of consecutive samples (span_samples 4), one range request each (a run is
        # below the 16 KiB chunk), plus each worker's read of a shard's index: requests
        # scale with runs, not samples.
        assert totals["runs_read"] <= totals["samples_delivered"] // 2
        assert totals["shard_requests"] <= totals["runs_read"] + 2 * 8
        assert totals["shard_retries"] == totals["shard_shards_failed"] == 0
    assert len(delivered) == 64 and set(delivered) == keys
    # Streamed from object storage, runs default to 32 samples (one request each).
    default = build_train_loader(
        data_config(pattern, span_samples=None), tokenizer, rank=0, world_size=2, seed=0
    )
    assert default.state_dict()["span_samples"] == 32


def test_s3_faults_are_retried_and_every_sample_arrives_once(
    figures: tuple[str, str],
    s3_bucket: str,
    fault_proxy: FaultProxy,
    tokenizer: CaptionTokenizer,
) -> None:
    pattern, keys = s3_shards(figures, s3_bucket)
    fault_proxy.fail_every = 3
    fault_proxy.actions = ("503", "drop", "reset", "stall")
    fault_proxy.stall_seconds = 3.0
    cfg = data_config(pattern, read_chunk_bytes=16 * 1024, read_timeout_seconds=0.5)
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, seed=0)
    batches = collect(loader, seconds=90)
    assert len(batches) == len(loader) == 8
    delivered = keys_of(batches)
    assert len(delivered) == len(set(delivered)) == 64 and set(delivered) == keys
    totals = loader.meter.totals()
    num_faults = sum(fault_proxy.faults.values())
    assert set(fault_proxy.faults) == {"503", "drop", "reset", "stall"}, fault_proxy.faults
    # Each injected fault cost one retried request, and no shard was given up. (aiohttp
    # itself re-sends a request whose reused keep-alive connection was reset before any
    # response, so a "reset" may not reach our retry loop.)
    num_resets = fault_proxy.faults["reset"]
    assert num_faults - num_resets <= totals["shard_retries"] <= num_faults
    assert totals["shard_shards_failed"] == totals["stream_errors"] == 0


def test_the_next_s3_shard_is_opened_while_the_current_one_is_read(
    figures: tuple[str, str],
    s3_bucket: str,
    fault_proxy: FaultProxy,
    tokenizer: CaptionTokenizer,
) -> None:
    pattern, keys = s3_shards(figures, s3_bucket)
    # One reader in this process, unshuffled: batch k holds shard k's 8 samples, and the
    # pipeline runs only when the next batch is asked for.
    cfg = data_config(None, val_data=pattern, num_workers=0, val_batch_size=8)
    batches = iter(build_eval_loader(cfg, tokenizer, rank=0, world_size=1))  # reads the manifest
    fault_proxy.requests.clear()  # make_shards' uploads and the manifest read

    def shards_requested() -> set[str]:
        return {path.rsplit("/", 1)[-1] for _, path in fault_proxy.requests}

    delivered = keys_of([next(batches)])
    # Shard 0 is read (webdataset marks a shard's end: its last sample needs nothing of
    # shard 1). Shard 1 was opened ahead meanwhile, with nobody asking for it yet.
    deadline_seconds = time.monotonic() + 10
    while len(shards_requested()) < 2 and time.monotonic() < deadline_seconds:
        time.sleep(0.01)
    assert shards_requested() == {"pmc-oa-train-000000.tar", "pmc-oa-train-000001.tar"}
    delivered += keys_of(list(batches))
    assert len(delivered) == len(set(delivered)) == 64 and set(delivered) == keys
    assert len(shards_requested()) == 8


def test_s3_unreadable_shard_is_skipped_counted_and_redacted(
    figures: tuple[str, str],
    s3_bucket: str,
    fault_proxy: FaultProxy,
    tokenizer: CaptionTokenizer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pattern, keys = s3_shards(figures, s3_bucket)
    fault_proxy.always_fail = ("pmc-oa-train-000003.tar",)
    # Workers in this process so the warnings reach caplog.
    cfg = data_config(None, val_data=pattern, num_workers=0, read_max_attempts=3)
    loader = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        delivered = keys_of(collect(loader))
    lost = set(keys) - set(delivered)
    assert len(delivered) == len(set(delivered)) == 56 and len(lost) == 8
    totals = loader.meter.totals()
    assert totals["shard_shards_failed"] == 1 and totals["stream_errors"] >= 1
    assert totals["shard_retries"] == 2  # 3 attempts at the shard's first request
    assert fault_proxy.faults["503"] == 3
    assert "pmc-oa-train-000003.tar" in caplog.text and "failed 3 times" in caplog.text
    assert "testing-secret-key" not in caplog.text and "testing-key-id" not in caplog.text


def test_s3_unreadable_shard_in_training_is_substituted_counted_and_named(
    figures: tuple[str, str],
    s3_bucket: str,
    fault_proxy: FaultProxy,
    tokenizer: CaptionTokenizer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Training batches stay full (every rank's collectives need the same shapes): the
    runs of a shard that fails every retry are replaced by other samples of their batch,
    counted, and the warning names the shard (redacted)."""
    pattern, keys = s3_shards(figures, s3_bucket)
    fault_proxy.always_fail = ("pmc-oa-train-000003.tar",)
    cfg = data_config(pattern, batch_size=16, num_workers=0, read_max_attempts=2)
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = collect(loader)
    assert [len(batch["keys"]) for batch in batches] == [16] * 4
    delivered = keys_of(batches)
    totals = loader.meter.totals()
    assert totals["samples_substituted"] == 8  # shard 3's samples
    assert len(set(delivered)) == 64 - 8 and set(delivered) < keys
    assert totals["stream_errors"] == totals["shard_shards_failed"] == 2  # its two runs
    assert "pmc-oa-train-000003.tar" in caplog.text and "failed 2 times" in caplog.text
    assert "testing-secret-key" not in caplog.text and "testing-key-id" not in caplog.text


def test_a_stuck_read_stops_the_loader_after_the_data_timeout(
    figures: tuple[str, str],
    s3_bucket: str,
    fault_proxy: FaultProxy,
    tokenizer: CaptionTokenizer,
) -> None:
    """A worker whose read never returns (here: every shard GET stalls longer than the
    read timeout allows for) is an error after --data-timeout-seconds, not a stalled job."""
    pattern, _ = s3_shards(figures, s3_bucket)
    fault_proxy.fail_every, fault_proxy.actions, fault_proxy.stall_seconds = 1, ("stall",), 30
    cfg = data_config(pattern, num_workers=1, read_timeout_seconds=60, batch_timeout_seconds=2)
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, seed=0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 2 seconds"):
        collect(loader, seconds=60)
    assert time.monotonic() - started < 20


def test_s3_cache_dir_downloads_each_shard_once(
    figures: tuple[str, str], s3_bucket: str, tokenizer: CaptionTokenizer, tmp_path: Path
) -> None:
    pattern, keys = s3_shards(figures, s3_bucket)
    cache = tmp_path / "cache"
    cfg = data_config(None, val_data=pattern, cache_dir=str(cache))
    first = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    assert set(keys_of(collect(first))) == keys
    assert len(list(cache.glob("[0-9a-f]*.tar"))) == 8
    again = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    assert set(keys_of(collect(again))) == keys
    totals = again.meter.totals()
    # Read from the cache: one size check per shard (a changed object is fetched again), no data.
    assert totals["shard_requests"] == 8 and totals["shard_bytes_read"] == 0


def test_node_cache_holds_each_nodes_shards_so_epoch_two_reads_nothing_remote(
    figures: tuple[str, str],
    s3_bucket: str,
    fault_proxy: FaultProxy,
    tokenizer: CaptionTokenizer,
    tmp_path: Path,
) -> None:
    """Two simulated nodes (one rank of 2 workers each, a cache folder each): a node reads
    the same shards every epoch, so epoch 2 sends no GET for shard data; each shard is
    downloaded by one node only, but the straddling one."""
    pattern, keys = s3_shards(figures, s3_bucket)
    loaders = [
        build_train_loader(
            data_config(pattern, cache_dir=str(tmp_path / f"node{rank}")),
            tokenizer,
            rank=rank,
            world_size=2,
            seed=0,
        )
        for rank in range(2)
    ]
    fault_proxy.requests.clear()
    for epoch in range(3):
        if epoch == 1:
            tar_gets = [path for method, path in fault_proxy.requests if path.endswith(".tar")]
            assert len(set(tar_gets)) <= 8 + 1  # each shard on one node (one may straddle)
            fault_proxy.requests.clear()
        delivered = []
        for loader in loaders:
            loader.set_epoch(epoch)
            delivered += keys_of(collect(loader))
        assert len(delivered) == len(set(delivered)) == 64 and set(delivered) == keys
    assert [r for r in fault_proxy.requests if r[1].endswith(".tar")] == []
    cached = {
        p.name.split("-", 1)[1]
        for node in range(2)
        for p in (tmp_path / f"node{node}").glob("[0-9a-f]*.tar")
    }
    assert len(cached) == 8


def test_node_cache_limit_evicts_and_the_epochs_still_complete(
    figures: tuple[str, str],
    s3_bucket: str,
    fault_proxy: FaultProxy,
    tokenizer: CaptionTokenizer,
    tmp_path: Path,
) -> None:
    pattern, keys = s3_shards(figures, s3_bucket)
    listing = fsspec.filesystem("s3", skip_instance_cache=True).ls(
        pattern.rsplit("/", 1)[0], detail=True
    )
    sizes = [int(entry["size"]) for entry in listing if entry["name"].endswith(".tar")]
    limit = 3 * max(sizes)  # a node's share is 8 shards: 3 fit
    cache = tmp_path / "node0"
    cfg = data_config(pattern, cache_dir=str(cache), cache_limit_bytes=limit)
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, seed=0)
    fault_proxy.requests.clear()
    for epoch in range(2):
        loader.set_epoch(epoch)
        delivered = keys_of(collect(loader))
        assert len(delivered) == len(set(delivered)) == 64 and set(delivered) == keys
        on_disk = sum(p.stat().st_size for p in cache.glob("[0-9a-f]*.tar"))
        assert on_disk <= limit
    tar_gets = [path for method, path in fault_proxy.requests if path.endswith(".tar")]
    assert len(tar_gets) > 8  # evicted shards were downloaded again
    with pytest.raises(ValueError, match="cache-limit-bytes"):
        build_train_loader(
            data_config(pattern, cache_dir=str(cache), cache_limit_bytes=max(sizes) - 1),
            tokenizer, rank=0, world_size=1, seed=0,
        )  # fmt: skip


def test_http_urls_stream_through_fsspec(
    figures: tuple[str, str], s3_bucket: str, s3_endpoint: str, tokenizer: CaptionTokenizer
) -> None:
    import boto3

    pattern, keys = s3_shards(figures, s3_bucket)
    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for item in client.list_objects_v2(Bucket=bucket, Prefix="shards/")["Contents"]:
        client.put_object_acl(Bucket=bucket, Key=item["Key"], ACL="public-read")
    # moto serves public objects over plain HTTP too (path style): any fsspec URL works.
    http_pattern = pattern.replace("s3://", f"{s3_endpoint}/")
    cfg = data_config(None, val_data=http_pattern, read_chunk_bytes=16 * 1024)
    loader = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    assert set(keys_of(collect(loader))) == keys
    assert loader.meter.totals()["shard_requests"] > 8


@pytest.mark.parametrize("chunk_bytes", [512, 4096, 10240, 16 * 1024, 20000, 1 << 20])
@pytest.mark.parametrize("payload_bytes", [0, 100, 9000, 30000, 70000])
def test_range_reads_never_fetch_a_tail_the_tar_reader_skips(
    tmp_path: Path, chunk_bytes: int, payload_bytes: int
) -> None:
    """tarfile stops reading at the end-of-archive marker; the record padding after it must
    not be a range request of its own (the prefetch thread would fetch it, nobody would read
    it, and its retries would land after the stream moved on)."""
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for index, size in enumerate((payload_bytes, 1, payload_bytes // 3)):
            member = tarfile.TarInfo(f"sample{index}.txt")
            member.size = size
            tar.addfile(member, io.BytesIO(b"x" * size))
        end_of_archive = tar.offset  # where the two zero blocks start
    size_bytes = path.stat().st_size
    starts = [0]
    while (end := range_end(starts[-1], size_bytes, chunk_bytes)) < size_bytes:
        assert end - starts[-1] == chunk_bytes
        starts.append(end)
    assert starts[-1] <= end_of_archive < size_bytes

    counters = ShardReadCounters()
    options = ShardReadOptions(chunk_bytes=chunk_bytes)
    reader = RangeReader(path.as_uri(), ShardFilesystems(options), counters)
    with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|*") as tar:
        sizes = [member.size for member in tar]
    reader.close()
    assert sizes == [payload_bytes, 1, payload_bytes // 3]
    assert counters.requests == 1 + len(starts)  # stat + every range, each one read
    assert counters.bytes_read == size_bytes

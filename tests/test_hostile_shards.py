"""Hostile and broken shards, crafted byte by byte: a member whose header claims more
bytes than the shard holds, members over --max-member-bytes, pickles the loader drops, a
gzip-compressed shard, val sets that cannot be evaluated. Every reader (training's runs,
evaluation's tar stream, index building, inspect_shards) stops or skips within bounded
time and memory, counts what it lost and names the shard; evaluation's checks run at
start-up. Every loop runs under a deadline: a spin fails the test instead of hanging it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import fsspec
import pytest
from helpers_data import IMAGE_SIZE, caption_tokenizer, collect, data_config, deadline, keys_of
from PIL import Image

from pmc_clip.config import DataConfig
from pmc_clip.data.loaders import build_eval_loader, build_train_loader
from pmc_clip.shard_index import build_index
from pmc_clip.sharding import inspect as inspect_shards
from pmc_clip.tokenize import CaptionTokenizer

HUGE_CLAIM = 1 << 60  # a size field (GNU base-256) no shard can hold
MiB = 1 << 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CaptionTokenizer:
    return caption_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _jpeg(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def _pair(key: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _jpeg()), (f"{key}.txt", f"caption of {key}".encode())]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _claim_size(data: bytes, member_name: str, size: int) -> bytes:
    """The shard with `member_name`'s header claiming `size` bytes (checksum fixed): what
    a damaged or hostile writer leaves. Nothing after the header moves."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmember(member_name).offset
    header = bytearray(data[offset : offset + tarfile.BLOCKSIZE])
    header[124:136] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return data[:offset] + bytes(header) + data[offset + tarfile.BLOCKSIZE :]


def _write_indexed(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)
    index = build_index(io.BytesIO(data), len(data))
    (folder / name).with_suffix(".idx").write_bytes(index.to_bytes())


def _val_config(pattern: str, **overrides: Any) -> DataConfig:
    settings: dict[str, Any] = {
        "val_data": pattern,
        "val_batch_size": 4,
        "num_workers": 0,  # in this process: warnings reach caplog, tracemalloc sees reads
        "image_size": IMAGE_SIZE,
        "read_max_attempts": 2,
        "read_backoff_seconds": 0.01,
        "read_backoff_max_seconds": 0.02,
    }
    return DataConfig(**(settings | overrides))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_member_claiming_more_bytes_than_its_shard_stops_that_shard_at_once(
    where: str,
    tmp_path: Path,
    tokenizer: CaptionTokenizer,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = _tar([m for i in range(4) for m in _pair(f"good{i}")])
    hostile = _claim_size(
        _tar([m for i in range(4) for m in _pair(f"bad{i}")]), "bad1.jpg", HUGE_CLAIM
    )
    # Before the fix, webdataset's tar reader skipped past the claimed member 10 KiB per
    # loop turn after the data ran out: ~10**14 turns.
    with (
        deadline(20),
        pytest.raises(ValueError, match=r"'bad1\.jpg' claims 1152921504606846976 bytes"),
    ):
        build_index(io.BytesIO(hostile), len(hostile))
    sizes = json.dumps({"v-0.tar": 4, "v-1.tar": 4})
    if where == "local":
        root = str(tmp_path)
        (tmp_path / "v-0.tar").write_bytes(hostile)
        (tmp_path / "v-1.tar").write_bytes(good)
        (tmp_path / "sizes.json").write_text(sizes)
    else:
        root = f"{request.getfixturevalue('s3_bucket')}/val"
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.pipe(
            {
                f"{root}/v-0.tar": hostile,
                f"{root}/v-1.tar": good,
                f"{root}/sizes.json": sizes.encode(),
            }
        )
    loader = build_eval_loader(
        _val_config(f"{root}/v-{{0..1}}.tar"), tokenizer, rank=0, world_size=1
    )
    with caplog.at_level(logging.WARNING):
        delivered = keys_of(collect(loader, seconds=20))
    # The sample before the hostile member arrives; the shard stops there, the rest of it
    # is counted as missing, and the next shard is read whole.
    assert delivered == ["bad0", "good0", "good1", "good2", "good3"]
    totals = loader.meter.totals()
    assert (totals["stream_errors"], totals["samples_missing"], totals["samples_bad"]) == (1, 3, 0)
    warning = next(line for line in caplog.text.splitlines() if "claims" in line)
    assert f"{root}/v-0.tar" in warning and "which end past the shard's" in warning


@pytest.mark.parametrize("where", ["local", "s3"])
def test_members_over_the_limit_and_dropped_members_are_never_read_in_training(
    where: str,
    tmp_path: Path,
    tokenizer: CaptionTokenizer,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    big = bytes(range(256)) * (3 * MiB // 256)  # 3 MiB: over the 1 MiB limit and the read gap
    members = [
        *_pair("s0"),
        *_pair("s1"),
        ("s1.pth", big),  # a pickle the loader drops
        ("s2.jpg", big),  # an image over --max-member-bytes
        ("s2.txt", b"caption of s2"),
        *_pair("s3"),
    ]
    _write_indexed(tmp_path, "t-0.tar", _tar(members))
    pattern = str(tmp_path / "t-0.tar")
    if where == "s3":
        pattern = f"{request.getfixturevalue('s3_bucket')}/train/t-0.tar"
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.put_file(str(tmp_path / "t-0.tar"), pattern)
        fs.put_file(str(tmp_path / "t-0.idx"), pattern.replace(".tar", ".idx"))
    # One run of all 4 samples: a single read before the fix.
    cfg = data_config(pattern, batch_size=4, num_workers=0, span_samples=4, max_member_bytes=MiB)
    loader = build_train_loader(cfg, tokenizer, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING):
        batches = collect(loader, seconds=30)
    assert [len(batch["keys"]) for batch in batches] == [4] and "s2" not in keys_of(batches)
    totals = loader.meter.totals()
    assert (totals["samples_bad"], totals["samples_substituted"]) == (1, 1)
    assert (
        "'s2' in" in caplog.text
        and "its .jpg member is 3145728 bytes, over the limit" in caplog.text
    )
    # Neither 3 MiB member was read: the run was read as two pieces around them.
    assert totals["shard_bytes_read"] < 64 * 1024, totals
    if where == "s3":
        assert totals["shard_requests"] == 1 + 2, totals  # the index, then the two pieces


def test_members_over_the_limit_and_dropped_members_are_never_held_in_evaluation(
    tmp_path: Path, tokenizer: CaptionTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    big = bytes(range(256)) * (8 * MiB // 256)
    members = [*_pair("s0"), ("s0.pth", big), ("s1.jpg", big), ("s1.txt", b"caption"), *_pair("s2")]
    (tmp_path / "v-0.tar").write_bytes(_tar(members))
    (tmp_path / "sizes.json").write_text(json.dumps({"v-0.tar": 3}))
    loader = build_eval_loader(
        _val_config(str(tmp_path / "v-0.tar"), max_member_bytes=MiB),
        tokenizer,
        rank=0,
        world_size=1,
    )
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING):
            delivered = keys_of(collect(loader, seconds=30))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert delivered == ["s0", "s2"]
    assert loader.meter.totals()["samples_bad"] == 1
    assert (
        "'s1' in" in caplog.text
        and "its .jpg member is 8388608 bytes, over the limit" in caplog.text
    )
    # Skipped over in pieces of at most 1 MiB; before the fix each 8 MiB member was read whole.
    assert peak_bytes < 4 * MiB, peak_bytes


def test_compressed_shards_are_refused_at_start_up_and_never_inflated(
    tmp_path: Path, tokenizer: CaptionTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    shard = _tar([m for i in range(4) for m in _pair(f"s{i}")])
    (tmp_path / "v-0.tar.gz").write_bytes(gzip.compress(shard))
    (tmp_path / "sizes.json").write_text(json.dumps({"v-0.tar.gz": 4}))
    with pytest.raises(ValueError, match=r"v-0\.tar\.gz is not a \.tar: only plain tar shards"):
        build_eval_loader(
            _val_config(str(tmp_path / "v-0.tar.gz")), tokenizer, rank=0, world_size=1
        )
    # gzip bytes under a .tar name: not a tar, nothing inflated, the shard skipped and named.
    (tmp_path / "v-1.tar").write_bytes(gzip.compress(shard))
    (tmp_path / "v-2.tar").write_bytes(_tar(_pair("after")))
    (tmp_path / "sizes.json").write_text(json.dumps({"v-1.tar": 4, "v-2.tar": 1}))
    loader = build_eval_loader(
        _val_config(str(tmp_path / "v-{1..2}.tar")), tokenizer, rank=0, world_size=1
    )
    with caplog.at_level(logging.WARNING):
        assert keys_of(collect(loader, seconds=20)) == ["after"]
    totals = loader.meter.totals()
    assert (totals["stream_errors"], totals["samples_missing"]) == (1, 4)
    warning = next(line for line in caplog.text.splitlines() if "skipped shard data" in line)
    assert "ReadError: invalid header" in warning and "v-1.tar" in warning


def test_val_sets_that_cannot_be_evaluated_stop_at_start_up(
    tmp_path: Path, tokenizer: CaptionTokenizer, s3_bucket: str
) -> None:
    _write_indexed(tmp_path, "v-0.tar", _tar(_pair("a") + _pair("b")))
    _write_indexed(tmp_path, "v-1.tar", _tar(_pair("c") + _pair("d") + _pair("e")))
    pattern = str(tmp_path / "v-{0..1}.tar")
    # No manifest: the indexes count the pairs (a --test-2000 check needs the number).
    assert build_eval_loader(_val_config(pattern), tokenizer, rank=0, world_size=1).num_samples == 5
    _write_indexed(tmp_path, "v-1.tar", _tar(_pair("c") + _pair("a")))
    with pytest.raises(ValueError, match=r"sample key 'a' is in .*v-0\.tar and in .*v-1\.tar"):
        build_eval_loader(_val_config(pattern), tokenizer, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"v-0\.tar twice: every val pair would be evaluated"):
        build_eval_loader(
            _val_config(f"{tmp_path}/v-0.tar::{tmp_path}/v-0.tar"), tokenizer, rank=0, world_size=1
        )
    with pytest.raises(ValueError, match=r"none of the 2 --val-data shards exists"):
        build_eval_loader(
            _val_config(str(tmp_path / "w-{0..1}.tar")), tokenizer, rank=0, world_size=1
        )
    missing = f"{s3_bucket}-missing/val/v-0.tar"
    with pytest.raises(
        ValueError, match=rf"none of the 2 --val-data shards exists \(first: {missing}"
    ):
        build_eval_loader(
            _val_config(f"{s3_bucket}-missing/val/v-{{0..1}}.tar"), tokenizer, rank=0, world_size=1
        )


def _entry(folder: Path, name: str, count: int) -> dict[str, Any]:
    data = (folder / name).read_bytes()
    return {
        "name": name,
        "count": count,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_inspect_shards_flags_every_problem_the_loader_would_trip_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = [
        *_pair("ok"),
        ("dotted.v2.jpg", _jpeg()),  # webdataset: key "dotted", extension "v2.jpg"
        ("dotted.v2.txt", b"a caption"),
        ("garbled.jpg", _jpeg()[:200]),
        ("garbled.txt", b"a caption"),
        ("latin1.jpg", _jpeg()),
        ("latin1.txt", "caf\xe9".encode("latin-1")),
        ("blank.jpg", _jpeg()),
        ("blank.txt", b" \n "),
        *_pair("badjson"),
        ("badjson.json", b"{not json"),
        ("huge.jpg", _jpeg() + b"\0" * 4096),
        ("huge.txt", b"a caption"),
        ("nocaption.jpg", _jpeg()),
        ("noimage.txt", b"a caption"),
    ]
    _write_indexed(tmp_path, "s-0.tar", _tar(members))
    _write_indexed(tmp_path, "s-1.tar", _tar(_pair("fine") + _pair("ok")))  # "ok" twice
    (tmp_path / "s-2.tar").write_bytes(
        _claim_size(_tar(_pair("x") + _pair("y")), "y.jpg", HUGE_CLAIM)
    )
    _write_indexed(tmp_path, "s-3.tar", _tar(_pair("clean")))
    entries = [
        _entry(tmp_path, "s-0.tar", 9),
        _entry(tmp_path, "s-1.tar", 2),
        _entry(tmp_path, "s-2.tar", 2),
        _entry(tmp_path, "s-3.tar", 1),
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": entries}))
    with deadline(60):
        code = inspect_shards.main([str(tmp_path), "--samples", "0", "--max-member-bytes", "2048"])
    out = capsys.readouterr().out
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("BAD ")]
    expected = [
        "BAD s-0.tar: 'dotted': member 'dotted.v2.jpg' is read as key 'dotted' with "
        "extension 'v2.jpg'",
        "BAD s-0.tar: 'dotted': ValueError: no image member",
        "BAD s-0.tar: 'garbled': OSError: ",
        "BAD s-0.tar: 'latin1': UnicodeDecodeError: ",
        "BAD s-0.tar: 'blank': ValueError: empty caption",
        "BAD s-0.tar: 'badjson': its .json member does not parse",
        "BAD s-0.tar: 'huge': ValueError: its .jpg member is ",
        "BAD s-0.tar: 'nocaption': ValueError: no .txt caption member",
        "BAD s-0.tar: 'noimage': ValueError: no image member",
        "BAD s-1.tar: 'ok': key also in s-0.tar",
        "BAD s-2.tar: unreadable after 1 samples: member 'y.jpg' claims 1152921504606846976 bytes",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, out)
    assert not any(line.startswith("BAD s-3.tar") for line in lines)
    assert "bytes, over the limit of 2048 (--max-member-bytes); not read" in out
    assert "verified 4 shards: 1 ok, 3 bad" in out

"""Shard sample indexes (.idx): what make_shards writes, what tools/index_shards.py builds
(locally and on S3, resumably), and the byte-range contract the loader relies on, checked
against webdataset's own reader."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import webdataset as wds
from helpers_data import make_figures
from PIL import Image

from pmc_clip import storage
from pmc_clip.shard_index import (
    INDEX_FORMAT_VERSION,
    ShardIndex,
    build_index,
    index_url,
    is_sample_member,
    read_index,
    split_member_name,
)
from pmc_clip.sharding import index as index_shards
from pmc_clip.sharding.format import Manifest
from pmc_clip.sharding.inspect import verify_shard
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.run import make_shards

REPO = Path(__file__).resolve().parent.parent
LONG_KEY = "PMC7_" + "a_very_long_figure_name" * 5  # > 100 characters: a PAX header


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 40).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


def _samples() -> list[dict[str, Any]]:
    """jpg + txt + json samples of unequal sizes, one with a key over 100 characters."""
    keys = ["PMC1_fig1", "PMC1_fig2", LONG_KEY, "PMC3_fig1", "PMC3_fig2"]
    return [
        {
            "__key__": key,
            "jpg": _jpeg(12 + 17 * i, 9 + 5 * i),
            "txt": f"caption {i} " * (1 + 60 * i),
            "json": json.dumps({"i": i, "pad": "x" * (300 * i)}),
        }
        for i, key in enumerate(keys)
    ]


def _webdataset_samples(data: bytes) -> list[dict[str, Any]]:
    """The samples webdataset reads from these tar bytes (its tar_file_iterator +
    group_by_keys, as every WebDataset pipeline does)."""
    files = wds.tariterators.tar_file_expander([{"url": "shard", "stream": io.BytesIO(data)}])
    return list(wds.tariterators.group_by_keys(files))


def _assert_webdataset_agrees(data: bytes, index: ShardIndex) -> None:
    """Keys, members and every byte range of `index` against webdataset's reading."""
    samples = _webdataset_samples(data)
    assert index.shard_bytes == len(data)
    assert list(index.keys) == [s["__key__"] for s in samples]
    for i, sample in enumerate(samples):
        members = range(index.member_starts[i], index.member_starts[i + 1])
        located = {
            str(index.member_extensions[m]): data[
                index.member_offsets[m] : index.member_offsets[m] + index.member_sizes[m]
            ]
            for m in members
        }
        assert located == {k: v for k, v in sample.items() if not k.startswith("__")}
    for i in range(index.num_samples):
        for j in range(i + 1, index.num_samples + 1):
            start, end = index.byte_range(i, j)
            assert _webdataset_samples(data[start:end]) == samples[i:j], (i, j)


def _make_shards_output(tmp_path: Path, shard_size: int = 2) -> tuple[Path, dict[str, Any]]:
    """The samples of `_samples()` (same figures and captions) sharded by make_shards."""
    images = tmp_path / "img"
    images.mkdir()
    rows = []
    for sample in _samples():
        (images / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
        rows.append({"image": f"{sample['__key__']}.jpg", "caption": sample["txt"]})
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    options = ShardOptions(
        input=str(jsonl),
        images=str(images),
        output=str(out),
        split="train",
        shard_size=shard_size,
        workers=0,
    )
    return out, make_shards(options)


def test_make_shards_writes_the_index_the_tool_builds_and_webdataset_agrees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, manifest = _make_shards_output(tmp_path)
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == 3 == len(manifest["shards"])
    written = {p.name: p.read_bytes() for p in sorted(out.glob("*.idx"))}
    assert sorted(written) == [p.name[: -len(".tar")] + ".idx" for p in shards]
    long_keys = 0
    for shard in shards:
        data = shard.read_bytes()
        index = read_index(fsspec.filesystem("file"), index_url(str(shard)), "idx")
        _assert_webdataset_agrees(data, index)
        for key, offset in zip(index.keys, index.sample_offsets, strict=False):
            if len(key) > 100:  # the sample starts at its PAX header, not at the member's
                long_keys += 1
                assert data[offset + 156 : offset + 157] == tarfile.XHDTYPE
    assert long_keys == 1

    # The tool, run on make_shards' shards without their indexes, writes the same bytes.
    for path in out.glob("*.idx"):
        path.unlink()
    pattern = str(out / manifest["splits"]["train"]["pattern"])
    assert index_shards.main([pattern, "--workers", "2"]) == 0
    assert "3 shards: 3 built, 0 kept, 0 failed" in capsys.readouterr().err
    rebuilt = {p.name: p.read_bytes() for p in sorted(out.glob("*.idx"))}
    assert rebuilt == written
    for name, data in rebuilt.items():
        assert ShardIndex.from_bytes(data, name) == ShardIndex.from_bytes(written[name], name)


def test_index_of_shardwriter_shards_equals_make_shards_index_for_the_same_samples(
    tmp_path: Path,
) -> None:
    """The samples of make_shards' shards written again by webdataset's ShardWriter (as an
    OpenCLIP user's own script would), indexed by the tool: the same index, shard by
    shard (the same keys, members, sizes and offsets: both write 512-byte ustar headers, a
    PAX header only for the long key)."""
    out, manifest = _make_shards_output(tmp_path)
    rewritten = tmp_path / "rewritten"
    rewritten.mkdir()
    shards = sorted(out.glob("*.tar"))
    for number, shard in enumerate(shards):
        samples = _webdataset_samples(shard.read_bytes())
        # An integer mtime, as make_shards writes: webdataset's default float time adds a
        # PAX header to every member (other offsets, the same samples).
        name = str(rewritten / f"w-{number:06d}-%d.tar")
        with wds.ShardWriter(name, verbose=0, mtime=0) as sink:
            for sample in samples:
                sink.write({k: v for k, v in sample.items() if k != "__url__"})
    pattern = str(rewritten / f"w-{{000000..{len(shards) - 1:06d}}}-0.tar")
    assert index_shards.main([pattern]) == 0
    for number, shard in enumerate(shards):
        ours = read_index(fsspec.filesystem("file"), index_url(str(shard)), "ours")
        theirs = read_index(
            fsspec.filesystem("file"), str(rewritten / f"w-{number:06d}-0.idx"), "theirs"
        )
        assert theirs == ours, shard.name
    assert manifest["rows"]["written"] == 5


def _gnu_tar_with_extras(samples: list[dict[str, Any]]) -> bytes:
    """A GNU-format tar (long names as GNU longname blocks) with what webdataset skips
    between samples: a folder, a `__meta__` file, a symlink; and an upper-case suffix."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, payload: bytes, kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(payload)
            tar.addfile(info, io.BytesIO(payload))

        add("folder", b"", tarfile.DIRTYPE)
        for number, sample in enumerate(samples):
            for ext in ("jpg", "txt", "json"):
                payload = sample[ext]
                add(
                    f"{sample['__key__']}.{ext.upper() if number == 1 else ext}",
                    payload if isinstance(payload, bytes) else payload.encode(),
                )
            add("__meta__", b"skipped by webdataset")
            add("link", b"", tarfile.SYMTYPE)
    return buffer.getvalue()


def test_index_of_webdataset_written_shards_keeps_the_byte_range_contract(
    tmp_path: Path,
) -> None:
    samples = _samples()
    with wds.ShardWriter(str(tmp_path / "w-%06d.tar"), maxcount=3, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    shards = [p.read_bytes() for p in sorted(tmp_path.glob("w-*.tar"))]
    assert len(shards) == 2
    for data in shards:
        index = build_index(io.BytesIO(data), len(data))
        _assert_webdataset_agrees(data, index)
        # Only the end-of-archive blocks and record padding follow the last sample.
        assert not data[index.sample_offsets[-1] :].strip(b"\0")
    gnu = _gnu_tar_with_extras(samples)
    index = build_index(io.BytesIO(gnu), len(gnu))
    _assert_webdataset_agrees(gnu, index)
    assert index.keys.tolist() == [s["__key__"] for s in samples]
    long_start = int(index.sample_offsets[index.keys.tolist().index(LONG_KEY)])
    assert gnu[long_start + 156 : long_start + 157] == tarfile.GNUTYPE_LONGNAME
    assert index.member_extensions[3:6].tolist() == ["jpg", "txt", "json"]  # lower case


def _tar(*names: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 600
            tar.addfile(info, io.BytesIO(b"x" * 600))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_tar("a.jpg", "b.jpg", "a.txt"), r"'a\.txt': sample 'a' comes back after other"),
        (_tar("a.jpg", "README"), r"'README' has no extension"),
        (_tar("a.txt", "a.TXT"), r"'a\.TXT': sample 'a' has two 'txt' members"),
        (_tar("a.jpg", "b.jpg")[:1536], r"no end-of-archive blocks after byte 1536"),
        (_tar("a.jpg", "b.jpg")[:1500], r"'a\.jpg' claims 600 bytes at byte 512, which end past"),
        (b"<html>not a tar</html>" * 40, r"not a readable tar"),
    ],
)
def test_build_index_refuses_what_a_range_read_would_get_wrong(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_index(io.BytesIO(data), len(data))


def _npz(index: ShardIndex, **overrides: Any) -> bytes:
    arrays = {
        "format_version": INDEX_FORMAT_VERSION,
        "shard_bytes": index.shard_bytes,
        "sample_offsets": index.sample_offsets,
        "keys": index.keys,
        "member_starts": index.member_starts,
        "member_extensions": index.member_extensions,
        "member_offsets": index.member_offsets,
        "member_sizes": index.member_sizes,
    }
    buffer = io.BytesIO()
    np.savez(buffer, **(arrays | overrides))
    return buffer.getvalue()


def test_member_rules_are_webdataset_s_own() -> None:
    """shard_index restates two of webdataset's reading rules (importing webdataset
    imports torch): which members go into samples and how a name splits into key and
    extension. They agree with webdataset's on names that test every branch."""
    import inspect

    from webdataset import tariterators

    names = [
        "a.jpg", "PMC1_F1.v2.jpg", "dir/sub.x/key.tar.gz", "noext", "dir.x/noext", ".hidden",
        "__key__", "__meta__.json", "dir/__meta__", "__a__/b.jpg", "x/__y__/z.txt", "a..b",
        "a.", "ümlaut.png", "a/b/c.d.e",
    ]  # fmt: skip
    skip_meta = inspect.signature(tariterators.tar_file_iterator).parameters["skip_meta"].default
    for name in names:
        assert split_member_name(name) == tariterators.base_plus_ext(name), name
        for kind in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE):
            info = tarfile.TarInfo(name)
            info.type = kind
            theirs = (
                info.isreg()
                and not (
                    "/" not in name
                    and name.startswith(tariterators.meta_prefix)
                    and name.endswith(tariterators.meta_suffix)
                )
                and not re.match(skip_meta, name)
            )
            assert is_sample_member(info) == theirs, (name, kind)


def test_make_shards_main_process_never_imports_torch(tmp_path: Path) -> None:
    """Writing and indexing shards needs no torch (~2.5 s of CPU per run and per part)."""
    jsonl, images = make_figures(tmp_path, 2)
    code = (
        "import sys\n"
        "from pmc_clip.sharding.cli import main\n"
        f"assert main(['--input', {jsonl!r}, '--images', {images!r}, '--output', "
        f"{str(tmp_path / 'out')!r}, '--workers', '1']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_index_file_round_trip_and_clear_errors() -> None:
    data = _tar("a.jpg", "a.txt", "b.jpg")
    index = build_index(io.BytesIO(data), len(data))
    assert index.num_samples == 2 and index.byte_range(1, 2) == (3072, 4608)
    assert ShardIndex.from_bytes(index.to_bytes(), "x.idx") == index
    assert ShardIndex.from_bytes(_npz(index), "x.idx") == index  # np.savez's own file reads
    assert index.to_bytes() == build_index(io.BytesIO(data), len(data)).to_bytes()
    for first, stop in ((0, 0), (1, 0), (-1, 1), (0, 3)):
        with pytest.raises(ValueError, match="is not a non-empty part of"):
            index.byte_range(first, stop)
    name = "s3://bucket/pmc-oa-train-000001.idx"
    damaged = {
        "garbage": b"this is not an index",
        "cut short": index.to_bytes()[:-40],
        "other version": _npz(index, format_version=INDEX_FORMAT_VERSION + 1),
        "offsets backwards": _npz(index, sample_offsets=index.sample_offsets[::-1]),
        "past the shard": _npz(index, shard_bytes=100),
        "missing keys": _npz(index, keys=index.keys[:1]),
    }
    for what, payload in damaged.items():
        with pytest.raises(ValueError, match=r"^s3://bucket/pmc-oa-train-000001\.idx: ") as e:
            ShardIndex.from_bytes(payload, name)
        assert "tools/index_shards.py" in str(e.value), what
    assert index_url("s3://b/p/x-000001.tar") == "s3://b/p/x-000001.idx"
    with pytest.raises(ValueError, match=r"does not end in \.tar") as e:
        index_url("s3://KEY:SECRET@b/x.tar.gz")
    assert "SECRET" not in str(e.value)


def test_tool_on_s3_is_resumable_forced_and_reports_bad_shards(
    tmp_path: Path, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with wds.ShardWriter(str(tmp_path / "w-%06d.tar"), maxcount=2, verbose=0) as sink:
        for sample in _samples():
            sink.write(sample)
    shards = [p.read_bytes() for p in sorted(tmp_path.glob("w-*.tar"))]
    assert len(shards) == 3
    objects = [*shards, shards[0][: len(shards[0]) // 2 + 100], b"<Error>AccessDenied</Error>"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for number, data in enumerate(objects):
        fs.pipe_file(f"{s3_bucket}/t-{number:06d}.tar", data)
    spec = f"{s3_bucket}/t-{{000000..000004}}.tar"

    def run(*extra: str) -> str:
        fs.invalidate_cache()
        assert index_shards.main([spec, "--workers", "2", *extra]) == 1
        err = capsys.readouterr().err
        assert "testing-secret-key" not in err and "Traceback" not in err
        for bad in (3, 4):
            assert f"FAILED index {s3_bucket}/t-{bad:06d}.tar: ValueError: " in err, err
        return err

    assert "5 shards: 3 built, 0 kept, 2 failed" in run()
    for number, data in enumerate(shards):
        stored = fs.cat_file(f"{s3_bucket}/t-{number:06d}.idx")
        assert stored == build_index(io.BytesIO(data), len(data)).to_bytes()
    assert not fs.exists(f"{s3_bucket}/t-000003.idx") and not fs.exists(f"{s3_bucket}/t-000004.idx")
    assert "5 shards: 0 built, 3 kept, 2 failed" in run()  # a rerun redoes nothing
    fs.pipe_file(f"{s3_bucket}/t-000001.idx", b"damaged")
    assert "5 shards: 1 built, 2 kept, 2 failed" in run()
    assert ShardIndex.from_bytes(fs.cat_file(f"{s3_bucket}/t-000001.idx"), "t-000001.idx")
    assert "5 shards: 3 built, 0 kept, 2 failed" in run("--force")


def test_cli_and_inspect_shards_check_the_indexes(tmp_path: Path) -> None:
    out, manifest = _make_shards_output(tmp_path, shard_size=3)
    first, second = (out / entry["name"] for entry in manifest["shards"])
    first.with_suffix(".idx").unlink()
    assert index_shards.main([str(out / "sizes.json")]) == 2  # not a shard: a user error
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "index_shards.py"),
            str(out / manifest["splits"]["train"]["pattern"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "2 shards: 1 built, 1 kept, 0 failed" in result.stderr

    fs, root = storage.url_to_fs(str(out))
    entries = {entry.name: entry for entry in Manifest.from_json(manifest).shards}
    assert [verify_shard(fs, root, entry).problems for entry in entries.values()] == [[], []]
    first.with_suffix(".idx").write_bytes(second.with_suffix(".idx").read_bytes())
    problems = verify_shard(fs, root, entries[first.name]).problems
    assert problems == [
        f"index {first.stem}.idx does not match the shard; rebuild it with: "
        "python tools/index_shards.py 'SHARDS' --force"
    ]
    second.with_suffix(".idx").unlink()
    assert "is missing" in verify_shard(fs, root, entries[second.name]).problems[0]

"""make_shards: round trip, splits, keys, resize, bad input, resume after kill -9, S3."""

from __future__ import annotations

import csv
import io
import json
import random
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import fsspec
import pytest
import webdataset as wds
from PIL import Image

from pmc_clip import storage
from pmc_clip.sharding.figures import FigureOptions
from pmc_clip.sharding.options import ShardOptions, parse_split_fractions
from pmc_clip.sharding.plan import make_key, safe_relative_path
from pmc_clip.sharding.run import make_shards
from pmc_clip.sharding.writer import write_sample
from pmc_clip.synthetic import SyntheticOptions, generate

REPO = Path(__file__).resolve().parent.parent


def _dataset(tmp_path: Path, num_articles: int = 8, **kwargs: Any) -> tuple[Path, Path]:
    jsonl = generate(
        SyntheticOptions(
            output=str(tmp_path / "data"),
            num_articles=num_articles,
            figures_per_article=2,
            subfigures_per_figure=2,
            **kwargs,
        )
    )
    return Path(jsonl), tmp_path / "data" / "images"


def _rows(jsonl: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _shard(out: Path | str, **kwargs: Any) -> dict[str, Any]:
    options = ShardOptions(output=str(out), **kwargs)
    return make_shards(options)


def _read_samples(out: Path) -> dict[str, dict[str, Any]]:
    """Every sample of every shard in `out`, read back with plain webdataset."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    samples: dict[str, dict[str, Any]] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in samples
        samples[sample["__key__"]] = sample
    return samples


def _png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), "red" if mode == "RGB" else 128).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 50).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_round_trip_every_caption_and_image_byte_comes_back(tmp_path: Path) -> None:
    jsonl, images = _dataset(tmp_path)
    out = tmp_path / "shards"
    manifest = _shard(out, input=str(jsonl), images=str(images), shard_size=7, shuffle=True)
    rows = _rows(jsonl)
    samples = _read_samples(out)
    assert len(samples) == len(rows) == manifest["rows"]["written"] == 32
    for i, row in enumerate(rows):
        key = row["image"].rsplit(".", 1)[0]
        sample = samples[key]
        ext = row["image"].rsplit(".", 1)[1]
        assert sample[ext] == (images / row["image"]).read_bytes()
        assert sample["txt"].decode("utf-8") == row["caption"]
        meta = json.loads(sample["json"])
        assert meta["row"] == i and meta["source_path"] == row["image"]
        assert meta["pmcid"] == row["pmcid"] and meta["alignment_score"] == row["alignment_score"]
        assert (meta["width"], meta["height"]) == Image.open(images / row["image"]).size
    # sizes.json (OpenCLIP's format) and the manifest agree with the bytes on disk.
    sizes = json.loads((out / "sizes.json").read_text())
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"]
        assert __import__("hashlib").sha256(data).hexdigest() == shard["sha256"]
        assert sizes[shard["name"]] == shard["count"] <= 7
        names = subprocess.run(
            ["tar", "tf", str(out / shard["name"])], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(names) == 3 * shard["count"]
    assert sum(sizes.values()) == 32
    assert (out / "skipped.jsonl").read_text() == ""


def test_split_by_article_keeps_subfigures_together(tmp_path: Path) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=40, min_side=16, max_side=16)
    out = tmp_path / "shards"
    manifest = _shard(
        out,
        input=str(jsonl),
        images=str(images),
        shard_size=1000,
        split_fractions=parse_split_fractions("train=0.5,valid=0.25,test=0.25"),
    )
    split_of_article: dict[str, set[str]] = {}
    for sample in _read_samples(out).values():
        meta = json.loads(sample["json"])
        split_of_article.setdefault(meta["pmcid"], set()).add(meta["split"])
    assert len(split_of_article) == 40
    assert all(len(splits) == 1 for splits in split_of_article.values())
    counts = {name: info["samples"] for name, info in manifest["splits"].items()}
    assert set(counts) == {"train", "valid", "test"} and sum(counts.values()) == 160
    assert counts["train"] > counts["valid"] > 0 and counts["test"] > 0
    # The same input split again (another output) lands every article in the same split.
    again = _shard(
        tmp_path / "again",
        input=str(jsonl),
        images=str(images),
        shard_size=1000,
        split_fractions=parse_split_fractions("train=0.5,valid=0.25,test=0.25"),
    )
    assert again["splits"] == manifest["splits"]


def test_split_column_and_forced_split(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(8, 8))
    (tmp_path / "img" / "b.png").write_bytes(_png(8, 8))
    rows = [
        {"image": "a.png", "caption": "x", "split": "test"},
        {"image": "b.png", "caption": "y", "split": "train"},
    ]
    jsonl = _write_jsonl(tmp_path / "in.jsonl", rows)
    by_column = _shard(tmp_path / "o1", input=str(jsonl), images=str(tmp_path / "img"))
    assert {k: v["samples"] for k, v in by_column["splits"].items()} == {"test": 1, "train": 1}
    forced = _shard(tmp_path / "o2", input=str(jsonl), images=str(tmp_path / "img"), split="all")
    assert {k: v["samples"] for k, v in forced["splits"].items()} == {"all": 2}


def test_shard_tar_bytes_equal_webdataset_tar_writer() -> None:
    """make_shards writes tars with tarfile (no torch import); the bytes are those
    webdataset.TarWriter writes for the same samples (names, headers, padding)."""
    samples: list[dict[str, bytes | str]] = [
        {"__key__": "PMC1_F1_1", "jpg": b"\xff\xd8" * 700, "txt": b"a caption", "json": "{}"},
        {"__key__": "PMC2__sub_x", "png": b"x" * 513, "txt": "caf\u00e9"},
    ]
    theirs = io.BytesIO()
    with wds.TarWriter(theirs, user="pmc_clip", group="pmc_clip", mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    ours = io.BytesIO()
    with tarfile.open(fileobj=ours, mode="w|") as tar:
        for sample in samples:
            write_sample(tar, sample)
    assert ours.getvalue() == theirs.getvalue()


def test_keys_are_webdataset_safe_and_unique(tmp_path: Path) -> None:
    root = tmp_path / "img"
    (root / "sub.dir").mkdir(parents=True)
    names = ["sub.dir/PMC1_F1.2.png", "PMC1_F1 (copy).png", "PMC2.v2_F1.png"]
    for name in names:
        (root / name).write_bytes(_png(8, 8))
    rows = [{"image": n, "caption": f"caption {i}"} for i, n in enumerate(names)]
    jsonl = _write_jsonl(tmp_path / "in.jsonl", rows)
    _shard(tmp_path / "out", input=str(jsonl), images=str(root), split="train")
    samples = _read_samples(tmp_path / "out")
    assert sorted(samples) == sorted(["sub_dir__PMC1_F1_2", "PMC1_F1__copy_", "PMC2_v2_F1"])
    for key, sample in samples.items():
        assert "." not in key and "/" not in key
        assert sample["png"] == (root / json.loads(sample["json"])["source_path"]).read_bytes()
    assert make_key("a/b.c/d.e.jpg") == "a__b_c__d_e"


def test_resize_reencodes_only_large_images(tmp_path: Path) -> None:
    root = tmp_path / "img"
    root.mkdir()
    (root / "big.jpg").write_bytes(_jpeg(300, 200))
    (root / "small.jpg").write_bytes(_jpeg(80, 60))
    (root / "tall.png").write_bytes(_png(250, 500))
    rows = [{"image": n, "caption": n} for n in ("big.jpg", "small.jpg", "tall.png")]
    jsonl = _write_jsonl(tmp_path / "in.jsonl", rows)
    _shard(
        tmp_path / "out",
        input=str(jsonl),
        images=str(root),
        split="train",
        figure=FigureOptions(resize_max_side=100, jpeg_quality=80),
    )
    samples = _read_samples(tmp_path / "out")
    big = samples["big"]
    assert Image.open(io.BytesIO(big["jpg"])).size == (100, 67)
    meta = json.loads(big["json"])
    assert meta["reencoded"] and (meta["original_width"], meta["original_height"]) == (300, 200)
    assert samples["small"]["jpg"] == (root / "small.jpg").read_bytes()  # untouched bytes
    assert not json.loads(samples["small"]["json"])["reencoded"]
    png = Image.open(io.BytesIO(samples["tall"]["png"]))
    assert png.format == "PNG" and png.size == (50, 100)


def _hostile_dataset(tmp_path: Path) -> tuple[Path, Path, dict[int, str]]:
    """One row per bad-input reason (and good rows between); returns the expected reasons."""
    root = tmp_path / "img"
    root.mkdir()
    good = _jpeg(32, 32)
    (root / "good1.jpg").write_bytes(good)
    (root / "good2.jpg").write_bytes(good)
    (root / "truncated.jpg").write_bytes(_jpeg(64, 64)[:300])
    (root / "bomb.png").write_bytes(_png(100, 100, mode="L"))  # > 2 x max_image_pixels
    (root / "zero.jpg").write_bytes(b"")
    (root / "notimage.jpg").write_bytes(b"this is not an image")
    (root / "real_png.jpg").write_bytes(_png(16, 16))  # wrong extension: kept, stored as png
    (tmp_path / "outside.jpg").write_bytes(good)
    lines: list[Any] = [
        {"image": "good1.jpg", "caption": "ok"},  # 0
        {"image": "missing.jpg", "caption": "no file"},  # 1 missing_file
        {"image": "truncated.jpg", "caption": "cut"},  # 2 unreadable_image
        {"image": "bomb.png", "caption": "boom"},  # 3 decompression_bomb
        {"image": "zero.jpg", "caption": "empty file"},  # 4 unreadable_image
        {"image": "notimage.jpg", "caption": "text"},  # 5 unreadable_image
        {"image": "good2.jpg", "caption": "   "},  # 6 empty_caption
        {"image": "good2.jpg", "caption": 12},  # 7 caption_not_text
        {"image": "../outside.jpg", "caption": "escape"},  # 8 path_escapes_root
        {"image": "/etc/hostname", "caption": "absolute"},  # 9 path_escapes_root
        "{not json",  # 10 bad_record
        {"image": "good1.jpg", "caption": "again"},  # 11 duplicate_key
        {"caption": "no image"},  # 12 missing_image_path
        {"image": "real_png.jpg", "caption": "png inside"},  # 13 ok
        {"image": "good2.jpg", "caption": "x" * 5000},  # 14 caption_too_long
    ]
    expected = {
        1: "missing_file",
        2: "unreadable_image",
        3: "decompression_bomb",
        4: "unreadable_image",
        5: "unreadable_image",
        6: "empty_caption",
        7: "caption_not_text",
        8: "path_escapes_root",
        9: "path_escapes_root",
        10: "bad_record",
        11: "duplicate_key",
        12: "missing_image_path",
        14: "caption_too_long",
    }
    return _write_jsonl(tmp_path / "in.jsonl", lines), root, expected


def test_bad_input_is_skipped_with_its_reason_and_counts_add_up(tmp_path: Path) -> None:
    jsonl, root, expected = _hostile_dataset(tmp_path)
    out = tmp_path / "out"
    manifest = _shard(
        out,
        input=str(jsonl),
        images=str(root),
        split="train",
        max_caption_chars=4000,
        figure=FigureOptions(max_image_pixels=4000),
        workers=2,
    )
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["row"]: s["reason"] for s in skipped} == expected
    rows = manifest["rows"]
    assert rows["read"] == 15 and rows["written"] == 2 and rows["skipped"] == 13
    assert rows["read"] == rows["written"] + rows["skipped"]
    samples = _read_samples(out)
    assert set(samples) == {"good1", "real_png"}
    assert "png" in samples["real_png"]  # named .jpg, stored under its real format
    assert not any(str(tmp_path) in line for line in (out / "skipped.jsonl").read_text())


def test_strict_stops_at_the_first_bad_row_and_names_it(tmp_path: Path) -> None:
    jsonl, root, _ = _hostile_dataset(tmp_path)
    # Row checks (caption, path, key) cover the whole input before any image is read.
    with pytest.raises(ValueError, match=r"row 6 \(good2.jpg\): empty_caption"):
        _shard(
            tmp_path / "out",
            input=str(jsonl),
            images=str(root),
            split="train",
            strict=True,
            figure=FigureOptions(max_image_pixels=4000),
        )
    rows = [{"image": "good1.jpg", "caption": "ok"}, {"image": "truncated.jpg", "caption": "c"}]
    _write_jsonl(jsonl, rows)
    with pytest.raises(ValueError, match=r"row 1 \(truncated.jpg\): unreadable_image"):
        _shard(tmp_path / "out2", input=str(jsonl), images=str(root), split="train", strict=True)


def test_csv_input_with_quoted_newlines_and_separators(tmp_path: Path) -> None:
    root = tmp_path / "img"
    root.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (root / name).write_bytes(_jpeg(16, 16))
    path = tmp_path / "in.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["figure", "text", "pmcid"])
        writer.writerow(["a.jpg", "line one\nline two\twith a tab, and a comma", "PMC9"])
        writer.writerow(["b.jpg", 'quoted "word"', "PMC9"])
    _shard(
        tmp_path / "out",
        input=str(path),
        images=str(root),
        img_key="figure",
        caption_key="text",
        csv_separator="\t",
        split="train",
    )
    samples = _read_samples(tmp_path / "out")
    assert samples["a"]["txt"].decode() == "line one\nline two\twith a tab, and a comma"
    assert samples["b"]["txt"].decode() == 'quoted "word"'
    assert json.loads(samples["a"]["json"])["pmcid"] == "PMC9"


def test_images_read_in_place_from_a_zip(tmp_path: Path) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=2)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in images.iterdir():
            z.write(path, f"figures/{path.name}")
    with pytest.raises(ValueError, match=r"zip://FOLDER::images.zip"):
        _shard(tmp_path / "bad", input=str(jsonl), images=str(archive))
    _shard(tmp_path / "zip", input=str(jsonl), images=f"zip://figures::{archive}", shard_size=3)
    _shard(tmp_path / "dir", input=str(jsonl), images=str(images), shard_size=3)
    for path in (tmp_path / "dir").glob("*.tar"):
        assert (tmp_path / "zip" / path.name).read_bytes() == path.read_bytes()


def test_user_errors_are_clear_at_start_up(tmp_path: Path) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1)
    with pytest.raises(ValueError, match="does not exist"):
        _shard(tmp_path / "o", input=str(tmp_path / "nope.jsonl"), images=str(images))
    with pytest.raises(ValueError, match="sum to 1"):
        _shard(
            tmp_path / "o",
            input=str(jsonl),
            images=str(images),
            split_fractions=(("train", 0.5), ("test", 0.2)),
        )
    with pytest.raises(ValueError, match=r"\.jsonl or \.csv"):
        _shard(tmp_path / "o", input=str(images / "x.txt"), images=str(images))
    _shard(tmp_path / "o", input=str(jsonl), images=str(images), shard_size=2)
    with pytest.raises(ValueError, match=r"other options \(shard_size\)"):
        _shard(tmp_path / "o", input=str(jsonl), images=str(images), shard_size=3)


def _cli(jsonl: Path, images: Path, out: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "tools" / "make_shards.py"),
        "--input",
        str(jsonl),
        "--images",
        str(images),
        "--output",
        out,
        "--shard-size",
        "3",
        "--shuffle",
        "--seed",
        "7",
        "--max-shard-bytes",
        "20000",
        *extra,
    ]


def _live_pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}


def _children(pid: int) -> set[int]:
    children = set()
    for child in _live_pids():
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.add(child)
    return children


def _tar_bytes(out: Path, pattern: str = "*.tar") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob(pattern))}


@pytest.mark.slow
def test_rerun_after_kill_9_gives_identical_shards(tmp_path: Path) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=30, min_side=64, max_side=128)
    reference = tmp_path / "reference"
    subprocess.run(
        _cli(jsonl, images, str(reference), "--workers", "0"), check=True, capture_output=True
    )
    expected = _tar_bytes(reference)
    expected_indexes = _tar_bytes(reference, "*.idx")
    num_shards = len(expected)
    assert sorted(expected_indexes) == sorted(name[:-4] + ".idx" for name in expected)
    assert num_shards > 30  # byte cap and count cap both close shards
    for seed in (1, 2, 3):
        out = tmp_path / f"killed-{seed}"
        kill_after = random.Random(seed).randrange(1, num_shards - 2)
        proc = subprocess.Popen(
            _cli(jsonl, images, str(out), "--workers", str(seed % 2 * 2)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while len(list((out / "_progress").glob("*.tar.json"))) < kill_after:
            assert proc.poll() is None, "finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        while workers & _live_pids():  # orphaned workers notice and leave
            assert time.monotonic() < deadline, f"workers {workers} outlived their parent"
            time.sleep(0.05)
        assert not (out / "manifest.json").exists()
        partial = len(list(out.glob("*.tar")))
        assert 0 < partial < num_shards
        subprocess.run(
            _cli(jsonl, images, str(out), "--workers", "1"), check=True, capture_output=True
        )
        assert _tar_bytes(out) == expected, f"seed {seed}: resumed shards differ"
        assert _tar_bytes(out, "*.idx") == expected_indexes, f"seed {seed}: indexes differ"
        assert not list(out.glob(".tmp-*"))
        resumed, straight = (
            json.loads((d / "manifest.json").read_text()) for d in (out, reference)
        )
        assert resumed["shards"] == straight["shards"] and resumed["rows"] == straight["rows"]


def test_s3_output_matches_local_output(tmp_path: Path, s3_bucket: str) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=4)
    local = tmp_path / "local"
    _shard(local, input=str(jsonl), images=str(images), shard_size=5, shuffle=True, seed=3)
    remote = f"{s3_bucket}/pmc-oa"
    manifest = _shard(
        remote, input=str(jsonl), images=str(images), shard_size=5, shuffle=True, seed=3, workers=2
    )
    fs = fsspec.filesystem("s3")
    for name, data in _tar_bytes(local).items():
        assert fs.cat_file(f"{remote}/{name}") == data
    assert json.loads(fs.cat_file(f"{remote}/sizes.json")) == json.loads(
        (local / "sizes.json").read_text()
    )
    assert manifest["options"]["output"] == remote
    assert sorted(s["name"] for s in manifest["shards"]) == sorted(_tar_bytes(local))


def test_paths_and_urls_helpers() -> None:
    assert safe_relative_path("a/./b.jpg") == "a/b.jpg"
    for bad in ("../a.jpg", "a/../../b.jpg", "/abs.jpg", "c:/x.jpg", "a\\..\\b.jpg", ""):
        assert safe_relative_path(bad) is None
    assert storage.redact_url("s3://AKIA:SeCrEt@bucket/x") == "s3://bucket/x"
    redacted = storage.redact_url("https://h/x.tar?X-Amz-Signature=abc&token=t&part=1")
    assert "abc" not in redacted and "=t&" not in redacted and "part=1" in redacted


def test_tar_members_have_fixed_headers(tmp_path: Path) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1)
    _shard(tmp_path / "out", input=str(jsonl), images=str(images), split="train")
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        members = tar.getmembers()
    assert members and all(m.mtime == 0 and m.uname == "pmc_clip" for m in members)
    assert oct((tmp_path / "out" / "sizes.json").stat().st_mode & 0o777) != "0o600"


def _inspect(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "tools" / "inspect_shards.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_inspect_shards_verifies_and_refuses_escaping_members(tmp_path: Path) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=2)
    out = tmp_path / "out"
    manifest = _shard(out, input=str(jsonl), images=str(images), shard_size=4, split="train")
    ok = _inspect(str(out), "--samples", "2", "--extract", str(tmp_path / "x"))
    assert ok.returncode == 0, ok.stderr
    assert f"verified {len(manifest['shards'])} shards: {len(manifest['shards'])} ok" in ok.stdout
    assert len(list((tmp_path / "x").iterdir())) == 6  # 2 samples x (image, txt, json)
    # One flipped byte in one shard: reported by name, exit code 1.
    victim = out / manifest["shards"][1]["name"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = _inspect(str(out), "--samples", "0")
    assert bad.returncode == 1 and f"BAD {victim.name}: sha256 differs" in bad.stdout
    # A hostile shard whose member would escape the extraction folder.
    evil = tmp_path / "evil"
    evil.mkdir()
    with tarfile.open(evil / "e-000000.tar", "w") as tar:
        for name, payload in (("../escaped.txt", b"pwned"), ("k.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shard_bytes = (evil / "e-000000.tar").read_bytes()
    entry = {
        "name": "e-000000.tar",
        "count": 1,
        "bytes": len(shard_bytes),
        "sha256": __import__("hashlib").sha256(shard_bytes).hexdigest(),
    }
    (evil / "manifest.json").write_text(json.dumps({"shards": [entry]}))
    result = _inspect(str(evil), "--extract", str(evil / "x"))
    assert result.returncode == 1 and "escapes the shard" in result.stdout
    assert not (tmp_path / "escaped.txt").exists() and not (evil / "escaped.txt").exists()
    assert [p.name for p in (evil / "x").iterdir()] == ["k.txt"]

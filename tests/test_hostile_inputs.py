"""make_shards on a folder of hostile inputs (issue 7): every row is written (as it is, or
converted with a reason) or skipped with a reason, the counts add up, nothing crashes, and
the trainer's own data loader reads every written sample.

tests/test_make_shards.py covers the JSONL side (truncated, bomb by option, zero bytes,
not an image, PNG named .jpg, '..', absolute path, bad JSON, duplicate, long caption);
this file adds image modes (alpha, 16-bit, CMYK, palette transparency), a real bomb, CSV
hazards (multi-megabyte and non-UTF-8 captions, quoting) and an end-to-end read.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_data import caption_tokenizer, collect, keys_of
from PIL import Image
from test_make_shards import _read_samples

from pmc_clip.config import DataConfig
from pmc_clip.data.loaders import build_eval_loader
from pmc_clip.sharding.cli import main
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.run import make_shards


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _rgba_with_hole() -> Image.Image:
    """Blue, opaque on the left half; the right half fully transparent over black."""
    image = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 8, 8))
    return image


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height greyscale pixels (a few hundred bytes
    on disk); decoding it would allocate width x height bytes."""

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return _png(header, pixels)


def _png(header: bytes, pixels: bytes) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        _png_chunk(kind, data)
        for kind, data in ((b"IHDR", header), (b"IDAT", pixels), (b"IEND", b""))
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


GREY16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
PALETTE_TRANSPARENT = 3  # palette index made transparent in palette.png


def _hostile_folder(root: Path) -> dict[str, bytes]:
    """Image files of every troublesome kind; returns their bytes by name."""
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 9, 9, 9] + [0] * 756)
    palette.paste(PALETTE_TRANSPARENT, (4, 0, 8, 8))
    opaque_rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 255))
    files = {
        "good.jpg": _encode(Image.new("RGB", (16, 16), "green"), "JPEG"),
        "truncated.jpg": _encode(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")[:400],
        "alpha.png": _encode(_rgba_with_hole(), "PNG"),
        "opaque_alpha.png": _encode(opaque_rgba, "PNG"),
        "grey_alpha.png": _encode(Image.new("LA", (8, 8), (50, 0)), "PNG"),
        "palette.png": _encode(palette, "PNG", transparency=PALETTE_TRANSPARENT),
        "grey16.png": _encode(Image.fromarray(GREY16), "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "bomb.png": _png_bomb(30_000, 30_000),  # 900 Mpx > 2 x PIL's default limit
        "zero.jpg": b"",
        "jpeg_named.png": _encode(Image.new("RGB", (16, 16), "white"), "JPEG"),
        "gif_named.jpg": _encode(Image.new("P", (8, 8), 2), "GIF"),
        "tiff16.tif": _encode(Image.fromarray(GREY16), "TIFF"),
    }
    # 16 bits per channel RGB: PIL reads it as 8-bit RGB (the high bytes): kept as it is.
    rgb16 = np.zeros((8, 8, 3), dtype=">u2")
    rgb16[..., 0] = 0xFF00
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    header = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)
    files["rgb16.png"] = _png(header, zlib.compress(raw))
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root.parent / "outside.jpg").write_bytes(files["good.jpg"])
    return files


def _csv_line(*fields: str) -> bytes:
    quoted = ['"' + f.replace('"', '""') + '"' for f in fields]
    return (",".join(quoted) + "\r\n").encode("utf-8")


def _hostile_csv(path: Path) -> dict[int, str]:
    """One row per hazard; returns {row: skip reason} for the rows that must be skipped."""
    huge = "multi-megabyte caption " * 150_000  # 3.4 MB: past csv's 128 KiB field limit
    lines = [
        _csv_line("image", "caption", "pmcid"),
        _csv_line("good.jpg", 'line one\nline two, with "quotes", commas\tand a tab', "PMC1"),  # 0
        _csv_line("truncated.jpg", "cut", "PMC1"),  # 1 unreadable_image
        _csv_line("alpha.png", "alpha", "PMC1"),  # 2 converted
        _csv_line("opaque_alpha.png", "opaque", "PMC1"),  # 3 kept
        _csv_line("grey_alpha.png", "grey alpha", "PMC1"),  # 4 converted
        _csv_line("palette.png", "palette", "PMC1"),  # 5 converted
        _csv_line("grey16.png", "grey 16", "PMC1"),  # 6 converted
        _csv_line("cmyk.jpg", "cmyk", "PMC1"),  # 7 kept
        _csv_line("rgb16.png", "rgb 16", "PMC1"),  # 8 kept
        _csv_line("bomb.png", "boom", "PMC1"),  # 9 decompression_bomb
        _csv_line("zero.jpg", "zero", "PMC1"),  # 10 unreadable_image
        _csv_line("jpeg_named.png", "jpeg inside", "PMC1"),  # 11 kept, stored as .jpg
        _csv_line("gif_named.jpg", "gif inside", "PMC1"),  # 12 stored as .png
        _csv_line("tiff16.tif", "tiff 16", "PMC1"),  # 13 converted, stored as .png
        b'"good.jpg","\xff\xfe not utf-8","PMC2"\r\n',  # 14 caption_not_utf8
        _csv_line("good.jpg", huge, "PMC2"),  # 15 caption_too_long
        _csv_line("good.jpg", "line one\nline two, with", "PMC1"),  # 16 duplicate_key
        _csv_line("good.jpg", 'line one\nline two, with "quotes", commas\tand a tab', "PMC1"),
        _csv_line("../outside.jpg", "escape", "PMC3"),  # 18 path_escapes_root
        _csv_line("sub/../../outside.jpg", "escape", "PMC3"),  # 19 path_escapes_root
        _csv_line("/etc/passwd", "absolute", "PMC3"),  # 20 path_escapes_root
        _csv_line("file:///etc/passwd", "url", "PMC3"),  # 21 path_escapes_root
        b'good.jpg,"stray"quote,PMC4\r\n',  # 22 bad_record (strict quoting)
        _csv_line("good.jpg", "one field too many", "PMC4", "extra"),  # 23 bad_record
        _csv_line("nope.jpg", "no such file", "PMC4"),  # 24 missing_file
    ]
    path.write_bytes(b"".join(lines))
    return {
        1: "unreadable_image",
        9: "decompression_bomb",
        10: "unreadable_image",
        14: "caption_not_utf8",
        15: "caption_too_long",
        16: "duplicate_key",
        17: "duplicate_key",
        18: "path_escapes_root",
        19: "path_escapes_root",
        20: "path_escapes_root",
        21: "path_escapes_root",
        22: "bad_record",
        23: "bad_record",
        24: "missing_file",
    }


@dataclass(frozen=True)
class Hostile:
    files: dict[str, bytes]
    expected_skips: dict[int, str]
    out: Path
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    """The hostile folder and CSV, sharded once (one worker process: figures cross IPC)."""
    root = tmp_path_factory.mktemp("hostile")
    files = _hostile_folder(root / "img")
    expected_skips = _hostile_csv(root / "in.csv")
    out = root / "out"
    options = ShardOptions(
        input=str(root / "in.csv"),
        images=str(root / "img"),
        output=str(out),
        split="train",
        shard_size=4,
        workers=1,
    )
    return Hostile(files, expected_skips, out, make_shards(options))


def test_hostile_folder_every_row_written_converted_or_skipped_with_a_reason(
    hostile: Hostile,
) -> None:
    files, expected_skips, out, manifest = (
        hostile.files,
        hostile.expected_skips,
        hostile.out,
        hostile.manifest,
    )
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {s["row"]: s["reason"] for s in skipped} == expected_skips
    assert all(s["detail"] for s in skipped)
    assert next(s["detail"] for s in skipped if s["row"] == 22).startswith("line 27:")
    rows = manifest["rows"]
    assert (rows["read"], rows["written"], rows["skipped"]) == (25, 11, 14)
    assert rows["converted_by_reason"] == {"16bit_to_8bit": 2, "alpha_flattened": 3}
    assert rows["converted"] == 5

    samples = _read_samples(out)
    meta = {key: json.loads(sample["json"]) for key, sample in samples.items()}
    conversions = {key: m["conversion"] for key, m in meta.items() if m["conversion"]}
    assert conversions == {
        "alpha": "alpha_flattened",
        "grey_alpha": "alpha_flattened",
        "palette": "alpha_flattened",
        "grey16": "16bit_to_8bit",
        "tiff16": "16bit_to_8bit",
    }
    # Kept byte-for-byte: the training decode reads these as they look.
    for key, name in [
        ("good", "good.jpg"),
        ("opaque_alpha", "opaque_alpha.png"),
        ("cmyk", "cmyk.jpg"),
        ("rgb16", "rgb16.png"),
    ]:
        ext = name.rsplit(".", 1)[1]
        assert samples[key][ext] == files[name], key
        assert not meta[key]["reencoded"] and meta[key]["conversion"] is None
    assert (meta["cmyk"]["original_mode"], meta["opaque_alpha"]["original_mode"]) == (
        "CMYK",
        "RGBA",
    )
    assert samples["jpeg_named"]["jpg"] == files["jpeg_named.png"]  # stored under its format
    assert "png" in samples["gif_named"] and meta["gif_named"]["original_format"] == "GIF"
    assert samples["good"]["txt"].decode() == 'line one\nline two, with "quotes", commas\tand a tab'
    # Transparent pixels show white (the page), opaque ones keep their colour.
    alpha = Image.open(io.BytesIO(samples["alpha"]["png"]))
    assert alpha.mode == "RGB"
    assert alpha.getpixel((2, 2)) == (0, 0, 255) and alpha.getpixel((12, 2)) == (255, 255, 255)
    grey_alpha = Image.open(io.BytesIO(samples["grey_alpha"]["png"]))
    assert grey_alpha.mode == "L" and grey_alpha.getextrema() == (255, 255)
    palette = Image.open(io.BytesIO(samples["palette"]["png"])).convert("RGB")
    assert palette.getpixel((1, 1)) == (255, 0, 0) and palette.getpixel((6, 1)) == (255, 255, 255)
    # 16-bit grey scaled, not clipped: the full range survives in 8 bits.
    for key in ("grey16", "tiff16"):
        grey = np.asarray(Image.open(io.BytesIO(samples[key]["png"])))
        assert grey.dtype == np.uint8 and np.array_equal(grey, (GREY16 >> 8).astype(np.uint8))
    assert meta["grey16"]["original_mode"].startswith("I")


def test_trainer_loader_reads_every_written_hostile_sample(
    hostile: Hostile, tmp_path: Path
) -> None:
    """End to end: the shards written from hostile input decode in the training pipeline
    (no bad sample) and every written key arrives exactly once."""
    out, manifest = hostile.out, hostile.manifest
    pattern = str(out / manifest["splits"]["train"]["pattern"])
    tokenizer = caption_tokenizer(tmp_path / "tokenizer")
    cfg = DataConfig(val_data=pattern, val_batch_size=4, num_workers=0, image_size=16)
    loader = build_eval_loader(cfg, tokenizer, rank=0, world_size=1)
    keys = keys_of(collect(loader))
    assert sorted(keys) == sorted(_read_samples(out)) and len(keys) == 11
    totals = loader.meter.totals()
    assert totals["samples_bad"] == 0 and totals["samples_delivered"] == 11


def test_csv_quote_never_closed_stops_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(_encode(Image.new("RGB", (8, 8)), "JPEG"))
    text = 'image,caption\na.jpg,fine\na.jpg,"never closed\nb.jpg,x\nc.jpg,y\n'
    (tmp_path / "in.csv").write_text(text)
    argv = ["--input", str(tmp_path / "in.csv"), "--images", str(tmp_path / "img")]
    assert main([*argv, "--output", str(tmp_path / "out"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "line 3: a quoted field is never closed" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()

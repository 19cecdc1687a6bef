"""make_shards reading hostile input files (issue 13): CSV/JSONL headers and BOMs, EXIF
orientation, links, FIFOs, huge or lying files and zip members, a truncated images.zip.

Every bad figure costs its row with a reason (never the run, never a hang, never more
memory than --max-image-bytes); a wrong input file or flag is one start-up line, exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import S3_BUCKET, FaultProxy
from helpers_data import deadline
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin
from test_make_shards import _read_samples

from pmc_clip.sharding.cli import main
from pmc_clip.sharding.figures import Figure, FigureError, FigureOptions, check_figure
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.run import make_shards

ORIENTATION = ExifTags.Base.Orientation


def _jpeg(image: Image.Image, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def _png(image: Image.Image, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _marked(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Red with a blue left quarter: every rotation and mirror of it looks different."""
    image = Image.new(mode, (width, height), "red")
    image.paste("blue", (0, 0, width // 4, height))
    return image


def _shard(tmp_path: Path, rows: list[dict[str, str]], **kwargs: Any) -> dict[str, Any]:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = {"images": str(tmp_path / "img"), "split": "train", "workers": 0} | kwargs
    return make_shards(ShardOptions(input=str(jsonl), output=str(tmp_path / "out"), **options))


def _skips(tmp_path: Path) -> dict[str, dict[str, Any]]:
    lines = (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()
    return {skip["image"]: skip for skip in map(json.loads, lines)}


# --------------------------------------------------------------------------- rows


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_input_with_a_utf8_bom_is_read_as_without(tmp_path: Path, suffix: str) -> None:
    """Excel and Windows tools start a file with a BOM: it is not part of the first column
    name (CSV), nor makes the first line invalid JSON."""
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(_jpeg(_marked(8, 8)))
    if suffix == "csv":
        text = "image,caption\na.jpg,first caption\nb.jpg,second\n"
    else:
        text = "".join(
            json.dumps({"image": name, "caption": caption}) + "\n"
            for name, caption in (("a.jpg", "first caption"), ("b.jpg", "second"))
        )
    (tmp_path / f"in.{suffix}").write_bytes(b"\xef\xbb\xbf" + text.encode())
    options = ShardOptions(
        input=str(tmp_path / f"in.{suffix}"),
        images=str(tmp_path / "img"),
        output=str(tmp_path / "out"),
        split="train",
        workers=0,
    )
    rows = make_shards(options)["rows"]
    assert (rows["read"], rows["written"], rows["skipped"]) == (2, 2, 0)
    assert _read_samples(tmp_path / "out")["a"]["txt"] == b"first caption"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "in.csv",
            "img,text\na.jpg,a caption\n",
            "no column 'image' (--csv-img-key) or 'caption' (--csv-caption-key) in the one "
            "row; it has 'img', 'text'",
        ),
        (
            "in.csv",
            "image;caption\na.jpg;one\nb.jpg;two\n",
            "no column 'image' (--csv-img-key) or 'caption' (--csv-caption-key) in the first "
            "2 rows; it has 'image;caption'; is ',' its separator (--csv-separator)?",
        ),
        (
            "in.csv",
            "image;caption\na.jpg;one, two\nb.jpg;three, four\n",
            "cannot read the first 2 rows (row 0: line 2: 2 fields, the header has 1); "
            "is ',' its separator (--csv-separator)?",
        ),
        (
            "in.jsonl",
            '{"image": "a.jpg", "text": "one"}\n{"image": "b.jpg", "text": "two"}\n',
            "no column 'caption' (--csv-caption-key) in the first 2 rows; it has 'image', 'text'",
        ),
    ],
    ids=["csv-wrong-names", "csv-wrong-separator", "csv-wrong-separator-no-row-read", "jsonl"],
)
def test_input_without_the_key_columns_is_a_startup_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    """Not "0 written, exit 0" with every row skipped: one line naming the columns found."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(_jpeg(_marked(8, 8)))
    (tmp_path / name).write_text(text)
    argv = ["--input", str(tmp_path / name), "--images", str(tmp_path / "img")]
    assert main([*argv, "--output", str(tmp_path / "out"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err == f"make_shards: error: --input {tmp_path / name}: {message}\n"
    assert not (tmp_path / "out" / "manifest.json").exists()


# --------------------------------------------------------------------------- EXIF


def test_exif_orientation_applied_once_at_sharding(tmp_path: Path) -> None:
    """The training decode (PIL open + convert("RGB")) ignores EXIF: the stored figure must
    already look as the original is shown, and carry no tag that a viewer would apply on
    top. Lossless (PNG) unless a JPEG is resized anyway; sizes are the shown ones."""
    img = tmp_path / "img"
    img.mkdir()
    rgba = _marked(12, 8, "RGBA")
    rgba.paste((0, 0, 0, 0), (9, 0, 12, 8))  # transparent on the right: flattened too
    originals = {
        "flip.jpg": _jpeg(_marked(16, 8), exif=_exif(2)),
        "upside_down.jpg": _jpeg(_marked(16, 8), exif=_exif(3)),
        "turned.jpg": _jpeg(_marked(16, 8), exif=_exif(6)),
        "turned_back.jpg": _jpeg(_marked(16, 8), exif=_exif(8)),
        "upright.jpg": _jpeg(_marked(16, 8), exif=_exif(1)),
        "alpha.png": _png(rgba, exif=_exif(5)),
        "big_turned.jpg": _jpeg(_marked(64, 32), exif=_exif(6)),
    }
    for name, data in originals.items():
        (img / name).write_bytes(data)
    rows = [{"image": name, "caption": name} for name in originals]
    manifest = _shard(tmp_path, rows, figure=FigureOptions(resize_max_side=20))

    samples = _read_samples(tmp_path / "out")
    meta = {key: json.loads(sample["json"]) for key, sample in samples.items()}
    assert {key: m["conversion"] for key, m in meta.items()} == {
        "flip": "exif_orientation",
        "upside_down": "exif_orientation",
        "turned": "exif_orientation",
        "turned_back": "exif_orientation",
        "upright": None,
        "alpha": "exif_orientation+alpha_flattened",
        "big_turned": "exif_orientation",
    }
    assert manifest["rows"]["converted_by_reason"] == {
        "exif_orientation": 5,
        "exif_orientation+alpha_flattened": 1,
    }
    for name in ("flip", "upside_down", "turned", "turned_back"):
        shown = ImageOps.exif_transpose(Image.open(img / f"{name}.jpg")).convert("RGB")
        stored = Image.open(io.BytesIO(samples[name]["png"]))  # lossless: the exact pixels
        assert ORIENTATION not in stored.getexif(), name
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(shown)), name
        assert (meta[name]["width"], meta[name]["height"]) == shown.size
        assert (meta[name]["original_width"], meta[name]["original_height"]) == shown.size
    assert samples["upright"]["jpg"] == originals["upright.jpg"]  # orientation 1: kept as is
    alpha = Image.open(io.BytesIO(samples["alpha"]["png"]))
    assert alpha.mode == "RGB" and alpha.size == (8, 12)  # TRANSPOSE: x and y swapped
    # The blue quarter went to the top, the transparent columns to the bottom (white).
    assert alpha.getpixel((4, 0)) == (0, 0, 255) and alpha.getpixel((4, 11)) == (255, 255, 255)
    # Resized after the orientation: 32x64 as shown, so 10x20; a JPEG stays a JPEG.
    big = Image.open(io.BytesIO(samples["big_turned"]["jpg"]))
    assert big.size == (10, 20) and ORIENTATION not in big.getexif()
    assert (meta["big_turned"]["original_width"], meta["big_turned"]["original_height"]) == (
        32,
        64,
    )
    top, bottom = big.convert("RGB").getpixel((5, 1)), big.convert("RGB").getpixel((5, 18))
    assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]  # blue on top, red below


# --------------------------------------------------------------------------- local files


@contextlib.contextmanager
def _address_space_limit(extra_bytes: int) -> Iterator[None]:
    """Allocations past the current address space + `extra_bytes` fail (MemoryError),
    so a figure read into memory whole shows as an error, not as a swapping machine."""
    vm_size_kib = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmSize:")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size_kib * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("the hard address-space limit is below what this test needs")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_links_fifos_and_huge_local_files_cost_their_row_never_a_hang_or_the_memory(
    tmp_path: Path,
) -> None:
    img = tmp_path / "img"
    img.mkdir()
    good = _jpeg(_marked(8, 8))
    (img / "good.jpg").write_bytes(good)
    (tmp_path / "secret.jpg").write_bytes(good)
    (tmp_path / "secret_dir").mkdir()
    (tmp_path / "secret_dir" / "x.jpg").write_bytes(good)
    (img / "inside_link.jpg").symlink_to("good.jpg")  # stays below the root: read
    (img / "outside_link.jpg").symlink_to(tmp_path / "secret.jpg")
    (img / "outside_dir").symlink_to(tmp_path / "secret_dir")
    (img / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(img / "fifo.jpg")
    (img / "loop.jpg").symlink_to("loop.jpg")
    (img / "folder.jpg").mkdir()
    with open(img / "sparse.jpg", "wb") as sparse:
        sparse.truncate(64 << 30)  # 64 GiB that take no disk space
    long_name = "L" * 300 + ".jpg"  # ENAMETOOLONG: no file system holds such a name
    names = [
        "good.jpg",
        "inside_link.jpg",
        "outside_link.jpg",
        "outside_dir/x.jpg",
        "zero.jpg",
        "fifo.jpg",
        "loop.jpg",
        "folder.jpg",
        "sparse.jpg",
        long_name,
    ]
    rows = [{"image": name, "caption": f"row {i}"} for i, name in enumerate(names)]
    with deadline(60), _address_space_limit(1 << 30):
        manifest = _shard(tmp_path, rows, figure=FigureOptions(max_image_bytes=1 << 20))

    assert sorted(_read_samples(tmp_path / "out")) == ["good", "inside_link"]
    reasons = {name: (skip["reason"], skip["detail"]) for name, skip in _skips(tmp_path).items()}
    outside = ("path_escapes_root", "a symlink resolves outside the image root")
    assert reasons == {
        "outside_link.jpg": outside,
        "outside_dir/x.jpg": outside,
        "zero.jpg": outside,
        "fifo.jpg": ("not_a_regular_file", "a FIFO, device or socket, not a file"),
        "loop.jpg": ("read_error", reasons["loop.jpg"][1]),
        "folder.jpg": ("missing_file", "path is a directory"),
        "sparse.jpg": ("image_too_large", f"{64 << 30} bytes > --max-image-bytes"),
        long_name: ("read_error", reasons[long_name][1]),
    }
    assert "Too many levels of symbolic links" in reasons["loop.jpg"][1]
    assert "File name too long" in reasons[long_name][1]
    assert manifest["rows"]["skipped_by_reason"] == {
        "image_too_large": 1,
        "missing_file": 1,
        "not_a_regular_file": 1,
        "path_escapes_root": 3,
        "read_error": 2,
    }


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_unreadable_local_file_costs_its_row(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for name in ("good.jpg", "locked.jpg"):
        (tmp_path / "img" / name).write_bytes(_jpeg(_marked(8, 8)))
    (tmp_path / "img" / "locked.jpg").chmod(0)
    rows = [{"image": name, "caption": name} for name in ("good.jpg", "locked.jpg")]
    assert _shard(tmp_path, rows)["rows"]["written"] == 1
    skip = _skips(tmp_path)["locked.jpg"]
    assert skip["reason"] == "read_error" and "Permission denied" in skip["detail"]


def test_object_over_the_limit_is_never_downloaded(tmp_path: Path, fault_proxy: FaultProxy) -> None:
    """--images on S3: the object's size (a HEAD) decides; a figure is one ranged GET."""
    import fsspec

    good = _jpeg(_marked(8, 8))
    fs = fsspec.filesystem("s3")
    fs.pipe({f"{S3_BUCKET}/img/good.jpg": good, f"{S3_BUCKET}/img/big.jpg": bytes(2 << 20)})
    rows = [{"image": name, "caption": name} for name in ("good.jpg", "big.jpg")]
    options = {"images": f"s3://{S3_BUCKET}/img", "figure": FigureOptions(max_image_bytes=1 << 20)}
    manifest = _shard(tmp_path, rows, **options)
    assert _read_samples(tmp_path / "out")["good"]["jpg"] == good
    assert manifest["rows"]["skipped_by_reason"] == {"image_too_large": 1}
    assert ("GET", f"/{S3_BUCKET}/img/big.jpg") not in fault_proxy.requests
    assert ("GET", f"/{S3_BUCKET}/img/good.jpg") in fault_proxy.requests


def test_an_image_store_failing_stops_the_run_and_the_rerun_resumes(
    tmp_path: Path,
    fault_proxy: FaultProxy,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A figure the store will not serve (503s after the client's retries) is the store
    failing, not a bad row: one line, exit 1, nothing skipped; the rerun completes."""
    import fsspec

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's throttling backoff: seconds

    fs = fsspec.filesystem("s3")
    names = [f"fig{i}.jpg" for i in range(4)]
    fs.pipe({f"{S3_BUCKET}/img/{name}": _jpeg(_marked(8, 8)) for name in names})
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"image": name, "caption": name}) + "\n" for name in names)
    )
    command = [
        "--input", str(tmp_path / "in.jsonl"), "--images", f"s3://{S3_BUCKET}/img",
        "--output", str(tmp_path / "out"), "--shard-size", "1", "--workers", "1",
    ]  # fmt: skip
    fault_proxy.always_fail = ("/img/fig2.jpg",)
    assert main(command) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"s3://{S3_BUCKET}/img/fig2.jpg" in error
    assert "rerun the same command to resume" in error
    assert not (tmp_path / "out" / "manifest.json").exists()
    fault_proxy.always_fail = ()
    assert main(command) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"]["written"] == 4 and manifest["rows"]["skipped"] == 0


# --------------------------------------------------------------------------- zip


def _central_directory_entry(raw: bytes, name: str) -> int:
    """Offset of `name`'s entry in the zip's central directory."""
    offset = raw.find(b"PK\x01\x02")
    while offset != -1:
        (name_length,) = struct.unpack_from("<H", raw, offset + 28)
        if raw[offset + 46 : offset + 46 + name_length] == name.encode():
            return offset
        offset = raw.find(b"PK\x01\x02", offset + 46)
    raise AssertionError(f"{name} not in the zip")


def _member_data(raw: bytes, name: str) -> int:
    """Offset of `name`'s (compressed) data, after its local header."""
    (local_header,) = struct.unpack_from("<I", raw, _central_directory_entry(raw, name) + 42)
    name_length, extra_length = struct.unpack_from("<HH", raw, local_header + 26)
    return local_header + 30 + name_length + extra_length


def _hostile_zip(path: Path) -> None:
    """A real zip, then edited as a damaged or hostile one would be."""
    figure = _jpeg(Image.effect_noise((32, 32), 40).convert("RGB"))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("good.jpg", "encrypted.jpg", "claims_huge.jpg", "claims_tiny.jpg"):
            archive.writestr(name, figure)
        archive.writestr("bad_crc.jpg", figure, compress_type=zipfile.ZIP_STORED)
        archive.writestr("huge.jpg", figure + bytes(3 << 20))  # honestly over the limit
    raw = bytearray(path.read_bytes())
    raw[_member_data(raw, "bad_crc.jpg") + 100] ^= 0xFF
    flags = _central_directory_entry(raw, "encrypted.jpg") + 8
    raw[flags] |= 0x1
    # The directory's uncompressed size of a member, past the limit or below the truth.
    struct.pack_into("<I", raw, _central_directory_entry(raw, "claims_huge.jpg") + 24, 2**31)
    struct.pack_into("<I", raw, _central_directory_entry(raw, "claims_tiny.jpg") + 24, 10)
    path.write_bytes(raw)


def test_hostile_zip_members_cost_their_row(tmp_path: Path) -> None:
    """Read in a spawned worker, as in a real run; sizes come from the zip's directory,
    so a member over the limit is never inflated."""
    _hostile_zip(tmp_path / "images.zip")
    names = [
        "good.jpg",
        "encrypted.jpg",
        "bad_crc.jpg",
        "claims_huge.jpg",
        "claims_tiny.jpg",
        "huge.jpg",
    ]
    rows = [{"image": name, "caption": name} for name in names]
    options = {"images": str(tmp_path / "images.zip"), "workers": 1}
    with deadline(60):
        manifest = _shard(tmp_path, rows, figure=FigureOptions(max_image_bytes=1 << 20), **options)
    assert sorted(_read_samples(tmp_path / "out")) == ["good"]
    reasons = {name: (skip["reason"], skip["detail"]) for name, skip in _skips(tmp_path).items()}
    huge_size = len(zipfile.ZipFile(tmp_path / "images.zip").read("good.jpg")) + (3 << 20)
    assert reasons == {
        "encrypted.jpg": ("read_error", "an encrypted zip member (needs a password)"),
        "bad_crc.jpg": ("read_error", "BadZipFile: Bad CRC-32 for file 'bad_crc.jpg'"),
        "claims_huge.jpg": ("image_too_large", f"{2**31} bytes > --max-image-bytes"),
        "claims_tiny.jpg": ("read_error", "BadZipFile: Bad CRC-32 for file 'claims_tiny.jpg'"),
        "huge.jpg": ("image_too_large", f"{huge_size} bytes > --max-image-bytes"),
    }
    assert manifest["rows"]["written"] == 1


def test_truncated_images_zip_is_one_startup_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cut in the middle (an interrupted download): the directory at its end is gone."""
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("a.jpg", _jpeg(_marked(8, 8)))
    raw = (tmp_path / "images.zip").read_bytes()
    (tmp_path / "images.zip").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "in.csv").write_text("image,caption\na.jpg,a caption\n")
    argv = ["--input", str(tmp_path / "in.csv"), "--images", str(tmp_path / "images.zip")]
    assert main([*argv, "--output", str(tmp_path / "out"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"make_shards: error: --images {tmp_path / 'images.zip'} cannot be opened as a zip "
        "archive (File is not a zip file); a truncated or partly downloaded zip lacks the "
        "directory at its end: fetch it again\n"
    )


# --------------------------------------------------------------------------- draft decode


def _textured(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Gradients, stripes and noise: a resize that loses or shifts detail shows in it."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.stack(
        [128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), (x + y) * 255 / (width + height)],
        axis=-1,
    )
    pixels += np.random.default_rng(0).normal(0, 12, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)


@pytest.fixture
def drafts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(full size, requested size) of every draft a JPEG decode is asked for."""
    seen: list[tuple[tuple[int, int], tuple[int, int]]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: Any) -> Any:
        seen.append((self.size, size))
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


def _distance_to_full_decode(stored: bytes, original: bytes) -> tuple[float, float]:
    """Mean absolute pixel difference (of 255) between a stored figure and the original
    fully decoded, oriented and resized to the stored size; and the same for that full
    decode resize itself saved at q90 (what the re-encoding alone costs)."""
    image = Image.open(io.BytesIO(stored))
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(original)))
    reference = shown.resize(image.size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    reference.save(buffer, "JPEG", quality=90)
    reencoded = Image.open(buffer).convert("RGB")
    pixels = np.asarray(reference.convert("RGB"), np.float64)
    return (
        float(np.abs(np.asarray(image.convert("RGB"), np.float64) - pixels).mean()),
        float(np.abs(np.asarray(reencoded, np.float64) - pixels).mean()),
    )


@pytest.mark.parametrize(
    ("size", "mode", "target"),
    [
        ((2000, 1500), "RGB", (512, 384)),  # 1/2 would be 1000x750, 1/4 500x375 < target
        ((1024, 1024), "RGB", (512, 512)),  # exactly 1/2: the draft is the target
        ((4100, 300), "RGB", (512, 37)),  # the short side limits the scale (1/8)
        ((513, 100), "RGB", (512, 100)),  # barely over: no scale fits, a full decode
        ((1600, 1200), "L", (512, 384)),
        ((1600, 1200), "CMYK", (512, 384)),
    ],
)
def test_shrunk_jpeg_is_decoded_in_draft_mode_to_the_same_target(
    drafts: list[tuple[tuple[int, int], tuple[int, int]]],
    size: tuple[int, int],
    mode: str,
    target: tuple[int, int],
) -> None:
    """A JPEG over --resize-max-side is DCT-scaled while decoding, never below its target:
    same stored size and mode as a full decode would give, pixels close to it, the same
    bytes on every run (a resumed run rewrites shards byte for byte)."""
    data = _jpeg(_textured(*size, mode))
    options = FigureOptions(resize_max_side=512, jpeg_quality=90)
    figure = check_figure(data, options)
    assert isinstance(figure, Figure)
    assert drafts == [(size, target)]
    stored = Image.open(io.BytesIO(figure.data))
    assert (figure.ext, stored.format, stored.mode, stored.size) == ("jpg", "JPEG", mode, target)
    assert (figure.width, figure.height) == target
    assert (figure.original_width, figure.original_height) == size
    assert (figure.original_mode, figure.reencoded, figure.conversion) == (mode, True, None)
    # Close to a full decode's resize: the DCT-scaled decode adds at most 2.5/255 of mean
    # difference (1.8 at 1/8 on this noisy texture) to what re-encoding alone costs.
    difference, reencoding = _distance_to_full_decode(figure.data, data)
    assert difference < reencoding + 2.5
    assert check_figure(data, options) == figure


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])
def test_draft_decode_keeps_the_exif_orientation(
    drafts: list[tuple[tuple[int, int], tuple[int, int]]], orientation: int
) -> None:
    """The target is of the figure as shown; the draft is requested in the frame the
    pixels are stored in (swapped for orientations that transpose), so 1/8 is taken for
    1600x800 stored, shown 800x1600, resized to 100x200."""
    data = _jpeg(_textured(1600, 800), exif=_exif(orientation))
    figure = check_figure(data, FigureOptions(resize_max_side=200))
    assert isinstance(figure, Figure)
    transposed = orientation >= 5
    shown = (800, 1600) if transposed else (1600, 800)
    target = (100, 200) if transposed else (200, 100)
    assert drafts == [((1600, 800), (200, 100))]
    assert (figure.width, figure.height, figure.original_width, figure.original_height) == (
        *target,
        *shown,
    )
    assert figure.conversion == "exif_orientation"
    stored = Image.open(io.BytesIO(figure.data))
    assert stored.size == target and ORIENTATION not in stored.getexif()
    difference, reencoding = _distance_to_full_decode(figure.data, data)
    assert difference < reencoding + 2.5


@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_is_refused_in_draft_mode(
    drafts: list[tuple[tuple[int, int], tuple[int, int]]], progressive: bool
) -> None:
    """A draft decode reads the whole entropy-coded stream (only the inverse DCT is
    scaled): a large JPEG cut anywhere, even just before its end marker, is refused as
    it is by a full decode, never shrunk and stored."""
    data = _jpeg(_textured(2000, 1500), progressive=progressive)
    options = FigureOptions(resize_max_side=256)
    for end in (len(data) // 2, len(data) * 9 // 10, len(data) - 100, len(data) - 2):
        drafts.clear()
        error = check_figure(data[:end], options)
        assert isinstance(error, FigureError), end
        assert (error.reason, error.detail.split("(")[0]) == (
            "unreadable_image",
            "OSError: image file is truncated ",
        )
        assert drafts == [((2000, 1500), (256, 192))]  # the draft path was the one taken
    assert isinstance(check_figure(data, options), Figure)


@pytest.mark.parametrize("limit", [4_000_000, 6_000_000])  # over 2x the limit, and within
def test_bomb_is_refused_on_its_full_size_before_any_draft(
    drafts: list[tuple[tuple[int, int], tuple[int, int]]], limit: int
) -> None:
    """--max-image-pixels applies to the size in the header (3000x3000 = 9 MP), not to
    the 375x375 a draft would decode, and is checked before any pixel is decoded."""
    data = _jpeg(Image.new("RGB", (3000, 3000), "white"))
    error = check_figure(data, FigureOptions(resize_max_side=512, max_image_pixels=limit))
    assert isinstance(error, FigureError) and error.reason == "decompression_bomb"
    assert drafts == []


def test_figures_not_shrunk_are_fully_decoded_and_kept_byte_for_byte(
    drafts: list[tuple[tuple[int, int], tuple[int, int]]],
) -> None:
    """No draft for a JPEG within the limit (its bytes are stored), nor for other formats
    (a PNG is resized from its full decode)."""
    small = _jpeg(_textured(512, 300))
    kept = check_figure(small, FigureOptions(resize_max_side=512))
    assert isinstance(kept, Figure) and kept.data == small and not kept.reencoded
    png = check_figure(_png(_textured(1000, 600)), FigureOptions(resize_max_side=512))
    assert isinstance(png, Figure) and (png.ext, png.width, png.height) == ("png", 512, 307)
    assert drafts == []


def test_an_unreadable_figure_s_detail_is_the_same_on_every_run() -> None:
    """PIL's message names the in-memory file by its address; skipped.jsonl must not
    (two runs, or parts run by hand and under SLURM, write the same bytes)."""
    details = {
        check_figure(b"\x89PNG\r\n\x1a\nnot a png", FigureOptions()).detail  # type: ignore[union-attr]
        for _ in range(2)
    }
    assert details == {"UnidentifiedImageError: cannot identify image file"}

"""Reading and checking one figure for a shard: runs in make_shards' worker processes.

What happens to an image (every figure is decoded once, here, all of its data: a JPEG that
will be shrunk by --resize-max-side is decoded DCT-scaled, libjpeg's draft mode, which
still reads its whole entropy-coded stream, so truncation is caught as in a full decode):
  * JPEG and PNG are stored byte-for-byte, whatever their mode (greyscale, palette, CMYK
    JPEG, 16-bit-per-channel RGB, an alpha channel that is fully opaque): the training
    decode (`convert("RGB")`) reads them as they look. `original_mode` in the sample's
    `.json` says what the file holds.
  * Three kinds are converted, because the training decode would get them wrong, and the
    sample's `.json` names the `conversion` (counted per reason in the manifest):
      - `exif_orientation`: an EXIF Orientation tag (2-8) is applied to the pixels, first,
        so the figure is stored as it is shown (the training decode ignores the tag and
        would see it mirrored or on its side); the stored bytes carry no tag;
      - `alpha_flattened`: transparency that is used (some pixel not opaque) is composited
        onto white, as the figure shows on the article's page (`convert("RGB")` would drop
        the alpha and show the hidden colour, often black, behind transparent pixels);
      - `16bit_to_8bit`: 16/32-bit greyscale is scaled to 8 bits (`convert("RGB")` clips
        every value above 255 to white).
    A figure converted twice names both in the order applied, joined by `+` (e.g.
    `exif_orientation+alpha_flattened`). Converted figures are stored as PNG (lossless),
    or as JPEG when a JPEG is resized anyway. Sizes (`width`, `original_width`...) are of
    the figure as shown, after its orientation.
  * Other formats (GIF, TIFF, BMP, WebP...) are stored as PNG; `--resize-max-side`
    re-encodes only figures whose longer side exceeds it.
  * Zero bytes, truncated or undecodable data, and decompression bombs are refused with a
    reason (`unreadable_image`, `decompression_bomb`, `image_too_large`).

What is read (a figure's row is skipped with a reason, the run goes on):
  * below the image root only: a local symlink that resolves outside it (to another
    folder, to /dev/zero) is `path_escapes_root`, like a `..` in the path;
  * only regular files: a FIFO, a device or a socket is `not_a_regular_file`, refused
    before any read (opened non-blocking, so a FIFO never hangs a worker);
  * at most --max-image-bytes: the size is checked before reading (the file's fstat, the
    zip directory, the object's HEAD) and `image_too_large` is never read; the read itself
    stops one byte past the limit, so a size that lies (a zip directory, a growing file)
    still cannot fill the memory;
  * a file that fails to read (EACCES, EIO, a name too long, an encrypted zip member, a
    zip member with a bad CRC or broken compressed data) is `read_error`.

Deliberately imports neither torch nor webdataset: make_shards starts its workers with
`spawn` (fsspec filesystems such as s3fs are not fork-safe), and each worker pays only
for PIL and fsspec (~0.2 s) instead of torch (~3 s).
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import ExifTags, Image, ImageOps

from pmc_clip import storage
from pmc_clip.config import DataConfig
from pmc_clip.flags import option

# Formats stored byte-for-byte when no resize is asked for; anything else is re-encoded.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}
# PNG stores these modes as they are; other modes are converted to RGB(A) first.
_PNG_MODES = {"1", "L", "LA", "RGB", "RGBA", "P"}
_JPEG_MODES = {"L", "RGB", "CMYK"}
# Greyscale with more than 8 bits per pixel: scaled to 8 bits before storing.
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# EXIF Orientation values that move pixels (1 is "as stored"; others are not defined).
_MOVING_ORIENTATIONS = range(2, 9)
# Those of them that swap width and height (transpose, rotate by 90 or 270 degrees...).
_TRANSPOSING_ORIENTATIONS = range(5, 9)
# How one figure's read can fail besides a missing file: the OS (EACCES, EIO, ENAMETOOLONG,
# ELOOP...), or a zip member's data (bad CRC or local header, broken deflate stream,
# compressed data ending early, a compression method zipfile lacks).
_READ_ERRORS = (OSError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)
_OBJECT_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")
# zipfile's flag bit for an encrypted member (reading it needs a password).
_ZIP_ENCRYPTED_FLAG = 0x1


@dataclass(frozen=True)
class FigureOptions:
    resize_max_side: int | None = option(
        None,
        "--resize-max-side",
        "re-encode figures whose longer side is over this, to this (none: keep every size)",
        unit="pixels",
        type=int,
    )
    jpeg_quality: int = option(
        90, "--jpeg-quality", "quality of re-encoded JPEGs, 1-95", unit="PIL quality", type=int
    )
    max_image_pixels: int = option(
        89_478_485,  # PIL's own default bomb threshold
        "--max-image-pixels",
        "a larger figure is a decompression_bomb, refused before decoding",
        unit="pixels",
        type=int,
    )
    # The loader's member limit: a figure make_shards keeps, the loader reads.
    max_image_bytes: int = option(
        DataConfig.max_member_bytes,
        "--max-image-bytes",
        "a larger figure file is image_too_large, refused before reading",
        unit="bytes",
        type=int,
    )


@dataclass(frozen=True)
class Figure:
    """A checked figure, ready to be written: the bytes and what they are."""

    ext: str
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    original_format: str
    reencoded: bool
    original_mode: str = ""
    conversion: str | None = None  # a stable reason id when the pixels were converted


@dataclass(frozen=True)
class FigureError:
    """Why a figure cannot be used. `reason` is a stable, countable identifier."""

    reason: str
    detail: str


class FigureReader:
    """Reads figures below one image root; one instance per worker process."""

    def __init__(self, images_url: str, options: FigureOptions) -> None:
        self.fs: fsspec.AbstractFileSystem
        self.fs, self.root = storage.url_to_fs(images_url)
        self.options = options
        # A local figure's resolved path must stay below the resolved root.
        self._real_root = os.path.realpath(self.root) if storage.is_local(self.fs) else None

    def exists(self, rel_path: str) -> bool:
        return bool(self.fs.exists(storage.join(self.root, rel_path)))

    def read(self, rel_path: str) -> Figure | FigureError:
        path = storage.join(self.root, rel_path)
        local = self._real_root is not None
        try:
            data = self._read_local(path) if local else self._read_stored(path)
        except FileNotFoundError:
            return FigureError("missing_file", "no such file under the image root")
        except _READ_ERRORS as e:
            url = path if local else self.fs.unstrip_protocol(path)
            if not local and isinstance(e, OSError) and not storage.is_permanent_error(e):
                # The store failing (after its client's retries: throttling, 5xx, a lost
                # connection), not this figure: skipping would turn an outage into
                # thousands of lost rows. The run stops (exit 1); the rerun resumes.
                raise storage.StorageError(
                    f"read {storage.redact_url(url)}: {storage.describe_error(e, url)}"
                ) from None
            return FigureError("read_error", storage.describe_error(e, url))
        if isinstance(data, FigureError):
            return data
        if len(data) == 0:
            return FigureError("unreadable_image", "zero-byte file")
        return check_figure(data, self.options)

    def _read_local(self, path: str) -> bytes | FigureError:
        """The path is resolved and kept below the root first; the open then refuses what
        is not a regular file without blocking, and follows no last link (a link swapped
        in after the resolve, or a link loop, fails with ELOOP: a read_error row)."""
        assert self._real_root is not None
        real = os.path.realpath(path)
        if os.path.commonpath([real, self._real_root]) != self._real_root:
            return FigureError("path_escapes_root", "a symlink resolves outside the image root")
        try:
            file, num_bytes = storage.open_regular_file(real, follow_last_link=False)
        except IsADirectoryError:
            return FigureError("missing_file", "path is a directory")
        except storage.NotARegularFileError:
            return FigureError("not_a_regular_file", "a FIFO, device or socket, not a file")
        with file:
            if num_bytes > self.options.max_image_bytes:
                return _too_large(num_bytes)
            return self._bounded(file.read(self.options.max_image_bytes + 1))

    def _read_stored(self, path: str) -> bytes | FigureError:
        """Any other filesystem (a zip archive, an object store): the size comes from its
        directory or listing, the read is a range of at most the limit + 1 bytes."""
        info = self.fs.info(path)
        if info["type"] == "directory":
            return FigureError("missing_file", "path is a directory")
        if info["type"] != "file":
            return FigureError("not_a_regular_file", f"its type is {info['type']!r}, not a file")
        if int(info.get("flag_bits") or 0) & _ZIP_ENCRYPTED_FLAG:
            return FigureError("read_error", "an encrypted zip member (needs a password)")
        size = info.get("size")
        if size is not None and size > self.options.max_image_bytes:
            return _too_large(size)
        data = self.fs.cat_file(path, start=0, end=self.options.max_image_bytes + 1)
        assert isinstance(data, bytes)
        return self._bounded(data)

    def _bounded(self, data: bytes) -> bytes | FigureError:
        """A file larger than its size said (it grew, or a directory lied)."""
        if len(data) > self.options.max_image_bytes:
            return _too_large(len(data))
        return data


def _too_large(num_bytes: int) -> FigureError:
    return FigureError("image_too_large", f"{num_bytes} bytes > --max-image-bytes")


def check_figure(data: bytes, options: FigureOptions) -> Figure | FigureError:
    """Fully decode `data` (catches truncation and bombs), then keep or re-encode it."""
    # MAX_IMAGE_PIXELS is process-global in PIL; each worker sets it to the same value.
    Image.MAX_IMAGE_PIXELS = options.max_image_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; we treat both as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # The bomb check runs here, on the full size, before any pixel is decoded.
            image: Image.Image = Image.open(io.BytesIO(data))
            stored_size = image.size
            _draft_for_resize(image, options.resize_max_side)
            # Decodes every pixel (in draft mode too: the whole entropy-coded stream is
            # read, only the inverse DCT is scaled): a truncated file fails here, not in
            # training.
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return FigureError("decompression_bomb", str(e))
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        # PIL names the in-memory file by its address ("<_io.BytesIO object at 0x7f..>"),
        # which would make skipped.jsonl differ between two runs over the same input.
        detail = _OBJECT_ADDRESS.sub("", f"{type(e).__name__}: {e}")
        return FigureError("unreadable_image", detail)
    fmt = image.format or "unknown"
    mode = image.mode
    conversions: list[str] = []
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    # The full size as shown, whatever size a draft decoded.
    width, height = stored_size[::-1] if orientation in _TRANSPOSING_ORIENTATIONS else stored_size
    # Before anything that depends on the geometry (resizing): the stored figure is the
    # one shown, and a re-encode writes no tag (PIL saves EXIF only when asked to).
    if orientation in _MOVING_ORIENTATIONS:
        image = ImageOps.exif_transpose(image)
        conversions.append("exif_orientation")
    image, mode_conversion = _normalise_mode(image)
    if mode_conversion is not None:
        conversions.append(mode_conversion)
    conversion = "+".join(conversions) or None
    new_size = _resized_size((width, height), options.resize_max_side)
    if fmt in KEPT_FORMATS and new_size is None and conversion is None:
        return Figure(KEPT_FORMATS[fmt], data, width, height, width, height, fmt, False, mode)
    if new_size is not None:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    # Lossless PNG, except for a JPEG being resized anyway: its pixels change regardless,
    # and a JPEG of them stays the size a JPEG was.
    if fmt == "JPEG" and new_size is not None:
        if image.mode not in _JPEG_MODES:
            image = image.convert("RGB")
        image.save(out, format="JPEG", quality=options.jpeg_quality)
        ext = "jpg"
    else:
        # PNG is lossless: other formats (GIF, TIFF, BMP, WebP...) lose nothing by it.
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(out, format="PNG")
        ext = "png"
    return Figure(ext, out.getvalue(), *image.size, width, height, fmt, True, mode, conversion)


def _resized_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """The size a figure shown at `size` is resized to, or None when it is kept."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _draft_for_resize(image: Image.Image, max_side: int | None) -> None:
    """A JPEG that will be shrunk is decoded DCT-scaled (1/2, 1/4 or 1/8, libjpeg's
    draft mode) to the smallest size still at least its resize target: most of a large
    figure's decode time is the inverse DCT and colour conversion of pixels the resize
    would throw away. Called before `load()`; other formats decode in full."""
    if image.format != "JPEG":
        return
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    transposed = orientation in _TRANSPOSING_ORIENTATIONS
    target = _resized_size(image.size[::-1] if transposed else image.size, max_side)
    if target is not None:
        # The target as shown, requested in the frame the pixels are stored in.
        image.draft(image.mode, target[::-1] if transposed else target)


def _normalise_mode(image: Image.Image) -> tuple[Image.Image, str | None]:
    """(image, None) when the training decode reads `image` as it looks; else the
    converted image and the conversion's reason (see the module docstring)."""
    if image.mode in _WIDE_GREY_MODES:
        pixels = np.asarray(image, dtype=np.int64)
        if image.mode.startswith("I;16") or int(pixels.max(initial=0)) > 255:
            pixels = np.clip(pixels, 0, 65535) >> 8  # 16 bits of range to 8
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L"), "16bit_to_8bit"
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if not has_alpha:
        return image, None
    rgba = image.convert("LA" if image.mode in ("L", "LA", "La") else "RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return image, None  # an alpha channel that hides nothing
    white = Image.new(rgba.mode, rgba.size, (255, 255) if rgba.mode == "LA" else "white")
    flat = Image.alpha_composite(white, rgba) if rgba.mode == "RGBA" else _flatten_la(white, rgba)
    return flat.convert(rgba.mode[0] if rgba.mode == "LA" else "RGB"), "alpha_flattened"


def _flatten_la(white: Image.Image, la: Image.Image) -> Image.Image:
    """alpha_composite for greyscale+alpha (PIL composites RGBA only)."""
    return Image.composite(la, white, la.getchannel("A"))

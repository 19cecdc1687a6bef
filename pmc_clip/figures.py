"""Reading and checking one figure for a shard: runs in make_shards' worker processes.

What happens to an image (every figure is fully decoded once, here):
  * JPEG and PNG are stored byte-for-byte, whatever their mode (greyscale, palette, CMYK
    JPEG, 16-bit-per-channel RGB, an alpha channel that is fully opaque): the training
    decode (`convert("RGB")`) reads them as they look. `original_mode` in the sample's
    `.json` says what the file holds.
  * Two kinds are converted, because the training decode would get them wrong, and the
    sample's `.json` names the `conversion` (counted per reason in the manifest):
      - `alpha_flattened`: transparency that is used (some pixel not opaque) is composited
        onto white, as the figure shows on the article's page (`convert("RGB")` would drop
        the alpha and show the hidden colour, often black, behind transparent pixels);
      - `16bit_to_8bit`: 16/32-bit greyscale is scaled to 8 bits (`convert("RGB")` clips
        every value above 255 to white).
    Converted figures are stored as PNG (lossless), or as JPEG when resized from a JPEG.
  * Other formats (GIF, TIFF, BMP, WebP...) are stored as PNG; `--resize-max-side`
    re-encodes only figures whose longer side exceeds it.
  * Zero bytes, truncated or undecodable data, and decompression bombs are refused with a
    reason (`unreadable_image`, `decompression_bomb`, `image_too_large`).

Deliberately imports neither torch nor webdataset: make_shards starts its workers with
`spawn` (fsspec filesystems such as s3fs are not fork-safe), and each worker pays only
for PIL and fsspec (~0.2 s) instead of torch (~3 s).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image

from pmc_clip import storage

# Formats stored byte-for-byte when no resize is asked for; anything else is re-encoded.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}
# PNG stores these modes as they are; other modes are converted to RGB(A) first.
_PNG_MODES = {"1", "L", "LA", "RGB", "RGBA", "P"}
_JPEG_MODES = {"L", "RGB", "CMYK"}
# Greyscale with more than 8 bits per pixel: scaled to 8 bits before storing.
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


@dataclass(frozen=True)
class FigureOptions:
    resize_max_side: int | None = None
    jpeg_quality: int = 90
    max_image_pixels: int = 89_478_485  # PIL's own default bomb threshold
    max_image_bytes: int = 64 * 1024 * 1024


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

    def exists(self, rel_path: str) -> bool:
        return bool(self.fs.exists(storage.join(self.root, rel_path)))

    def read(self, rel_path: str) -> Figure | FigureError:
        try:
            data = storage.read_bytes(self.fs, storage.join(self.root, rel_path))
        except FileNotFoundError:
            return FigureError("missing_file", "no such file under the image root")
        except IsADirectoryError:
            return FigureError("missing_file", "path is a directory")
        if len(data) == 0:
            return FigureError("unreadable_image", "zero-byte file")
        if len(data) > self.options.max_image_bytes:
            return FigureError("image_too_large", f"{len(data)} bytes > --max-image-bytes")
        return check_figure(data, self.options)


def check_figure(data: bytes, options: FigureOptions) -> Figure | FigureError:
    """Fully decode `data` (catches truncation and bombs), then keep or re-encode it."""
    # MAX_IMAGE_PIXELS is process-global in PIL; each worker sets it to the same value.
    Image.MAX_IMAGE_PIXELS = options.max_image_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; we treat both as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            image.load()  # decodes every pixel: a truncated file fails here, not in training
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return FigureError("decompression_bomb", str(e))
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        return FigureError("unreadable_image", f"{type(e).__name__}: {e}")
    fmt = image.format or "unknown"
    mode = image.mode
    width, height = image.size
    image, conversion = _normalise_mode(image)
    max_side = options.resize_max_side
    needs_resize = max_side is not None and max(width, height) > max_side
    if fmt in KEPT_FORMATS and not needs_resize and conversion is None:
        return Figure(KEPT_FORMATS[fmt], data, width, height, width, height, fmt, False, mode)
    if needs_resize:
        assert max_side is not None
        scale = max_side / max(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    if fmt == "JPEG":
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

"""Image transforms for training and evaluation, run in the data-loader workers.

Train: RandomResizedCrop (area fraction in `crop_scale`, aspect ratio 3/4..4/3, bicubic),
as in CLIP/OpenCLIP and the PMC-CLIP paper (crop scale 0.5). Eval: resize the shorter side
to `image_size`, then centre-crop (`--eval-preprocess fast`, one resize of the centred
square from a draft decode; `original`: the original PMC-CLIP's torchvision steps, to
reproduce its published numbers). Both end as uint8 [H, W, 3] pixels in PIL's layout;
`write_image` copies them into their slot of a uint8 batch ([B, 3, H, W], channels-last in
memory, see `empty_batch`). Batches cross from the loader's workers to the trainer as
uint8 and are CLIP-normalised where the model runs (`normalize_images`: on the GPU after
the copy, or in the CPU trainer's process).

Randomness comes only from the `numpy.random.Generator` passed in (seeded per sample by
the data pipeline from seed, epoch and the sample key), never from torch's or numpy's
global state, so a resumed or re-sharded run crops every sample exactly as before.

Crop parameters are drawn before the pixels are decoded (PIL reads the size from the
header), so a JPEG much larger than the crop is decoded at a reduced scale (libjpeg's DCT
scaling, `Image.draft`); the result is at least `image_size` on each side of the crop
before the final bicubic resize, so it matches a full decode up to resampling detail.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image

from pmc_clip.config import CLIP_MEAN, CLIP_STD, EVAL_PREPROCESS_CHOICES

ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many times, then centres


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = ASPECT_RATIO_RANGE,
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height): torchvision's RandomResizedCrop.get_params,
    drawing from `rng` instead of torch's global generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, crop_width, crop_height
    # Fallback to a central crop at the nearest allowed aspect ratio (torchvision's rule).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square: resize-shorter-side then centre-crop, as one box."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def _draft(
    image: Image.Image, box: tuple[int, int, int, int], out_size: int
) -> tuple[float, float, float, float]:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop still gets >= out_size
    pixels per side; returns the box in the (possibly) reduced image's coordinates."""
    left, top, crop_width, crop_height = box
    if image.format == "JPEG":
        reduction = min(crop_width, crop_height) / out_size
        if reduction >= 2:
            wanted = (
                math.ceil(image.width / reduction),
                math.ceil(image.height / reduction),
            )
            full_width, full_height = image.size
            image.draft("RGB", wanted)
            # libjpeg rounds each side up separately: scale x and y on their own and keep
            # the box inside the reduced image.
            x_factor, y_factor = image.width / full_width, image.height / full_height
            return (
                left * x_factor,
                top * y_factor,
                min((left + crop_width) * x_factor, image.width),
                min((top + crop_height) * y_factor, image.height),
            )
    return (left, top, left + crop_width, top + crop_height)


def crop_to_pixels(
    image: Image.Image, box: tuple[int, int, int, int], image_size: int
) -> np.ndarray:
    """Decode `image` (opened, not yet loaded), crop `box`, resize to a square: uint8
    [image_size, image_size, 3], a read-only view of the bytes PIL packs its pixels into
    (no further copy; `write_image` makes the one copy, into the batch)."""
    scaled_box = _draft(image, box, image_size)
    # Palette/greyscale/alpha/CMYK end as RGB; an RGB image is used as is (resize decodes
    # it; convert would decode and then copy it).
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC, box=scaled_box)
    return np.asarray(resized)


def train_transform(
    image: Image.Image, image_size: int, crop_scale: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    box = random_resized_crop_box(image.width, image.height, crop_scale, rng)
    return crop_to_pixels(image, box, image_size)


def eval_transform(image: Image.Image, image_size: int, preprocess: str = "fast") -> np.ndarray:
    """Centre crop at `image_size`: "fast" (draft decode, one resize of the centred
    square) or "original" (the original PMC-CLIP's pipeline, see original_eval_transform)."""
    assert preprocess in EVAL_PREPROCESS_CHOICES, preprocess  # validated by the config
    if preprocess == "original":
        return original_eval_transform(image, image_size)
    return crop_to_pixels(image, center_crop_box(image.width, image.height), image_size)


def original_eval_transform(image: Image.Image, image_size: int) -> np.ndarray:
    """The original PMC-CLIP's eval preprocessing, to reproduce its published numbers:
    full decode, torchvision's `Resize(image_size, BICUBIC)` (shorter side to
    `image_size`) and `CenterCrop(image_size)`, and only then conversion to RGB (so a
    palette image is resized as palette, i.e. nearest), as OpenCLIP's eval transform runs
    them on PIL images."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    resized = Resize(image_size, interpolation=InterpolationMode.BICUBIC)(image)
    return np.asarray(CenterCrop(image_size)(resized).convert("RGB"))


def empty_batch(batch_size: int, image_size: int) -> torch.Tensor:
    """An uninitialised uint8 [batch_size, 3, image_size, image_size] batch for write_image.

    Channels-last in memory (strides of [B, H, W, 3], the shape is still [B, 3, H, W]): each
    image is then one contiguous copy of PIL's [H, W, 3] pixels instead of a transposing one
    (85 -> 58 us per 224 px image into a cold batch slot, measured in bench/RESULTS.md
    "Follow-up 3"), and a `.to(device)` keeps the layout, which cuDNN's convolutions prefer
    anyway. uint8, not float32: a quarter of the bytes through shared memory and PCIe, and
    the workers do no normalising arithmetic (bench/RESULTS.md "Follow-up 4")."""
    shape = (batch_size, 3, image_size, image_size)
    return torch.empty(shape, dtype=torch.uint8, memory_format=torch.channels_last)


def write_image(out: torch.Tensor, pixels: np.ndarray) -> None:
    """Copy uint8 [H, W, 3] pixels (crop_to_pixels) into one [3, H, W] slot of an
    `empty_batch` (a plain copy: the slot is channels-last). Done per image as it is
    decoded, so the copy runs on cache-hot pixels and PIL's buffer is freed (and reused by
    the next decode) at once."""
    out.numpy()[...] = pixels.transpose(2, 0, 1)


def eval_pixels(image: Image.Image, image_size: int, preprocess: str = "fast") -> torch.Tensor:
    """One image's uint8 [3, S, S] evaluation pixels (eval_transform), outside a batch."""
    slot = empty_batch(1, image_size)[0]
    write_image(slot, eval_transform(image, image_size, preprocess))
    return slot


def normalize_images(
    images: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """CLIP-normalise a uint8 [B, 3, H, W] batch wherever it is (after `.to(device)`):
    float32 in `memory_format` (batches arrive channels-last, see empty_batch)."""
    assert images.dtype == torch.uint8, images.dtype
    # The layout change runs on uint8 (a quarter of the float bytes), before the multiply.
    images = images.contiguous(memory_format=memory_format)
    scale, shift = _scale_and_shift(images.device)
    return torch.addcmul(shift, images.float(), scale)


@functools.cache
def _scale_and_shift(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """x_normalised = x_uint8 * scale + shift, per channel ([1, 3, 1, 1] each); made once
    per device (not a host-to-device copy every step)."""
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std)
    return scale, -mean / std

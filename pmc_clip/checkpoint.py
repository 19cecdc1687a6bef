"""Checkpoint I/O. For now: the compat loader for the released PMC-CLIP checkpoint.

The released `checkpoint.pt` (PMC_CLIP:beta) is a dict {epoch, name, state_dict,
optimizer, scaler} saved from a DDP-wrapped model (keys may start with `module.`), with
numpy scalars pickled inside, and a BERT buffer (`embeddings.position_ids`) that current
transformers no longer keeps. It is read with `weights_only=True` (no arbitrary code
runs while unpickling) plus an explicit allow-list of the numpy globals it needs.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import fsspec
import numpy as np
import torch

DDP_PREFIX = "module."
DROPPED_KEYS = ("text_encoder.embeddings.position_ids",)  # a buffer new transformers rejects
HTTP_SCHEMES = ("http", "https")

# numpy>=2 pickles scalars via numpy._core; the released file (numpy 1.x) names the same
# function numpy.core.multiarray.scalar, so both spellings are allowed.
try:
    from numpy._core.multiarray import scalar as _numpy_scalar  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import scalar as _numpy_scalar  # type: ignore[no-redef]  # numpy 1
NUMPY_SAFE_GLOBALS: list = [
    _numpy_scalar,
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(kind)) for kind in ("bool", "int32", "int64", "float32", "float64")),
]


def _local_copy(path_or_url: str) -> str:
    """A local path for `path_or_url`; http(s) files are downloaded once into torch's cache."""
    scheme = urlparse(path_or_url).scheme
    if scheme not in HTTP_SCHEMES:
        return path_or_url
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(cache_dir, exist_ok=True)
    local_path = os.path.join(cache_dir, os.path.basename(urlparse(path_or_url).path))
    if not os.path.exists(local_path):
        torch.hub.download_url_to_file(path_or_url, local_path)
    return local_path


def load_pmc_clip_checkpoint(path_or_url: str) -> dict[str, torch.Tensor]:
    """State dict of a released PMC-CLIP checkpoint, ready for PMCClip.load_state_dict.

    path_or_url: a local path, an http(s) URL (cached under torch.hub's directory), or any
    fsspec URL (s3://, gs://, ...).
    """
    local = _local_copy(path_or_url)
    if "://" not in local and not os.path.isfile(local):
        raise ValueError(f"checkpoint {path_or_url!r} does not exist")
    with (
        fsspec.open(local, "rb") as file,
        torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS),
    ):
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{path_or_url!r} is not a PMC-CLIP checkpoint: expected a dict with a 'state_dict'"
        )
    return {
        key.removeprefix(DDP_PREFIX): value
        for key, value in state_dict.items()
        if key.removeprefix(DDP_PREFIX) not in DROPPED_KEYS
    }

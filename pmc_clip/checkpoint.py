"""Checkpoint I/O: atomic training checkpoints, and the released PMC-CLIP checkpoint.
What a training checkpoint holds, and saving and resuming a run: checkpointer.py.

The released `checkpoint.pt` (PMC_CLIP:beta) is a dict {epoch, name, state_dict,
optimizer, scaler} saved from a DDP-wrapped model (keys may start with `module.`), with
numpy scalars pickled inside, and a BERT buffer (`embeddings.position_ids`) that current
transformers no longer keeps. It is read with `weights_only=True` (no arbitrary code
runs while unpickling) plus an explicit allow-list of the numpy globals it needs. Its
weights compute the original's function with the original's model options: load them into
`released_model_name(model)` (RN50_fusion4 -> RN50_fusion4_original).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlparse

import fsspec
import numpy as np
import torch

from pmc_clip import storage
from pmc_clip.config import RELEASED_CHECKPOINT as RELEASED_CHECKPOINT_NAME
from pmc_clip.model import list_models

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


# The released weights compute the original's function only with the original's options
# (pads attended, the masked caption as the contrastive feature: see model/config.py). A
# bundled model with a `<name>_original` twin (RN50_fusion4 -> RN50_fusion4_original) is
# swapped for it when the released weights are loaded; a JSON config is used as given.
ORIGINAL_SUFFIX = "_original"


def released_model_name(model: str) -> str:
    """The model to build for the released weights when `--model` names `model`: its
    bundled `_original` twin if there is one, else `model` itself."""
    twin = model + ORIGINAL_SUFFIX
    return twin if twin in list_models() else model


def load_pmc_clip_checkpoint(path_or_url: str) -> dict[str, torch.Tensor]:
    """State dict of a released PMC-CLIP checkpoint, ready for PMCClip.load_state_dict.

    path_or_url: a local path, an http(s) URL (cached under torch.hub's directory), or any
    fsspec URL (s3://, gs://, ...).
    """
    where = storage.redact_url(path_or_url)
    try:
        with (
            storage.redacting_errors("read the released checkpoint", path_or_url),
            fsspec.open(_local_copy(path_or_url), "rb") as file,
            torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS),
        ):
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {where} does not exist") from None
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{where} is not a PMC-CLIP checkpoint: expected a dict with a 'state_dict'"
        )
    return {
        key.removeprefix(DDP_PREFIX): value
        for key, value in state_dict.items()
        if key.removeprefix(DDP_PREFIX) not in DROPPED_KEYS
    }


# --------------------------------------------------------------------------- training checkpoints

CHECKPOINT_FORMAT = "pmc_clip/1"
LATEST = "latest.json"


def probe_writable(directory: str) -> None:
    """Write and delete a small file in `directory` (created if local): a folder that
    cannot be written (read-only, a missing bucket, wrong credentials) raises OSError
    (redacted) now instead of at the first save, an epoch into the run."""
    with storage.redacting_errors("write a probe file to", directory):
        fs, root = storage.url_to_fs(directory)
        if storage.is_local(fs):
            os.makedirs(root, exist_ok=True)
        probe = storage.join(root, f".write-probe-{os.getpid()}-{os.urandom(4).hex()}")
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)


def checkpoint_name(*, epoch: int, step: int, end_of_epoch: bool) -> str:
    return f"epoch_{epoch}.pt" if end_of_epoch else f"step_{step}.pt"


def save_checkpoint(directory: str, *, name: str, state: dict[str, Any], keep_last: int) -> str:
    """Write `state` as `directory/name`, then point `latest.json` at it; return its URL.

    Atomic: the file is staged, hashed and published whole (rename, or one upload), its
    sha256 goes into a sidecar `name.json`, and only then does `latest.json` move. A crash
    at any point leaves `latest.json` on the previous, complete checkpoint. A failed write
    (disk full, permissions) raises OSError naming the target; nothing is half-visible.
    Step checkpoints beyond the `keep_last` newest are deleted; epoch checkpoints stay.
    """
    fs, root = storage.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    dest = storage.join(root, name)
    staged = storage.staging_path(fs, dest)
    try:
        _torch_save(state, staged)
        num_bytes, digest = storage.file_digest(staged)
        storage.publish(fs, staged, dest)
    except OSError as e:
        raise OSError(
            f"could not write checkpoint {storage.redact_url(directory)}/{name}: "
            f"{storage.describe_error(e, directory)}; "
            f"the previous checkpoint (see {LATEST}) is kept"
        ) from e
    finally:
        # Also on Ctrl-C (KeyboardInterrupt) in the middle of torch.save.
        if os.path.exists(staged):
            os.unlink(staged)
    info = {
        "name": name,
        "sha256": digest,
        "bytes": num_bytes,
        "epoch": state.get("epoch"),
        "step": state.get("step"),
    }
    storage.write_bytes_atomic(fs, dest + ".json", json.dumps(info).encode())
    storage.write_bytes_atomic(fs, storage.join(root, LATEST), json.dumps(info).encode())
    _prune_step_checkpoints(fs, root, keep_last=keep_last, keep=name)
    return storage.join(directory, name)


class _ErrorKeepingWriter:
    """torch.save reports a failed write (ENOSPC, EIO) as a bare RuntimeError from its C++
    zip writer; this wrapper keeps the OSError so the caller can say what happened."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(state: dict[str, Any], path: str) -> None:
    with open(path, "wb") as file, _interrupt_after():
        writer = _ErrorKeepingWriter(file)
        try:
            torch.save(state, writer)  # type: ignore[arg-type]
        except RuntimeError as e:
            if writer.error is not None:
                raise writer.error from e
            raise


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives in the block and raise its KeyboardInterrupt
    when the block is done: torch.save's C++ zip writer turns one raised in a write into
    a RuntimeError ("unexpected pos"), which would end the run as a failed save, with a
    traceback. Only in the main thread (the only one signals reach) and where Ctrl-C
    raises KeyboardInterrupt (Python's own handler)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _prune_step_checkpoints(
    fs: fsspec.AbstractFileSystem, root: str, *, keep_last: int, keep: str
) -> None:
    names = [os.path.basename(p) for p in fs.glob(storage.join(root, "step_*.pt"))]
    steps = sorted(names, key=lambda n: int(n[len("step_") : -len(".pt")]))
    for old in steps[:-keep_last]:
        if old != keep:
            fs.rm_file(storage.join(root, old))
            if fs.exists(storage.join(root, old + ".json")):
                fs.rm_file(storage.join(root, old + ".json"))


def resolve_latest(directory: str) -> str | None:
    """URL of the checkpoint `latest.json` points at, or None if there is none yet. A
    `latest.json` that is not what save_checkpoint writes (not JSON, wrong types, a name
    that is a path, a checkpoint that is gone) is a ValueError naming it."""
    pointer_url = storage.join(directory, LATEST)
    where = storage.redact_url(pointer_url)
    with storage.redacting_errors("read", pointer_url):
        fs, root = storage.url_to_fs(directory)
        pointer = storage.join(root, LATEST)
        exists, is_folder = fs.exists(pointer), fs.isdir(pointer)
    if not exists:
        return None
    if is_folder:
        raise ValueError(f"{where} is a folder, not the file save_checkpoint writes; {_FIX_LATEST}")
    info = _read_info(fs, path=pointer, url=pointer_url, fix=_FIX_LATEST)
    name = info.get("name")
    # A bare file name of this folder: "../x" or "/etc/x" would load a file from elsewhere.
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ValueError(
            f"{where} is damaged or was not written by pmc_clip: 'name' must be a checkpoint "
            f"file name in that folder, got {name!r}; {_FIX_LATEST}"
        )
    with storage.redacting_errors("read", pointer_url):
        found = fs.isfile(storage.join(root, name))
    if not found:
        raise ValueError(
            f"{where} names {name}, which is not in that folder (deleted?): pass --resume "
            "with a checkpoint that exists, or delete latest.json to start afresh"
        )
    return storage.join(directory, name)


def weights_misfit(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """How `weights` do not fit `model` (empty when they do): each weight of another shape,
    then how many are missing and how many unexpected, in words, for an error message."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    differences = [
        f"{k} is {list(found[k])} in the checkpoint, {list(expected[k])} here"
        for k in sorted(expected.keys() & found.keys())
        if found[k] != expected[k]
    ]
    for keys, what in (
        (sorted(expected.keys() - found.keys()), "missing from the checkpoint"),
        (sorted(found.keys() - expected.keys()), "not in this model"),
    ):
        if keys:
            differences.append(f"{len(keys)} weights {what} (first: {keys[0]})")
    return differences


def load_checkpoint(path_or_url: str) -> dict[str, Any]:
    """A training checkpoint, loaded with weights_only=True, checked against its sha256
    sidecar and for the structure the trainer reads; a missing, partial, corrupt or
    foreign file, or a damaged sidecar, is a ValueError naming it."""
    where = storage.redact_url(path_or_url)
    try:
        with storage.redacting_errors("read checkpoint", path_or_url):
            fs, path = storage.url_to_fs(path_or_url)
            is_folder = fs.isdir(path)
            data = b"" if is_folder else storage.read_bytes(fs, path)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {where} does not exist") from None
    if is_folder:
        raise ValueError(f"checkpoint {where} is a folder, not a checkpoint file")
    with storage.redacting_errors("read the sha256 sidecar of checkpoint", path_or_url):
        has_sidecar = fs.isfile(path + ".json")
    if has_sidecar:
        info = _read_info(fs, path=path + ".json", url=path_or_url + ".json", fix=_FIX_SIDECAR)
        digest, num_bytes = info.get("sha256"), info.get("bytes")
        if not isinstance(digest, str) or type(num_bytes) is not int:
            raise ValueError(
                f"{where}.json (the sha256 sidecar of the checkpoint) is damaged or was not "
                f"written by pmc_clip: expected a 'sha256' string and a 'bytes' integer, got "
                f"{digest!r} and {num_bytes!r}; {_FIX_SIDECAR}"
            )
        if hashlib.sha256(data).hexdigest() != digest or len(data) != num_bytes:
            raise ValueError(
                f"checkpoint {where} is corrupt or partial: its sha256/size differ from "
                f"{os.path.basename(path)}.json (written when it was saved)"
            )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError variously
        raise ValueError(f"checkpoint {where} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{where} is not a pmc_clip training checkpoint (format {CHECKPOINT_FORMAT}); "
            f"for the released PMC-CLIP weights use --resume {RELEASED_CHECKPOINT_NAME}"
        )
    problem = _structure_problem(state)
    if problem:
        raise ValueError(
            f"checkpoint {where} says format {CHECKPOINT_FORMAT} but is damaged or was not "
            f"written by pmc_clip: {problem}"
        )
    return state


# What to do about a damaged `latest.json` or sidecar.
_FIX_LATEST = "delete it to start afresh, or pass --resume with a checkpoint's path"
_FIX_SIDECAR = "delete it to load the checkpoint unchecked"


def _read_info(fs: fsspec.AbstractFileSystem, *, path: str, url: str, fix: str) -> dict[str, Any]:
    """A JSON object written by save_checkpoint (`latest.json`, a sidecar)."""
    with storage.redacting_errors("read", url):
        data = storage.read_bytes(fs, path)
    try:
        info = json.loads(data)
        problem = "" if isinstance(info, dict) else f"JSON {type(info).__name__}, not an object"
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        problem = f"not JSON ({e})"
    if problem:
        raise ValueError(
            f"{storage.redact_url(url)} is damaged or was not written by pmc_clip: {problem}; {fix}"
        )
    return info


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


# What the trainer reads from a checkpoint, and what each entry must be.
_STRUCTURE: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    (
        "model",
        "a dict of tensors",
        lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
    ),
    ("optimizer", "a dict", lambda v: isinstance(v, dict)),
    ("scaler", "a dict", lambda v: isinstance(v, dict)),
    ("step", "a count", _is_count),
    ("epoch", "a count", _is_count),
    ("nonfinite_steps", "a count", _is_count),
    ("data", "a dict or null", lambda v: v is None or isinstance(v, dict)),
    (
        "rng",
        "a list of dicts",
        lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
    ),
    (
        "config",
        "a dict with a 'model' dict naming the model ('model': str, 'mlm': bool)",
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("model"), dict)
            and isinstance(v["model"].get("model"), str)
            and isinstance(v["model"].get("mlm"), bool)
        ),
    ),
)


def _structure_problem(state: dict[str, Any]) -> str | None:
    for key, expected, check in _STRUCTURE:
        if key not in state:
            return f"no {key!r} entry"
        if not check(state[key]):
            return f"its {key!r} entry is not {expected}"
    return None

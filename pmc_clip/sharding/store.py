"""Calls on `--output`: JSON files written atomically, existence checks, listings and
deletes, each retried with backoff when `--output` is an object store (local calls run
once), and errors naming the path (a local path as it is, else its redacted URL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from pmc_clip import storage

_T = TypeVar("_T")
# Connect/read timeout of one object-store request on --output (a stall becomes a retry).
STORE_TIMEOUT_SECONDS = 120.0
_UPLOAD_BACKOFF_MAX_SECONDS = 60.0


def upload_retry_policy(max_attempts: int, backoff_seconds: float) -> storage.RetryPolicy:
    """How calls on an object-store --output are retried (a local --output is not)."""
    return storage.RetryPolicy(
        max_attempts=max_attempts,
        backoff_seconds=backoff_seconds,
        backoff_max_seconds=max(_UPLOAD_BACKOFF_MAX_SECONDS, backoff_seconds),
    )


def write_json(
    fs: fsspec.AbstractFileSystem, path: str, obj: Any, retry: storage.RetryPolicy
) -> None:
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False)
    with storage.redacting_errors("write", where_of(fs, path)):
        storage.write_bytes_atomic(fs, path, text.encode("utf-8"), retry)


def read_json(fs: fsspec.AbstractFileSystem, path: str, retry: storage.RetryPolicy) -> Any:
    return json.loads(retried(fs, retry, "read", path, lambda: storage.read_bytes(fs, path)))


def exists(fs: fsspec.AbstractFileSystem, path: str, retry: storage.RetryPolicy) -> bool:
    return retried(fs, retry, "check", path, lambda: bool(fs.exists(path)))


def retried(
    fs: fsspec.AbstractFileSystem,
    retry: storage.RetryPolicy,
    what: str,
    path: str,
    call: Callable[[], _T],
) -> _T:
    """`call` on --output, retried when it is an object store (local calls run once)."""
    if storage.is_local(fs):
        return call()
    return storage.retry_call(what, fs.unstrip_protocol(path), retry, call)


def where_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """`path` as errors name it: a local path as it is, else its URL."""
    return path if storage.is_local(fs) else fs.unstrip_protocol(path)


def list_folder(
    fs: fsspec.AbstractFileSystem, folder: str, retry: storage.RetryPolicy
) -> list[str]:
    """The paths directly in `folder` (none if it does not exist)."""
    if not exists(fs, folder, retry):
        return []
    paths = retried(fs, retry, "list", folder, lambda: fs.ls(folder, detail=False))
    return [str(path) for path in paths]


def delete(fs: fsspec.AbstractFileSystem, path: str, retry: storage.RetryPolicy) -> None:
    retried(fs, retry, "delete", path, lambda: fs.rm_file(path))


def delete_present(
    fs: fsspec.AbstractFileSystem, paths: list[str], retry: storage.RetryPolicy
) -> list[str]:
    """Delete those of `paths` that exist; return them."""
    present = [path for path in paths if exists(fs, path, retry)]
    for path in present:
        delete(fs, path, retry)
    return present

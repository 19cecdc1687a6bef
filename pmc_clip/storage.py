"""Where bytes live: local paths and any fsspec URL (s3://, gs://, zip://...::archive.zip).

One place for the small rules every reader and writer of this project follows:
URLs are resolved through fsspec; object stores are written with one PUT per object (an
object appears whole or not at all); local files are written under a temporary name and
renamed; and URLs are redacted before they reach a log, a manifest or an error message.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Files we stage with mkstemp are 0600; published files get the usual umask-derived mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
# Query parameters that carry secrets in presigned or token-bearing URLs.
_SECRET_QUERY_WORDS = ("key", "token", "secret", "signature", "credential", "sig", "password")


def redact_url(url: str) -> str:
    """Return `url` without user info and with secret-looking query values masked.

    Used for everything we print or persist: a manifest, a saved config, a log line or an
    error message must never carry credentials (s3://KEY:SECRET@bucket, ?X-Amz-Signature=).
    """
    parts = []
    for piece in url.split("::"):  # fsspec chained URLs: redact every link of the chain
        split = urlsplit(piece)
        if not split.scheme:
            parts.append(piece)
            continue
        netloc = split.netloc.rsplit("@", 1)[-1]
        query = urlencode(
            [
                (name, "REDACTED" if any(w in name.lower() for w in _SECRET_QUERY_WORDS) else value)
                for name, value in parse_qsl(split.query, keep_blank_values=True)
            ]
        )
        parts.append(urlunsplit((split.scheme, netloc, split.path, query, split.fragment)))
    return "::".join(parts)


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a path or URL to (filesystem, path inside it).

    A path or URL ending in `.zip` (not already a `zip://` chain) is opened as a zip
    archive read in place, so the released `images.zip` needs no unpacking. A folder
    inside the archive is named with fsspec's chain syntax: `zip://FOLDER::images.zip`.
    """
    if url.lower().endswith(".zip") and "::" not in url and not url.startswith("zip://"):
        url = f"zip://::{url}"
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(base: str, *names: str) -> str:
    """Join path pieces with '/', which every fsspec filesystem (local included) accepts."""
    return posixpath.join(base, *names) if base else posixpath.join(*names)


@contextmanager
def local_staging_file(fs: fsspec.AbstractFileSystem, dest: str) -> Iterator[str]:
    """Yield a local path to write; on success it becomes `dest` atomically.

    Local destination: a hidden temporary file in the same folder, then os.replace (atomic
    on POSIX), so a reader never sees half a file and a crash leaves only a `.tmp-` file.
    Remote destination: a local temporary file uploaded with one put; object stores make
    an object visible only once its upload has completed.
    """
    if is_local(fs):
        folder = os.path.dirname(dest) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(dest)}-", dir=folder)
        os.close(fd)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fd, tmp = tempfile.mkstemp(prefix="pmc_clip-upload-")
        os.close(fd)
        try:
            yield tmp
            fs.put_file(tmp, dest)
        finally:
            os.unlink(tmp)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, dest: str, data: bytes) -> None:
    with local_staging_file(fs, dest) as tmp, open(tmp, "wb") as f:
        f.write(data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    data = fs.cat_file(path)
    assert isinstance(data, bytes)
    return data

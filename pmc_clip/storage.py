"""Where bytes live: local paths and any fsspec URL (s3://, gs://, zip://...::archive.zip).

One place for the small rules every reader and writer of this project follows:
URLs are resolved through fsspec; object stores are written with one PUT per object (an
object appears whole or not at all); local files are written under a temporary name and
renamed; and URLs are redacted before they reach a log, a manifest or an error message.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import random
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

from pmc_clip.process_owner import ProcessOwner

# Files we stage with mkstemp are 0600; published files get the usual umask-derived mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
# Local files staged for an upload: `pmc_clip-upload+HOST+PID+START+random` in the
# temp folder (see `ProcessOwner`, `remove_orphaned_uploads`).
_UPLOAD_PREFIX = "pmc_clip-upload+"
# Query parameters that carry secrets in presigned or token-bearing URLs.
_SECRET_QUERY_WORDS = ("key", "token", "secret", "signature", "credential", "sig", "password")
_log = logging.getLogger(__name__)
_T = TypeVar("_T")


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


SOURCE_SEPARATOR = "::"  # between the sources of a shard spec


def expand_spec(spec: str) -> list[list[str]]:
    """A shard spec -> its sources' URLs: split at `::` (one source each), brace-expanded
    (`pmc-oa-train-{000000..000131}.tar`)."""
    sources = [part.strip() for part in spec.split(SOURCE_SEPARATOR)]
    if not spec.strip() or any(not part for part in sources):
        raise ValueError(f"empty shard source in {redact_url(spec)!r}")
    return [list(braceexpand.braceexpand(part)) for part in sources]


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


def url_to_fs_for_retries(
    url: str, timeout_seconds: float
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like `url_to_fs`, for a caller that retries with `retry_call`: an object store gets
    no retries of its own (botocore's and s3fs's would multiply attempts and hide them)
    and a bounded connect/read timeout, so a stalled request fails and is retried."""
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol not in S3_PROTOCOLS:
        return url_to_fs(url)
    fs, path = fsspec.core.url_to_fs(
        url, skip_instance_cache=True, config_kwargs=s3_single_attempt_config(timeout_seconds)
    )
    no_client_retries(fs)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_local_url(url: str) -> bool:
    """A plain path or file:// URL (what open_shard opens as a local file)."""
    return fsspec.core.split_protocol(url)[0] in LOCAL_PROTOCOLS


def join(base: str, *names: str) -> str:
    """Join path pieces with '/', which every fsspec filesystem (local included) accepts."""
    return posixpath.join(base, *names) if base else posixpath.join(*names)


def staging_path(fs: fsspec.AbstractFileSystem, dest: str) -> str:
    """A new local file to write `dest`'s content into before `publish` moves it there.

    Local destination: a hidden `.tmp-` file in the same folder (same filesystem, so the
    rename in `publish` is atomic). Remote destination: a local temporary file.
    """
    if is_local(fs):
        folder = os.path.dirname(dest) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(dest)}-", dir=folder)
    else:
        # The owner in the name lets a later run remove it once this process is gone.
        fd, tmp = tempfile.mkstemp(prefix=f"{_UPLOAD_PREFIX}{ProcessOwner.current().tag()}+")
    os.close(fd)
    return tmp


def publish(
    fs: fsspec.AbstractFileSystem, staged: str, dest: str, retry: RetryPolicy | None = None
) -> None:
    """Make the staged file visible as `dest` all at once; the staged file is consumed.

    Local: os.replace (atomic on POSIX), so a reader never sees half a file and a crash
    leaves only a `.tmp-` file. Remote: one put; object stores show an object only once
    its upload has completed. With `retry`, a failed put is repeated (a PUT of the same
    bytes is idempotent) and StorageError names `dest` once every attempt has failed.
    """
    try:
        if is_local(fs):
            os.chmod(staged, 0o666 & ~_UMASK)
            # Bytes on disk before the name: a power cut never leaves a short `dest`.
            _fsync(staged)
            os.replace(staged, dest)
            _fsync(os.path.dirname(dest) or ".")  # the rename itself
        elif retry is None:
            fs.put_file(staged, dest)
        else:
            retry_call(
                "upload", fs.unstrip_protocol(dest), retry, lambda: fs.put_file(staged, dest)
            )
    finally:
        if os.path.exists(staged):
            os.unlink(staged)


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    num_bytes = 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            num_bytes += len(chunk)
    return num_bytes, digest.hexdigest()


def remove_stale_staging_files(
    fs: fsspec.AbstractFileSystem, folder: str, name_glob: str = ""
) -> None:
    """A writer killed with -9 leaves its half-written `.tmp-*` file behind (local folders
    only: object stores never show a partial upload). Call it where one writer owns the
    folder (make_shards' output, rank 0's checkpoint folder), or the files it names
    (`name_glob`: staged files of destinations `name_glob*`, those of one make_shards
    part); nothing reads those files."""
    if is_local(fs) and fs.isdir(folder):
        for path in fs.glob(join(folder, f".tmp-{name_glob}*")):
            fs.rm_file(path)


def _fsync(path: str) -> None:
    """Flush a local file's bytes, or a folder's entries (a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (network, FUSE) cannot sync a folder: nothing more to do there.
        if e.errno != errno.EINVAL or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def remove_orphaned_uploads() -> list[str]:
    """Remove the files staged for an upload (`staging_path`) by processes of this host
    that have ended (killed with -9 in the middle of an upload); return their paths.
    A live process's files, another host's (a shared temp folder) and files of unknown
    owner are left alone."""
    removed = []
    folder = tempfile.gettempdir()
    for name in os.listdir(folder):
        if not name.startswith(_UPLOAD_PREFIX):
            continue
        owner = ProcessOwner.from_tag(name[len(_UPLOAD_PREFIX) :].rsplit("+", 1)[0])
        if owner is not None and owner.is_gone():
            with contextlib.suppress(FileNotFoundError):  # removed by a concurrent run
                os.unlink(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


@contextlib.contextmanager
def local_staging_file(
    fs: fsspec.AbstractFileSystem, dest: str, retry: RetryPolicy | None = None
) -> Iterator[str]:
    """Yield a local path to write; on success it is published as `dest`."""
    tmp = staging_path(fs, dest)
    try:
        yield tmp
    except BaseException:
        os.unlink(tmp)
        raise
    publish(fs, tmp, dest, retry)


def write_bytes_atomic(
    fs: fsspec.AbstractFileSystem, dest: str, data: bytes, retry: RetryPolicy | None = None
) -> None:
    with local_staging_file(fs, dest, retry) as tmp, open(tmp, "wb") as f:
        f.write(data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    data = fs.cat_file(path)
    assert isinstance(data, bytes)
    return data


# --------------------------------------------------------------------------- retries
#
# Object stores fail transiently (503 SlowDown, dropped connections, timeouts) many times a
# day at scale. One retry loop, ours, with exponential backoff and jitter: the store
# clients' own loops are switched off where we retry, so attempts are counted once.


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 6
    backoff_seconds: float = 0.5
    backoff_max_seconds: float = 30.0

    def validate(self, flag: str) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"{flag} must be >= 1, got {self.max_attempts}")
        if self.backoff_seconds < 0 or self.backoff_max_seconds < self.backoff_seconds:
            raise ValueError(
                f"retry backoff must be >= 0 and <= its maximum, got {self.backoff_seconds} "
                f"and {self.backoff_max_seconds}"
            )


class NotARegularFileError(OSError):
    """A local path that is a FIFO, a device or a socket where a file was expected."""


def open_regular_file(
    path: str, buffering: int = -1, follow_last_link: bool = True
) -> tuple[IO[bytes], int]:
    """Open a local file for reading and return it with its size; anything but a regular
    file is refused at once. The open is non-blocking, so a FIFO in a file's place does
    not block until a writer appears, and the check is made on what was opened (fstat),
    so a file swapped in between cannot slip past. Raises IsADirectoryError for a folder,
    NotARegularFileError for a FIFO, device or socket."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_last_link else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", path)
        if not stat.S_ISREG(status.st_mode):
            raise NotARegularFileError(
                errno.EINVAL, "a FIFO, device or socket, not a regular file", path
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering), status.st_size
    except BaseException:
        os.close(fd)
        raise


class StorageError(OSError):
    """A storage call failed for good (a permanent error, or every attempt); the message
    names the object by its redacted URL and says how often it was tried."""


# Errors that retrying cannot fix (a missing object, denied access, a wrong call);
# everything else (connection reset, timeouts, 5xx, throttling, truncated bodies) is
# treated as transient.
_PERMANENT_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    TypeError,
    ValueError,
    AttributeError,
    NotImplementedError,
)


def is_permanent_error(exc: BaseException) -> bool:
    """Whether retrying `exc` cannot help (see _PERMANENT_ERRORS)."""
    return isinstance(exc, _PERMANENT_ERRORS)


S3_PROTOCOLS = ("s3", "s3a")
LOCAL_PROTOCOLS = (None, "file", "local")  # what open_shard opens as a plain file


def retry_call(
    what: str,
    url: str,
    policy: RetryPolicy,
    call: Callable[[], _T],
    error: type[StorageError] = StorageError,
    on_retry: Callable[[], None] | None = None,
) -> _T:
    """Run `call`, retrying transient errors with exponential backoff and jitter; raise
    `error` (message: `what`, the redacted URL, the attempts, the last error) when an
    error is permanent or every attempt failed."""
    delay = policy.backoff_seconds
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return call()
        except _PERMANENT_ERRORS as exc:
            raise error(f"{what} {redact_url(url)}: {describe_error(exc, url)}") from None
        except Exception as exc:
            reason = describe_error(exc, url)
            if attempt == policy.max_attempts:
                raise error(
                    f"{what} {redact_url(url)} failed {attempt} times, last: {reason}"
                ) from None
            if on_retry is not None:
                on_retry()
            _log.info("retrying %s %s: %s", what, redact_url(url), reason)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, policy.backoff_max_seconds)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def redacting_errors(what: str, url: str) -> Iterator[None]:
    """Storage calls on `url`: an error they raise comes out with the URL redacted and
    unchained (a chained traceback would print the raw error, and botocore quotes a
    bucket name "KEY:SECRET@bucket"). A missing object stays a FileNotFoundError, so
    callers can tell it apart; every other error becomes a one-line StorageError naming
    `what` and the URL. Our own StorageErrors pass unchanged (already redacted)."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {redact_url(url)}: no such file or object") from None
    except Exception as exc:
        raise StorageError(f"{what} {redact_url(url)}: {describe_error(exc, url)}") from None


def refuse_url_credentials(flag: str, url: str | None, written: bool = False) -> None:
    """Start-up check of a flag's path or URL (every `::` link): credentials in it are a
    ValueError naming the flag and the redacted URL, where they cannot work or would be
    copied into object keys. On s3:// s3fs takes `KEY:SECRET@bucket` for the bucket name
    and a `?token=` for part of the object key; in a folder written to (checkpoints,
    shards) any query would become part of every key written under it."""
    if url is None or not _url_secrets(url):
        return
    schemes = {urlsplit(piece).scheme for piece in url.split("::")}
    if not written and not schemes & set(S3_PROTOCOLS):
        return  # e.g. a presigned https:// URL, read as given
    where = "a folder written to" if written else "an s3:// URL"
    raise ValueError(
        f"{flag} {redact_url(url)}: {where} cannot carry credentials (user info or a "
        "token/signature query); drop them from the URL and give them through the "
        "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or fsspec's config"
    )


def describe_error(exc: BaseException, url: str) -> str:
    """An exception as text, safe to print: any copy of the raw URL is replaced by its
    redacted form, and any copy of its secrets (user info, secret query values) that the
    error quotes on its own (botocore quotes a bucket name "user:TOKEN@bucket") by
    REDACTED."""
    text = f"{type(exc).__name__}: {exc}".replace(url, redact_url(url))
    for secret in _url_secrets(url):
        text = text.replace(secret, "REDACTED")
    return text


def argument_secrets(argument: str) -> list[str]:
    """The secrets a command-line path or URL carries (`_url_secrets`), including the
    secret-looking query values of a plain path: `x.pt?token=abc` is a legal local file
    name, opened as given, but `abc` looks like a token and is masked in the logs."""
    return _url_secrets(argument, plain_paths=True)


def _url_secrets(url: str, plain_paths: bool = False) -> list[str]:
    """The user info and secret query values of every link of an fsspec URL chain."""
    secrets = []
    for piece in url.split("::"):
        split = urlsplit(piece)
        if not split.scheme and not plain_paths:
            continue
        if "@" in split.netloc:
            secrets.append(split.netloc.rsplit("@", 1)[0])
        secrets += [
            value
            for name, value in parse_qsl(split.query, keep_blank_values=True)
            if value and any(w in name.lower() for w in _SECRET_QUERY_WORDS)
        ]
    return sorted(set(secrets), key=len, reverse=True)  # longest first: no partial leftovers


def no_client_retries(fs: fsspec.AbstractFileSystem) -> None:
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not an option)


def s3_single_attempt_config(timeout_seconds: float) -> dict[str, Any]:
    """botocore settings for one attempt per call, with bounded connect and read waits."""
    return {
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "connect_timeout": timeout_seconds,
        "read_timeout": timeout_seconds,
    }

"""Where bytes live: local paths and any fsspec URL (s3://, gs://, zip://...::archive.zip).

One place for the small rules every reader and writer of this project follows:
URLs are resolved through fsspec; object stores are written with one PUT per object (an
object appears whole or not at all); local files are written under a temporary name and
renamed; and URLs are redacted before they reach a log, a manifest or an error message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import logging
import os
import posixpath
import random
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from pmc_clip.shard_cache import ShardCache

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
    if protocol not in _S3_PROTOCOLS:
        return url_to_fs(url)
    fs, path = fsspec.core.url_to_fs(
        url, skip_instance_cache=True, config_kwargs=_s3_single_attempt_config(timeout_seconds)
    )
    _no_client_retries(fs)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_local_url(url: str) -> bool:
    """A plain path or file:// URL (what open_shard opens as a local file)."""
    return fsspec.core.split_protocol(url)[0] in _LOCAL_PROTOCOLS


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


@dataclass(frozen=True)
class ProcessOwner:
    """A process, told apart from a later one that reuses its pid by its start time
    (clock ticks since boot, from /proc; None where /proc is absent)."""

    host: str
    pid: int
    start: str | None

    @staticmethod
    def current() -> ProcessOwner:
        return ProcessOwner(socket.gethostname(), os.getpid(), _process_start(os.getpid()))

    def tag(self) -> str:
        """`HOST+PID+START`, for a file name (host names carry no '+')."""
        return f"{self.host}+{self.pid}+{self.start or ''}"

    @staticmethod
    def from_tag(tag: str) -> ProcessOwner | None:
        host, _, rest = tag.partition("+")
        pid, _, start = rest.partition("+")
        if not host or not pid.isdigit():
            return None
        return ProcessOwner(host, int(pid), start or None)

    def is_gone(self) -> bool:
        """True only when this process ran on this host and has ended: another host's
        process cannot be checked from here, and is never taken for gone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # another user's live process
        start = _process_start(self.pid)
        if start == "zombie":
            return True
        return self.start is not None and start is not None and start != self.start


def _process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), "zombie" for an ended, unreaped one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return "zombie" if fields[0] in (b"Z", b"X") else fields[19].decode()


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


# What tells one version of a file from another without reading it, in the order looked
# for in a listing's entries: S3/Azure ETags, GCS hashes, a zip member's CRC.
_IDENTITY_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "CRC")


def file_identities(
    fs: fsspec.AbstractFileSystem, root: str, rel_paths: Collection[str]
) -> dict[str, str]:
    """A short identity of each of `rel_paths` (below `root`) that is a file: its size and
    what changes whenever it is rewritten (local: mtime and inode; object stores: the
    ETag; a zip member: its CRC). Absent paths are left out.

    Local files: one stat each (what a listing with mtimes costs anyway). Elsewhere: one
    listing of `root` (an S3 LIST returns 1,000 ETags per request, where a HEAD per file
    would cost a request each); a zip's directory is already in memory."""
    found: dict[str, str | None] = {}
    if is_local(fs):
        for rel_path in rel_paths:
            with contextlib.suppress(OSError):  # absent (or unreadable): no identity
                found[rel_path] = _stat_identity(os.stat(join(root, rel_path)))
    else:
        wanted = set(rel_paths)
        prefix = f"{root}/" if root else ""
        for _, _, files in fs.walk(root, detail=True):
            for info in files.values():
                rel_path = info["name"][len(prefix) :]
                if rel_path in wanted:
                    found[rel_path] = _info_identity(info)
        fs.invalidate_cache()  # a listing of millions of files is not kept around
    return {rel_path: identity for rel_path, identity in found.items() if identity is not None}


def object_identity(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """`file_identities`' identity of one file (None: not a file), for a file just
    written, to compare with a later listing."""
    if is_local(fs):
        return _stat_identity(os.stat(path))
    return _info_identity(fs.info(path))


def _stat_identity(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return None
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns} ino={st.st_ino}"


def _info_identity(info: dict[str, Any]) -> str | None:
    if info.get("type") != "file":
        return None
    version = next((f"{name}={info[name]}" for name in _IDENTITY_FIELDS if name in info), "")
    return f"size={info.get('size')} {version}".rstrip()


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


@dataclass(frozen=True)
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


_S3_PROTOCOLS = ("s3", "s3a")
_LOCAL_PROTOCOLS = (None, "file", "local")  # what open_shard opens as a plain file


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
    if not written and not schemes & set(_S3_PROTOCOLS):
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


def _no_client_retries(fs: fsspec.AbstractFileSystem) -> None:
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not an option)


def _s3_single_attempt_config(timeout_seconds: float) -> dict[str, Any]:
    """botocore settings for one attempt per call, with bounded connect and read waits."""
    return {
        "retries": {"total_max_attempts": 1, "mode": "standard"},
        "connect_timeout": timeout_seconds,
        "read_timeout": timeout_seconds,
    }


# --------------------------------------------------------------------------- shard reading
#
# webdataset 1.0.2 opens `s3://` with nothing and `gs://` with a `gsutil` subprocess. The
# opener below reads any fsspec URL as a stream of range requests (a shard is never
# downloaded whole first unless a cache folder is asked for), retries transient errors with
# backoff, and resumes at the byte where a failed request stopped: a dropped connection
# costs one retried request, not the shard, and no sample is read twice.


class ShardReadError(StorageError):
    """A shard could not be read after every retry; the message carries a redacted URL."""


@dataclass(frozen=True)
class ShardReadOptions:
    chunk_bytes: int = 16 * 1024 * 1024
    retry: RetryPolicy = RetryPolicy()
    timeout_seconds: float = 60.0
    cache_dir: str | None = None  # node-local folder shared by the node's readers
    cache_limit_bytes: int | None = None  # None: unbounded


@dataclass
class ShardReadCounters:
    """What the opener did in this process; the data loader ships these to the trainer."""

    shards_opened: int = 0
    requests: int = 0
    bytes_read: int = 0
    retries: int = 0
    shards_failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class ShardFilesystems:
    """The fsspec filesystems one data stream reads shards with, created on first use in
    the process that reads (a filesystem inherited through fork -- s3fs holds an event
    loop and open sockets -- is never used) and not shared with fsspec's instance cache,
    so endpoint and credentials come from that process's environment. A persistent
    data-loader worker keeps its filesystems from epoch to epoch: building an s3fs client
    (botocore's service models, a session) costs 70-200 ms of CPU."""

    def __init__(self, options: ShardReadOptions) -> None:
        self.options = options
        self._by_protocol: dict[tuple[int, str], fsspec.AbstractFileSystem] = {}
        self._lock = threading.Lock()  # a ShardOpener opens ahead from a second thread
        self._cache: ShardCache | None = None

    def get(self, protocol: str) -> fsspec.AbstractFileSystem:
        key = (os.getpid(), protocol)
        with self._lock:
            if key not in self._by_protocol:
                self._by_protocol[key] = _new_filesystem(protocol, self.options)
            return self._by_protocol[key]

    def cache(self) -> ShardCache:
        """The node cache of `options.cache_dir` (which must be set)."""
        # Imported here: shard_cache uses this module's redact_url.
        from pmc_clip.shard_cache import ShardCache

        assert self.options.cache_dir is not None
        with self._lock:
            if self._cache is None:
                self._cache = ShardCache(self.options.cache_dir, self.options.cache_limit_bytes)
            return self._cache

    def __reduce__(self) -> tuple[type[ShardFilesystems], tuple[ShardReadOptions]]:
        # Pickled (into spawned workers) as its options: no filesystem or lock travels.
        return ShardFilesystems, (self.options,)


def _new_filesystem(protocol: str, options: ShardReadOptions) -> fsspec.AbstractFileSystem:
    storage_options: dict[str, Any] = {"skip_instance_cache": True}
    if protocol in _S3_PROTOCOLS:
        # One retry policy, ours: botocore's and s3fs's own retries would multiply attempts
        # and hide them from the counters. Endpoint and credentials come from the usual AWS
        # environment and config (AWS_ENDPOINT_URL_S3, profiles, instance metadata).
        storage_options["config_kwargs"] = _s3_single_attempt_config(options.timeout_seconds)
    fs = fsspec.filesystem(protocol, **storage_options)
    _no_client_retries(fs)
    return fs


def retrying_read(
    what: str,
    url: str,
    options: ShardReadOptions,
    counters: ShardReadCounters,
    call: Callable[[], _T],
) -> _T:
    """`retry_call` for a shard read, counting requests and retries."""

    def attempt() -> _T:
        counters.requests += 1
        return call()

    def count_retry() -> None:
        counters.retries += 1

    return retry_call(what, url, options.retry, attempt, ShardReadError, count_retry)


def read_range(
    fs: fsspec.AbstractFileSystem,
    path: str,
    url: str,
    start: int,
    end: int,
    options: ShardReadOptions,
    counters: ShardReadCounters,
) -> bytes:
    """Bytes [start, end) of `path` in one retried request (`url` names it in errors)."""

    def call() -> bytes:
        data = fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:  # a truncated body is a transient failure
            raise ConnectionError(f"got {len(data)} of {end - start} bytes at {start}")
        return bytes(data)

    return retrying_read("read", url, options, counters, call)


# A tar stream reader stops at the end-of-archive marker (two zero blocks), which is followed
# by zero padding up to a whole record (tarfile and GNU tar: 20 blocks of 512 bytes). A last
# range holding nothing but that tail would be fetched by the prefetch thread and never
# read: a wasted request, and one whose failures and retries land after the stream has
# moved on. So a last range shorter than the longest possible tail is merged into the one
# before it, and every range a well-formed tar is read with gets read.
TAR_TAIL_BYTES = tarfile.RECORDSIZE + 2 * tarfile.BLOCKSIZE


def range_end(start: int, size_bytes: int, chunk_bytes: int) -> int:
    """End (exclusive) of the range request that starts at `start`."""
    end = min(start + chunk_bytes, size_bytes)
    return size_bytes if size_bytes - end < TAR_TAIL_BYTES else end


class RangeReader(io.RawIOBase):
    """A read-only stream over an fsspec file, fetched as retried range requests.

    The next chunk is fetched by a background thread while the current one is parsed, so
    a worker decodes while the network works. Reads are sequential (what tarfile's stream
    mode does); the position only moves forward.
    """

    def __init__(
        self,
        url: str,
        filesystems: ShardFilesystems,
        counters: ShardReadCounters,
    ) -> None:
        super().__init__()
        self.url, self.options, self.counters = url, filesystems.options, counters
        protocol = fsspec.core.split_protocol(url)[0]
        self._fs = filesystems.get(protocol or "file")
        self._path = self._fs._strip_protocol(url)  # http keeps its scheme, s3 drops it
        self.size_bytes: int = retrying_read(
            "stat", url, self.options, counters, lambda: int(self._fs.size(self._path))
        )
        self._buffer = memoryview(b"")
        self._next_offset = 0  # first byte not yet fetched
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
        self._pending: Future[bytes] | None = None
        self._failed: ShardReadError | None = None
        self._prefetch()

    def readable(self) -> bool:
        return True

    def _fetch(self, start: int, end: int) -> bytes:
        data = read_range(self._fs, self._path, self.url, start, end, self.options, self.counters)
        self.counters.bytes_read += len(data)
        return data

    def _prefetch(self) -> None:
        if self._next_offset < self.size_bytes:
            start = self._next_offset
            end = range_end(start, self.size_bytes, self.options.chunk_bytes)
            self._pending = self._executor.submit(self._fetch, start, end)
            self._next_offset = end
        else:
            self._pending = None

    def readinto(self, out: Any) -> int:
        if self._failed is not None:
            raise self._failed
        if not self._buffer:
            if self._pending is None:
                return 0  # end of the shard
            try:
                self._buffer = memoryview(self._pending.result())
            except ShardReadError as exc:
                # Counted once per shard; tarfile may call read again after the error.
                self.counters.shards_failed += 1
                self._failed = exc
                raise
            self._prefetch()
        n = min(len(out), len(self._buffer))
        out[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            if self._pending is not None:
                self._pending.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)
        super().close()


def open_cached(
    url: str, size_bytes: int, filesystems: ShardFilesystems, counters: ShardReadCounters
) -> IO[bytes]:
    """The shard (`size_bytes` long) from the node cache, downloaded into it first by one
    process of the node if absent (range requests, retried)."""

    def download(tmp_path: str) -> None:
        reader = RangeReader(url, filesystems, counters)
        try:
            with open(tmp_path, "wb") as out:
                shutil.copyfileobj(reader, out, length=1 << 20)
        finally:
            reader.close()

    return filesystems.cache().open(url, size_bytes, download)


def open_shard(url: str, filesystems: ShardFilesystems, counters: ShardReadCounters) -> IO[bytes]:
    """Open a shard for a sequential read: local path, `pipe:` command or fsspec URL."""
    counters.shards_opened += 1
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol in _LOCAL_PROTOCOLS:
        path = fsspec.core.strip_protocol(url) if protocol else url
        try:
            return open_regular_file(path, buffering=1 << 20)[0]
        except OSError as exc:
            counters.shards_failed += 1
            raise ShardReadError(f"open {redact_url(url)}: {describe_error(exc, url)}") from None
    if protocol == "pipe":
        import webdataset as wds  # torch-heavy import; only data-loading processes need it

        return wds.gopen(url, "rb")
    try:
        if filesystems.options.cache_dir is not None:
            fs, path = filesystems.get(protocol), fsspec.core.strip_protocol(url)
            size = retrying_read(
                "stat", url, filesystems.options, counters, lambda: int(fs.size(path))
            )
            return open_cached(url, size, filesystems, counters)
        return io.BufferedReader(RangeReader(url, filesystems, counters), buffer_size=1 << 20)
    except ShardReadError:
        counters.shards_failed += 1
        raise


class ShardOpener:
    """Opens a data stream's shards (`open_shard`) and, asked to, the next remote one ahead
    of time in a background thread, so a worker does not stall at every shard boundary
    while the first range arrives (on S3 a stat and a first 16 MiB range: two round trips
    and the transfer, an estimated 0.1-0.3 s against ~2 s of decoding for a 1,000-sample
    shard; not measured on S3 itself). Errors of an open ahead surface when the shard is
    opened, exactly as if it had been opened then. Costs one more chunk buffer per
    worker. Local paths and `pipe:` are opened when asked, never ahead."""

    def __init__(self, filesystems: ShardFilesystems, counters: ShardReadCounters) -> None:
        self.filesystems, self.counters = filesystems, counters
        self._ahead: list[tuple[str, Future[IO[bytes]]]] = []  # in the order asked
        self._executor: ThreadPoolExecutor | None = None

    def open(self, url: str) -> IO[bytes]:
        if self._ahead and self._ahead[0][0] == url:
            return self._ahead.pop(0)[1].result()
        return open_shard(url, self.filesystems, self.counters)

    def open_ahead(self, url: str) -> None:
        protocol = fsspec.core.split_protocol(url)[0]
        if protocol in _LOCAL_PROTOCOLS or protocol == "pipe":
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-ahead")
        future = self._executor.submit(open_shard, url, self.filesystems, self.counters)
        self._ahead.append((url, future))

    def discard_ahead(self) -> None:
        """Close what was opened ahead and never asked for (a pass that ended early), once
        it is open: nothing here waits for a request still being retried."""
        for _, future in self._ahead:
            if not future.cancel():
                future.add_done_callback(_close_opened)
        self._ahead.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


def _close_opened(future: Future[IO[bytes]]) -> None:
    if future.exception() is None:  # a failure of an unwanted shard was never an error
        future.result().close()

"""A node-local, size-bounded cache of whole files (shards and their index sidecars),
shared by every process on one node: training ranks and their data-loader workers, forked
or spawned.

How it works. `ShardCache.open(url, size_bytes, download)` returns an open file on the
cached copy of `url`, downloading it first if it is absent:

* A cached copy is `<cache_dir>/<sha256(url)[:16]>-<basename of the url's path>`: distinct
  URLs never share a name, and no credentials (user info, query string) reach it.
* Hit: the copy is opened and its times set to now (the LRU clock). A copy whose size is
  not `size_bytes` (the object changed, or a node crash truncated it) counts as absent.
* Miss: the process takes the file's lock (`.lock-<name>`, `fcntl.flock`); the others that
  want the same file wait on it, then find the copy and read it. The holder reserves room
  (below), calls `download(tmp)` with an empty `.tmp-<size>-<name>~XXXX` file in the cache
  folder, checks its size and renames it into place (atomic: a reader never sees a torn
  file). A downloader killed with -9 leaves only its `.tmp-` file, never a cached copy;
  the kernel drops its lock, which is how the next process to look at that file (its next
  downloader, or any eviction pass) knows the `.tmp-` file is dead and deletes it.
* Room: under one folder-wide lock (`.cache.lock`), the bytes of cached copies plus the
  declared size of every live download are counted; least recently used copies are
  deleted until `size_bytes` more fits `limit_bytes`. A download in progress is never
  evicted. When live downloads of other processes hold the rest of the room, the process
  waits for them to finish (their files then become evictable).
* An evicted copy that a process still has open stays readable through that handle (POSIX
  unlink semantics) -- hence `open` returns a file, not a path. Its disk space is freed
  when the last handle closes, so the disk may briefly hold more than `limit_bytes`: the
  limit bounds the visible cache, plus any evicted files still being read.

How big. For no re-downloads the limit must hold each node's share of the shards plus
their index files (every node reads the same shards every epoch): then epoch 2 onward
reads nothing from the object store. With a smaller limit the cache still works, but
files are evicted and downloaded again in later epochs, and egress grows towards one full
read of the node's share per epoch (LRU under a cyclic read order evicts exactly what is
needed next). The limit must at least exceed the largest file (`check_cache_limit`), and
should hold one file per process reading concurrently, or processes wait for room.

The folder should be dedicated to the cache, on node-local disk: files named like cached
copies are evicted, and `flock` on network filesystems is not reliable across nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import posixpath
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

from pmc_clip.storage import redact_url

_log = logging.getLogger(__name__)

# Cached files get the mode a normally created file would (mkstemp makes 0600).
_UMASK = os.umask(0)
os.umask(_UMASK)
_DIGEST_CHARS = 16  # 64 bits of sha256: a collision among a node's files is not a concern
_BASENAME_CHARS = 100  # keeps every name (and `.tmp-`/`.lock-` names) far below 255 bytes
_DIR_LOCK = ".cache.lock"
_FILE_LOCK_PREFIX = ".lock-"
_TMP_PREFIX = ".tmp-"
# What a cached copy is called; anything else in the folder is never counted or evicted.
_CACHED_NAME = re.compile(r"[0-9a-f]{16}-[A-Za-z0-9._-]+")
# `.tmp-<declared size>-<name>~<mkstemp's random part>`: the size is the room it reserves.
_TMP_NAME = re.compile(r"\.tmp-(\d+)-([0-9a-f]{16}-[A-Za-z0-9._-]+)~[^~/]*")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_BUFFER_BYTES = 1 << 20
_WAIT_FOR_ROOM_SECONDS = (0.01, 1.0)  # first and longest poll interval

# Lock file descriptors this process holds. A child forked while one is held (a data-loader
# worker forked while a background thread downloads) would share the lock with its parent
# until it exits, and every other process wanting that file would wait that long; the child
# closes its copies at once (closing, unlike LOCK_UN, leaves the parent's lock in place).
_held_lock_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_held_lock_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_lock_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def cache_name(url: str) -> str:
    """The cached copy's file name: a digest of the whole URL (distinct URLs never collide)
    and, to be readable, the basename of its path, made filesystem safe. The query string,
    fragment and user info -- where credentials live -- never reach it."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]
    links = url.split("::")  # fsspec chain: the first link with a scheme names the file
    link = next((piece for piece in links if "://" in piece), links[0])
    if "://" in link:  # fsspec reads netloc + path as the path (zip://inner.tar, s3://bucket)
        split = urlsplit(link)
        base = posixpath.basename(split.netloc.rsplit("@", 1)[-1] + split.path)
    else:
        base = os.path.basename(link)
    base = _UNSAFE_CHARS.sub("_", base)[-_BASENAME_CHARS:] or "file"
    return f"{digest}-{base}"


def check_cache_limit(*, limit_bytes: int | None, largest_file_bytes: int) -> None:
    """Refuse a cache limit that cannot hold the largest file (call it at start-up with the
    largest shard, or index file, size): every open of that file would fail."""
    if limit_bytes is not None and largest_file_bytes > limit_bytes:
        raise ValueError(
            f"cache limit (--cache-limit-bytes) {limit_bytes} bytes is smaller than one "
            f"shard ({largest_file_bytes} bytes): it must be at least {largest_file_bytes} "
            "bytes, and to avoid "
            "re-downloads every epoch, as large as this node's share of the shards plus "
            "their index files"
        )


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    used_ns: int  # mtime: set to now on every open


class ShardCache:
    """See the module docstring. One object per process is usual; it is also safe to share
    between threads (an open-ahead thread), and pickles (into a spawned worker) as its
    folder and limit with fresh counters."""

    def __init__(self, cache_dir: str, limit_bytes: int | None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"cache limit must be >= 0 bytes, got {limit_bytes}")
        self.cache_dir = cache_dir
        self.limit_bytes = limit_bytes
        os.makedirs(cache_dir, exist_ok=True)
        self._counts = {"hits": 0, "downloads": 0, "evictions": 0, "bytes_downloaded": 0}
        self._counts_lock = threading.Lock()

    def __reduce__(self) -> tuple[type[ShardCache], tuple[str, int | None]]:
        return ShardCache, (self.cache_dir, self.limit_bytes)

    def stats(self) -> dict[str, int]:
        """This object's counters (this process): hits, downloads, evictions,
        bytes_downloaded. A failed download counts nowhere."""
        with self._counts_lock:
            return dict(self._counts)

    def open(self, url: str, size_bytes: int, download: Callable[[str], None]) -> BinaryIO:
        """An open binary file (read-only, seekable) on the cached copy of `url`, which is
        `size_bytes` long; if absent, `download(tmp_path)` is called by one process of the
        node to write it (the file exists, empty: open it with "wb"). Exceptions of
        `download` propagate unchanged (they should name the URL redacted); a file of the
        wrong size raises OSError."""
        if size_bytes < 0:
            raise ValueError(f"{redact_url(url)}: size must be >= 0 bytes, got {size_bytes}")
        check_cache_limit(limit_bytes=self.limit_bytes, largest_file_bytes=size_bytes)
        name = cache_name(url)
        path = os.path.join(self.cache_dir, name)
        # Fast path without locks: a copy that vanishes (evicted) between the check and the
        # open is simply a miss; one evicted after the open stays readable.
        cached = self._open_cached(path, size_bytes)
        if cached is not None:
            return cached
        with self._lock(_FILE_LOCK_PREFIX + name):
            # Whoever held the lock before us may have just downloaded it.
            cached = self._open_cached(path, size_bytes)
            if cached is not None:
                return cached
            return self._download(url, name, size_bytes, download)

    # ------------------------------------------------------------------ internals

    def _count(self, **amounts: int) -> None:
        with self._counts_lock:
            for key, amount in amounts.items():
                self._counts[key] += amount

    def _open_cached(self, path: str, size_bytes: int) -> BinaryIO | None:
        try:
            file = open(path, "rb", buffering=_BUFFER_BYTES)  # noqa: SIM115 (returned open)
        except FileNotFoundError:
            return None
        if os.fstat(file.fileno()).st_size != size_bytes:
            file.close()  # replaced by the downloader, which holds the file's lock
            return None
        _touch(file.fileno())
        self._count(hits=1)
        return file

    def _download(
        self, url: str, name: str, size_bytes: int, download: Callable[[str], None]
    ) -> BinaryIO:
        """Called holding the file's lock: reserve room, download, publish, return it open."""
        path = os.path.join(self.cache_dir, name)
        tmp = self._reserve(name, size_bytes)
        try:
            download(tmp)
            try:
                written = os.path.getsize(tmp)
            except FileNotFoundError:
                written = -1
            if written != size_bytes:
                raise OSError(
                    f"download of {redact_url(url)} into the shard cache wrote "
                    f"{'no file' if written < 0 else f'{written} bytes'}, expected "
                    f"{size_bytes} bytes"
                )
            os.chmod(tmp, 0o666 & ~_UMASK)
            # Opened before it is published: an eviction right after the rename cannot take
            # it from us.
            file = open(tmp, "rb", buffering=_BUFFER_BYTES)  # noqa: SIM115 (returned open)
            try:
                _touch(file.fileno())
                # Under the folder lock, so an eviction pass never lists the folder halfway
                # through the rename (seeing the file twice or not at all).
                with self._lock(_DIR_LOCK):
                    os.replace(tmp, path)
            except BaseException:
                file.close()
                raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._count(downloads=1, bytes_downloaded=size_bytes)
        _log.debug("shard cache: downloaded %s (%d bytes)", redact_url(url), size_bytes)
        return file

    def _reserve(self, name: str, size_bytes: int) -> str:
        """Make room for `size_bytes` (evicting least recently used copies) and create the
        `.tmp-` file that reserves it, both under the folder lock; return its path. Waits
        while downloads of other processes hold the room that is missing."""
        delay, longest = _WAIT_FOR_ROOM_SECONDS
        waited = False
        while True:
            with self._lock(_DIR_LOCK):
                # No valid copy exists (we looked holding the file's lock, and only its
                # holder publishes one): what is there has the wrong size.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.cache_dir, name))
                if self._make_room(name, size_bytes):
                    fd, tmp = tempfile.mkstemp(
                        prefix=f"{_TMP_PREFIX}{size_bytes}-{name}~", dir=self.cache_dir
                    )
                    os.close(fd)
                    return tmp
            if not waited:
                _log.info(
                    "shard cache %s: waiting for room for %d bytes (other processes' "
                    "downloads hold it; limit %d bytes)",
                    self.cache_dir,
                    size_bytes,
                    self.limit_bytes,
                )
                waited = True
            time.sleep(delay)
            delay = min(2 * delay, longest)

    def _make_room(self, name: str, size_bytes: int) -> bool:
        """Called holding the folder lock and `name`'s lock. Deletes dead `.tmp-` files,
        then least recently used copies until `size_bytes` fits; False if it cannot fit
        yet because live downloads reserve the rest."""
        copies: list[_Entry] = []
        reserved = 0
        with os.scandir(self.cache_dir) as entries:
            for entry in entries:
                tmp = _TMP_NAME.fullmatch(entry.name)
                if tmp is not None:
                    declared, owner = int(tmp.group(1)), tmp.group(2)
                    if owner == name or not self._download_in_progress(owner):
                        # Its downloader died (kill -9, a node-local OOM kill): the lock it
                        # held is gone. For `name` itself we hold the lock: also dead.
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        reserved += max(declared, entry.stat().st_size)
                elif _CACHED_NAME.fullmatch(entry.name) and self.limit_bytes is not None:
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    copies.append(_Entry(entry.name, info.st_size, info.st_mtime_ns))
        if self.limit_bytes is None:
            return True
        used = reserved + sum(copy.size for copy in copies)
        copies.sort(key=lambda copy: (copy.used_ns, copy.name))  # oldest first
        evicted = 0
        for copy in copies:
            if used + size_bytes <= self.limit_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.cache_dir, copy.name))
            used -= copy.size
            evicted += 1
            _log.debug("shard cache: evicted %s (%d bytes)", copy.name, copy.size)
        if evicted:
            self._count(evictions=evicted)
        return used + size_bytes <= self.limit_bytes

    def _download_in_progress(self, name: str) -> bool:
        """Whether some process (or thread) holds `name`'s file lock. Non-blocking: we hold
        the folder lock, and a blocking wait here could deadlock with a holder of `name`'s
        lock waiting for the folder lock."""
        with self._lock(_FILE_LOCK_PREFIX + name, blocking=False) as acquired:
            return not acquired

    @contextlib.contextmanager
    def _lock(self, lock_name: str, blocking: bool = True) -> Iterator[bool]:
        """flock on `<cache_dir>/<lock_name>`; yields whether it was acquired. Lock files
        are never deleted: a process waiting on a deleted lock file's descriptor would hold
        a lock nobody else sees. Each lock uses its own open file description, so threads of
        one process exclude each other as processes do."""
        fd = os.open(
            os.path.join(self.cache_dir, lock_name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666
        )
        _held_lock_fds.add(fd)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
                acquired = True
            except BlockingIOError:  # EWOULDBLOCK: only without `blocking`
                acquired = False
            yield acquired  # closing the descriptor below releases the lock
        finally:
            _held_lock_fds.discard(fd)
            os.close(fd)


def _touch(fd: int) -> None:
    """Mark a copy used now (the LRU order). Explicit nanosecond times: the kernel's own
    "now" ticks in jiffies, too coarse to order opens made milliseconds apart. Setting
    explicit times needs ownership; a copy made by another user keeps its old time."""
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(fd, ns=(now, now))

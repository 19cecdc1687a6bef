"""One make_shards run per `--output`: a lock held from start-up to the end of the run.

Two runs writing the same folder would overwrite each other's shards and records. The
second one stops at start-up with one line naming the holder (exit code 2, as for every
start-up check: nothing was written, and retrying at once would meet the same holder).

Local folder: `_progress/lock`, held with flock(2). The kernel releases it when its holder
ends, however it ends (`kill -9` included), so a killed run never blocks the next one.
The file names its holder (host, pid, start) for the second run's message.

Object store: `_progress/lock.json`, created with a conditional PUT (`If-None-Match: *`),
so of two runs starting at once exactly one creates it. The holder rewrites it every
`HEARTBEAT_SECONDS` (conditional on its ETag: a run whose lock was taken over learns it
and stops). A lock is stale, and taken over (conditional on its ETag: of two runs taking
over, one wins), when its holder ran on this host and has ended, or when it was not
rewritten for `EXPIRY_SECONDS` (a holder on another host, killed, is recognised then).

Taking the lock is also the write probe of `--output`: a read-only folder, a missing
bucket or wrong credentials stop the run here, before any input is read.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import os
import sys
import threading
from typing import Any

import fsspec

from pmc_clip import process_owner, storage

HEARTBEAT_SECONDS = 60.0
EXPIRY_SECONDS = 600.0  # ten missed heartbeats


class OutputLock:
    """`with OutputLock(...)`: held inside the block; ValueError when it cannot be taken."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        folder: str,
        output: str,
        retry: storage.RetryPolicy,
    ) -> None:
        self.fs, self.retry = fs, retry
        self.output = storage.redact_url(output)
        self.local = storage.is_local(fs)
        self.path = storage.join(folder, "lock" if self.local else "lock.json")
        self.url = storage.redact_url(fs.unstrip_protocol(self.path))
        owner = process_owner.ProcessOwner.current()
        self.record = {
            "host": owner.host,
            "pid": owner.pid,
            "pid_start": owner.start,
            "started": _now().isoformat(timespec="seconds"),
            "token": os.urandom(8).hex(),
        }
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lost: str | None = None

    def __enter__(self) -> OutputLock:
        try:
            if self.local:
                self._acquire_file()
            else:
                self._acquire_object()
        except OSError as e:  # StorageError included: already names the lock, redacted
            detail = str(e) if isinstance(e, storage.StorageError) else f"{type(e).__name__}: {e}"
            raise ValueError(
                f"--output {self.output} cannot be written ({detail}): fix the path, its "
                "permissions, the bucket or the credentials"
            ) from None
        return self

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (see _acquire_file)
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join()
            self._release_object()

    def check(self) -> None:
        """Raise StorageError if the lock was lost (taken over, or not renewed)."""
        if self._lost is not None:
            raise storage.StorageError(
                f"--output {self.output}: {self._lost}; stopping so that two runs do not "
                "write the same shards"
            )

    # ------------------------------------------------------------------ local

    def _acquire_file(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # Never unlinked: a run that opened the old file while another unlinked it and
        # created a new one would lock a different file than the third run.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0)
            os.close(fd)
            raise ValueError(self._busy(_parse(holder))) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.record).encode(), 0)

    # ------------------------------------------------------------------ object store

    def _acquire_object(self) -> None:
        body = json.dumps(self.record).encode()
        for _ in range(3):  # created, or held, or stale and taken over; again if it vanished
            self._etag = self._call("create", lambda: self._put(body, create=True))
            if self._etag is not None:
                break
            held = self._read()
            if held is None:
                continue  # released in between
            holder, etag, modified = held
            if holder.get("token") == self.record["token"]:
                self._etag = etag  # our own create, whose reply was lost and retried
                break
            if not _is_stale(holder, modified):
                raise ValueError(self._busy(holder, modified))
            print(
                f"make_shards: taking over the stale lock {self.url} ({_describe(holder)})",
                file=sys.stderr,
            )
            self._etag = self._call("take over", functools.partial(self._put, body, if_match=etag))
            if self._etag is not None:
                break
        else:
            raise ValueError(f"--output {self.output}: the lock {self.url} keeps changing hands")
        self._heartbeat = threading.Thread(target=self._renew, name="lock", daemon=True)
        self._heartbeat.start()

    def _renew(self) -> None:
        body = json.dumps(self.record).encode()
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                renew = functools.partial(self._put, body, if_match=self._etag)
                self._etag = self._call("renew", renew)
            except storage.StorageError as e:
                self._lost = f"the lock could not be renewed ({e})"
                return
            if self._etag is None:
                self._lost = f"the lock {self.url} was taken over by another run"
                return

    def _release_object(self) -> None:
        if self._lost is not None:
            return  # not ours any more
        try:
            held = self._read()
            if held is not None and held[0].get("token") == self.record["token"]:
                self._call("remove", lambda: self.fs.rm_file(self.path))
        except storage.StorageError as e:
            print(
                f"make_shards: warning: could not remove the lock ({e}); the next run takes "
                f"it over {EXPIRY_SECONDS:.0f} s after its last renewal",
                file=sys.stderr,
            )

    def _put(self, body: bytes, create: bool = False, if_match: str | None = None) -> str | None:
        """One conditional PUT; its ETag, or None when its condition did not hold."""
        try:
            if create:
                reply = self.fs.pipe_file(self.path, body, mode="create")
            else:
                reply = self.fs.pipe_file(self.path, body, IfMatch=if_match)
        except FileExistsError:
            return None  # If-None-Match: * failed
        except OSError as e:
            if _error_code(e) == "PreconditionFailed":
                return None
            raise
        etag = reply.get("ETag") if isinstance(reply, dict) else None
        return str(etag) if etag else str(self.fs.info(self.path)["ETag"])

    def _read(self) -> tuple[dict[str, Any], str, datetime.datetime] | None:
        def read() -> tuple[dict[str, Any], str, datetime.datetime] | None:
            try:
                info = self.fs.info(self.path)
                body = storage.read_bytes(self.fs, self.path)
            except FileNotFoundError:
                return None
            return _parse(body), str(info.get("ETag")), info["LastModified"]

        return self._call("read", read)

    def _call(self, what: str, call: Any) -> Any:
        return storage.retry_call(f"{what} the lock", self.url, self.retry, call)

    def _busy(self, holder: dict[str, Any], modified: datetime.datetime | None = None) -> str:
        expiry = ""
        if modified is not None:
            stale_at = modified + datetime.timedelta(seconds=EXPIRY_SECONDS)
            expiry = (
                f"; if that run is gone, its lock expires at {stale_at.isoformat('T', 'seconds')}"
                f" (or delete {self.url})"
            )
        return (
            f"--output {self.output} is in use by another make_shards run "
            f"({_describe(holder)}{expiry}): wait for it to end or stop it; two runs "
            "would write the same shards"
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _parse(body: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        record = json.loads(body)
        if isinstance(record, dict):
            return record
    return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _is_stale(holder: dict[str, Any], modified: datetime.datetime) -> bool:
    if _now() - modified > datetime.timedelta(seconds=EXPIRY_SECONDS):
        return True
    try:
        owner = process_owner.ProcessOwner(
            str(holder["host"]), int(holder["pid"]), holder.get("pid_start")
        )
    except (KeyError, TypeError, ValueError):
        return False  # an unreadable holder is stale only once it expires
    return owner.is_gone()


def _error_code(error: BaseException) -> str | None:
    """The S3 error code behind an s3fs error (botocore's reply is its cause)."""
    response = getattr(error.__cause__, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None

"""Which process owns a lock or a staged file, told apart from a later process that
reuses its pid: make_shards' output lock and the upload staging files name their owner,
and a later run removes what an ended owner of this host left."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessOwner:
    """A process, told apart from a later one that reuses its pid by its start time
    (clock ticks since boot, from /proc; None where /proc is absent)."""

    host: str
    pid: int
    start: str | None

    @staticmethod
    def current() -> ProcessOwner:
        return ProcessOwner(socket.gethostname(), os.getpid(), process_start(os.getpid()))

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
        start = process_start(self.pid)
        if start == "zombie":
            return True
        return self.start is not None and start is not None and start != self.start


def process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), "zombie" for an ended, unreaped one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return "zombie" if fields[0] in (b"Z", b"X") else fields[19].decode()

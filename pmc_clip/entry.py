"""What the two entry points (`pmc_clip.train`, `pmc_clip.evaluate`) share: running a
Session under `cli`, which turns every expected failure into one line and an exit code.

Exit codes: 0 done; 1 stopped by an error found after start-up (a storage failure, a data
error, a dead data-loader worker or peer, a checkpoint that cannot be written: a requeue
may retry it); 2 a user error found at start-up; 3 stopped on SIGUSR1/SIGTERM after saving
a checkpoint (trainer.EXIT_CODE_PREEMPTED); 130 Ctrl-C.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from pmc_clip import distributed, metrics, storage
from pmc_clip.checkpointer import TrainingStopped
from pmc_clip.session import Session

EXIT_CODE_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C'd command
# torch's messages for a data-loader worker that died: "DataLoader worker (pid 123) is
# killed by signal: Killed." (its SIGCHLD handler), "... (pid(s) 1, 2) exited unexpectedly".
_DEAD_WORKER = re.compile(r"DataLoader worker \(pid(?:\(s\))? (?P<pids>[\d, ]+)\)")
# A collective that failed because of the other ranks: NCCL raises DistBackendError (a
# DistError); gloo a plain RuntimeError whose message names its source file
# ("[.../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer",
# "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 8000ms for recv
# operation to complete"), then "Application timeout caused pair closure" for the next
# collective after a timeout.
_COLLECTIVE_FAILURE = re.compile(r"/gloo/|\bNCCL\b|pair closure|ProcessGroup")

S = TypeVar("S", bound=Session)


def cli(
    start: Callable[[list[str]], S],
    work: Callable[[S], int],
    argv: list[str],
    prog: str,
) -> int:
    """Run an entry point: `start` parses the command line and builds the Session (the
    start-up checks), `work` trains or evaluates. Exit codes, each failure one line:
    2 a user error found at start-up (ValueError); 1 a storage failure (StorageError,
    named by its redacted URL) or anything found after start-up (`stop_reason`: data
    errors, a dead data-loader worker or peer, a checkpoint that cannot be written; a
    requeue may retry it); 130 Ctrl-C. Lines printed or logged go through the secret
    filter installed first (metrics.install_secret_filter)."""
    metrics.install_secret_filter(argv)
    session: S | None = None
    try:
        session = start(argv)
        return work(session)
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches every process of its group: data-loader workers end
        # quietly (torch's worker loop expects it), this process says so here, once.
        step = ""
        if session is not None:
            session.checkpointer.remove_staged()
            step = f" at step {session.progress.step}"
        _print_line(f"{prog}: interrupted (Ctrl-C){step}; the checkpoints so far are kept")
        return EXIT_CODE_INTERRUPTED
    except (ValueError, RuntimeError, storage.StorageError) as e:
        if session is None:
            if isinstance(e, RuntimeError):
                raise  # a bug at start-up: its traceback is the message
            # User errors are caught at start-up, before any step: say what to change.
            _print_line(f"{prog}: error: {e}")
            return 2 if isinstance(e, ValueError) else 1
        reason = stop_reason(e, rank=session.rank, world_size=session.world_size)
        if reason is None:
            raise
        session.log.error("stopping %s: %s", session.stage(), reason)
        session.log.debug("stopped by", exc_info=True)
        return 1
    finally:
        distributed.shutdown()


def stop_reason(error: Exception, *, rank: int, world_size: int) -> str | None:
    """What to log, in one line, when `error` ends a run after start-up (exit code 1),
    or None when it is a bug (this rank's own RuntimeError: out of memory, a shape
    mismatch), whose traceback is the message."""
    if isinstance(error, TrainingStopped):
        return str(error)
    if isinstance(error, (ValueError, storage.StorageError)):
        # Data found bad while running (a shard changed after it was indexed, duplicate
        # val keys), a storage failure. From a data-loader worker the message carries
        # the worker's traceback; its last line is the error itself.
        return (str(error).strip().splitlines() or [type(error).__name__])[-1]
    if not isinstance(error, RuntimeError):
        return None
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    dead_worker = _DEAD_WORKER.search(cause)
    if dead_worker:
        # Raised by torch's SIGCHLD handler wherever this process was (even inside a
        # collective); the other ranks then see this rank leave.
        how = cause[dead_worker.end() :].strip(" .")
        return (
            f"data-loader worker (pid {dead_worker['pids']}) of rank {rank} died "
            f"({how}; out of memory? see dmesg). The requeued job resumes from the last "
            "checkpoint"
        )
    if world_size > 1 and (
        isinstance(error, dist.DistError) or _COLLECTIVE_FAILURE.search(str(error))
    ):
        # A dead peer, a broken link or a collective that timed out (--dist-timeout-seconds).
        return (
            "a collective with the other ranks failed (a rank died, the network broke, or "
            "a rank hung for --dist-timeout-seconds). The requeued job resumes from the "
            f"last checkpoint. Cause: {cause}"
        )
    return None  # this rank's own error (no peers, or not a collective): a bug


def _print_line(line: str) -> None:
    print(metrics.mask_secrets(line), file=sys.stderr)

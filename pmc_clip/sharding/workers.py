"""Stage 3, load: worker processes read and fully decode every figure (what is read and
refused: pmc_clip/sharding/figures.py), running ahead of the writer by a bounded window.

Spawned workers import this module (`_init_worker`, `_load_batch`): it stays free of
torch, and of anything the workers do not need.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.context import SpawnContext, SpawnProcess

from pmc_clip.sharding.figures import Figure, FigureError, FigureOptions, FigureReader
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.plan import PlannedSample

# How many rows one worker task carries: large enough to amortise the IPC round trip,
# small enough that the in-flight window stays a few MB per worker.
_ROWS_PER_TASK = 16
_TASKS_IN_FLIGHT_PER_WORKER = 4
_ORPHAN_CHECK_SECONDS = 0.5

_worker_reader: FigureReader | None = None
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _init_worker(images_url: str, figure_options: FigureOptions, parent_pid: int) -> None:
    # The filesystem is created here, inside the worker, never inherited from the parent.
    # Ctrl-C reaches the whole process group, and SLURM's SIGTERM every process of the
    # job: the main process stops the pool, and a worker taking either as well would only
    # print a traceback of its own, or die and break the pool. (Both were blocked since
    # the worker started: _WorkerSpawnContext.)
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    global _worker_reader
    _worker_reader = FigureReader(images_url, figure_options)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


class _StopSignalsBlockedProcess(SpawnProcess):
    """A spawned worker born with SIGINT and SIGTERM blocked (a signal mask survives exec)
    until `_init_worker` ignores them: one during its start-up, a second or more of
    imports, would otherwise end it with a traceback (or silently, breaking the pool)."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _WorkerSpawnContext(SpawnContext):
    Process = _StopSignalsBlockedProcess


def _exit_when_orphaned(parent_pid: int) -> None:
    """A parent killed with -9 cannot stop its pool, and the workers would block forever
    on a queue whose write end they themselves hold: leave once the parent is gone."""
    while os.getppid() == parent_pid:
        time.sleep(_ORPHAN_CHECK_SECONDS)
    os._exit(1)


def _load_batch(rel_paths: list[str]) -> list[Figure | FigureError]:
    assert _worker_reader is not None, "worker not initialised"
    return [_worker_reader.read(path) for path in rel_paths]


def load_figures(
    samples: Sequence[PlannedSample], options: ShardOptions
) -> Iterator[Figure | FigureError]:
    """Figures for `samples`, in order. Workers run ahead by a bounded window, so memory
    stays O(workers) however long the split is."""
    if options.workers == 0:
        global _worker_reader
        _worker_reader = FigureReader(options.images, options.figure)
        for sample in samples:
            yield from _load_batch([sample.image])
        return
    context = _WorkerSpawnContext()
    with ProcessPoolExecutor(
        options.workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(options.images, options.figure, os.getpid()),
    ) as pool:
        pending: collections.deque[Future[list[Figure | FigureError]]] = collections.deque()
        batches = (
            [s.image for s in samples[i : i + _ROWS_PER_TASK]]
            for i in range(0, len(samples), _ROWS_PER_TASK)
        )
        for batch in batches:
            pending.append(pool.submit(_load_batch, batch))
            if len(pending) >= options.workers * _TASKS_IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

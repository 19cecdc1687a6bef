"""entry.py: which errors end a run in one line (exit 1) and which keep their traceback."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from pmc_clip.checkpointer import TrainingStopped
from pmc_clip.entry import stop_reason

# What gloo raised in a 2-rank run (torch 2.14) when the peer was killed, or hung past
# the timeout, and for the next collective after such a timeout.
GLOO_FAILURES = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection "
    "closed by peer [127.0.0.1]:26848. This is typically caused by a remote worker crashing.",
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed "
    "out waiting 4000ms for recv operation to complete",
    "Application timeout caused pair closure",
)
COLLECTIVE = "a collective with the other ranks failed"


@pytest.mark.parametrize("message", GLOO_FAILURES)
def test_a_collective_failed_by_a_peer_is_one_line(message: str) -> None:
    reason = stop_reason(RuntimeError(message), rank=0, world_size=2)
    assert reason is not None and reason.startswith(COLLECTIVE)
    assert reason.endswith(f"Cause: {message.splitlines()[0]}")


def test_nccl_failures_are_collective_failures() -> None:
    error = dist.DistBackendError("NCCL communicator was aborted on rank 1")
    reason = stop_reason(error, rank=0, world_size=2)
    assert reason is not None and reason.startswith(COLLECTIVE)
    watchdog = RuntimeError("[Rank 0] Watchdog caught collective operation timeout: NCCL ...")
    assert (stop_reason(watchdog, rank=0, world_size=2) or "").startswith(COLLECTIVE)


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)",
        "mat1 and mat2 shapes cannot be multiplied (4x512 and 768x512)",
    ],
)
@pytest.mark.parametrize("world_size", [1, 2])
def test_this_ranks_own_runtime_error_keeps_its_traceback(message: str, world_size: int) -> None:
    """Out of memory or a shape bug on one rank of many was reported as a collective
    failure in one line, its traceback lost; now cli re-raises it (None: a bug)."""
    assert stop_reason(RuntimeError(message), rank=1, world_size=world_size) is None


def test_expected_stops_are_one_line() -> None:
    assert stop_reason(TrainingStopped("3 non-finite steps"), rank=0, world_size=2) == (
        "3 non-finite steps"
    )
    worker_error = ValueError("Traceback (most recent call last):\n  ...\nValueError: bad shard")
    assert stop_reason(worker_error, rank=0, world_size=1) == "ValueError: bad shard"
    dead = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    reason = stop_reason(dead, rank=1, world_size=2)
    assert reason is not None
    assert reason.startswith("data-loader worker (pid 4242) of rank 1 died (is killed by signal")
    assert stop_reason(KeyError("x"), rank=0, world_size=2) is None

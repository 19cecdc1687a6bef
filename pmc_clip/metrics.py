"""Where numbers go: a console line, a plain-text log, and TensorBoard (rank 0 only).

Other ranks log warnings and errors to stderr only, so a 64-rank job's log reads like a
one-rank job's. Scalars passed here are already averaged over ranks by the caller.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

LOGGER_NAME = "pmc_clip"


def setup_logging(log_dir: str | None, rank: int) -> logging.Logger:
    """Configure the `pmc_clip` logger: INFO to stderr and `log_dir/out.log` on rank 0,
    WARNING and above (prefixed with the rank) elsewhere."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if rank == 0 and log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(log_dir, "out.log"))
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


class ScalarWriter:
    """TensorBoard scalars on rank 0; a no-op elsewhere or without --report-to tensorboard."""

    def __init__(self, tensorboard_dir: str | None) -> None:
        self._writer: Any = None
        if tensorboard_dir is not None:
            # Imported only where used: tensorboard pulls in a large dependency tree.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(tensorboard_dir)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def format_scalars(scalars: dict[str, float]) -> str:
    """'loss 1.2345 | lr 1.00e-04 | ...' for the console line."""
    parts = []
    for name, value in scalars.items():
        short = name.split("/")[-1]
        parts.append(
            f"{short} {value:.3e}" if abs(value) < 1e-2 and value else f"{short} {value:.4g}"
        )
    return " | ".join(parts)

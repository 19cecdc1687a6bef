"""Mixed precision: the autocast context of each --precision and the grad-scaler rule.

- fp32: no autocast, no scaler;
- amp_bf16: autocast to bfloat16, no scaler (bfloat16 has float32's exponent range);
- amp: autocast to float16 with a GradScaler. The scaler owns overflowing gradients: it
  skips such a step and lowers its scale, so a non-finite gradient norm is not a skipped
  step to count there, only a non-finite loss is.
"""

from __future__ import annotations

from typing import Any

import torch

AUTOCAST_DTYPES = {"amp_bf16": torch.bfloat16, "amp": torch.float16}
SCALED_PRECISION = "amp"


def autocast_context(device: torch.device, precision: str) -> Any:
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def build_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that scales only under --precision amp (a no-op otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == SCALED_PRECISION)


def nonfinite_grad(grad_norm: torch.Tensor, precision: str) -> torch.Tensor:
    """Whether a non-finite gradient norm skips the step (a bool tensor, no host sync)."""
    return ~torch.isfinite(grad_norm) & (precision != SCALED_PRECISION)


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    precision: str,
    nonfinite: bool,
) -> None:
    """Step unless `nonfinite` (any rank's loss or gradient); under amp the scaler decides."""
    if precision == SCALED_PRECISION:
        scaler.step(optimizer)  # skips steps whose gradients overflowed
        scaler.update()
    elif not nonfinite:
        optimizer.step()

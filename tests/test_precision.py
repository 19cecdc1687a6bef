"""precision.py: the autocast dtype of each --precision and the grad-scaler rule."""

from __future__ import annotations

import pytest
import torch

from pmc_clip import precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp32", None), ("amp_bf16", torch.bfloat16), ("amp", torch.float16)]
)
def test_autocast_runs_each_precision_in_its_dtype(name: str, dtype: torch.dtype | None) -> None:
    layer = torch.nn.Linear(4, 4)
    with precision.autocast_context(CPU, name):
        out = layer(torch.ones(2, 4))
    assert out.dtype == (dtype or torch.float32)


def test_only_amp_scales_and_owns_overflowing_gradients() -> None:
    assert precision.build_grad_scaler(CPU, "amp").is_enabled()
    assert not precision.build_grad_scaler(CPU, "amp_bf16").is_enabled()
    assert not precision.build_grad_scaler(CPU, "fp32").is_enabled()
    inf = torch.tensor(float("inf"))
    assert bool(precision.nonfinite_grad(inf, "fp32"))
    assert bool(precision.nonfinite_grad(inf, "amp_bf16"))
    assert not bool(precision.nonfinite_grad(inf, "amp"))  # the scaler skips that step
    assert not bool(precision.nonfinite_grad(torch.tensor(1.0), "fp32"))


def test_a_nonfinite_step_leaves_the_weights_unless_the_scaler_decides() -> None:
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    scaler = precision.build_grad_scaler(CPU, "fp32")
    layer(torch.ones(1, 2)).sum().backward()
    before = layer.weight.detach().clone()
    precision.optimizer_step(optimizer, scaler, precision="fp32", nonfinite=True)
    assert torch.equal(layer.weight, before)
    precision.optimizer_step(optimizer, scaler, precision="fp32", nonfinite=False)
    assert not torch.equal(layer.weight, before)

"""checkpointer.py: the resumable pieces (TrainProgress, RngState), the checkpoint's layout,
and evaluation-only runs (a Session: weights only, no optimizer, no DDP wrapper)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers_train import build_train_data, train_args

from pmc_clip import distributed
from pmc_clip.checkpointer import RngState, TrainProgress
from pmc_clip.config import parse_run_config
from pmc_clip.evaluate import start_evaluation
from pmc_clip.session import Session
from pmc_clip.trainer import Trainer

# The checkpoint file's layout (checkpoint.CHECKPOINT_FORMAT): existing files must load.
CHECKPOINT_KEYS = [
    "format",
    "model",
    "optimizer",
    "scaler",
    "step",
    "epoch",
    "data",
    "nonfinite_steps",
    "config",
    "rng",
    "tokenizer",
]
LOG = logging.getLogger("pmc_clip")


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_train_progress_round_trips_under_the_checkpoint_keys() -> None:
    progress = TrainProgress(epoch=2, step=17, num_nonfinite_steps=3)
    state = progress.state_dict()
    assert state == {"step": 17, "epoch": 2, "nonfinite_steps": 3}
    restored = TrainProgress()
    restored.load_state_dict(state)
    assert restored == progress


def test_rng_state_restores_every_generator() -> None:
    rng = RngState(rank=0, world_size=1, log=LOG)
    states = rng.state_dict()
    assert len(states) == 1 and set(states[0]) == {"torch", "cuda", "numpy", "python"}
    expected = _draws()
    rng.load_state_dict(states)
    assert rng.restored and _draws() == expected


def test_rng_state_of_another_world_size_starts_afresh(caplog: pytest.LogCaptureFixture) -> None:
    saved = RngState(rank=0, world_size=1, log=LOG).state_dict()
    rng = RngState(rank=0, world_size=2, log=LOG)
    propagates = LOG.propagate  # setup_logging turns it off; caplog listens at the root
    LOG.propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="pmc_clip"):
            rng.load_state_dict(saved * 3)
    finally:
        LOG.propagate = propagates
    assert not rng.restored
    assert "saved by 3 ranks, resumed on 2" in caplog.text


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_train_data(tmp_path_factory.mktemp("checkpointer-data"))


@pytest.mark.usefixtures("restore_stop_handlers")
def test_checkpoint_layout_and_an_evaluation_only_run(
    data: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training checkpoint has the file format's keys, in its order; evaluating it
    builds no optimizer, no train loader and never wraps the model for DDP."""
    trainer = Trainer(parse_run_config(train_args(data, tmp_path, "run", "--epochs", "1")))
    state = trainer.checkpointer.state_dict()
    assert list(state) == CHECKPOINT_KEYS
    assert (state["step"], state["epoch"], state["nonfinite_steps"]) == (0, 0, 0)
    path = trainer.checkpointer.save(end_of_epoch=False)

    def no_wrapping(*args: Any) -> Any:
        raise AssertionError("an evaluation-only run wrapped the model for DDP")

    monkeypatch.setattr(distributed, "wrap_model", no_wrapping)
    session = start_evaluation(train_args(data, tmp_path, "eval", "--resume", path))
    assert type(session) is Session and session.checkpointer.training is None
    assert not hasattr(session, "train_loader") and not hasattr(session, "ddp_model")
    assert torch.equal(
        next(iter(session.model.state_dict().values())),
        next(iter(trainer.model.state_dict().values())),
    )

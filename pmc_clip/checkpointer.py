"""What a training checkpoint holds, and saving and resuming it.

A checkpoint is the `state_dict()` of each resumable piece of a run, in one file
(`checkpoint.py` writes and reads that file: staging, sha256 sidecars, `latest.json`,
keep-last): the model, the optimizer, the grad scaler, the train loader's stream position,
the run's counters (`TrainProgress`) and every rank's random generators (`RngState`), plus
the run's config and tokenizer identity. Resuming hands each piece its part back through
`load_state_dict()`, after checking that the weights and tokenizer fit this run.

The file's layout (`checkpoint.CHECKPOINT_FORMAT`) is flat and fixed: format, model,
optimizer, scaler, step, epoch, data, nonfinite_steps, config, rng, tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pmc_clip import checkpoint, distributed, storage
from pmc_clip.config import RELEASED_CHECKPOINT, RunConfig
from pmc_clip.data.loaders import TrainLoader
from pmc_clip.model import PMCClip


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps, a checkpoint that cannot be
    written); the message says why and what was kept."""


@dataclasses.dataclass
class TrainProgress:
    """Where the run is: the epoch being run (the next one, after an epoch's save),
    optimizer steps taken, and steps skipped as non-finite over the whole run."""

    epoch: int = 0
    step: int = 0
    num_nonfinite_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "nonfinite_steps": self.num_nonfinite_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.num_nonfinite_steps = state["nonfinite_steps"]


class RngState:
    """Every rank's generators (python, numpy, torch, CUDA), indexed by rank: dropout
    differs between ranks, so each rank saves and restores its own."""

    def __init__(self, *, rank: int, world_size: int, log: logging.Logger) -> None:
        self.rank, self.world_size, self.log = rank, world_size, log
        self.restored = False

    def state_dict(self) -> list[dict[str, Any]]:
        """All ranks' states (a collective: every rank must call it)."""
        states: list[Any] = [_rng_state()]
        if self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, _rng_state())
        return states

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """This rank's state, when the checkpoint was saved by as many ranks; otherwise
        the random streams start afresh (`restored` stays False)."""
        if len(states) == self.world_size:
            _set_rng_state(states[self.rank])
            self.restored = True
        else:
            self.log.warning(
                "checkpoint saved by %d ranks, resumed on %d: random streams (dropout) "
                "start afresh",
                len(states),
                self.world_size,
            )


@dataclasses.dataclass
class TrainingState:
    """The resumable pieces of a training run besides the model."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: TrainLoader
    rng: RngState


class Checkpointer:
    """Saves a run's pieces (rank 0 writes, every rank calls) and resumes them.
    `training` is None for an evaluation-only run, which loads weights only."""

    def __init__(
        self,
        config: RunConfig,
        *,
        directory: str,
        model: PMCClip,
        tokenizer_identity: dict[str, Any],
        progress: TrainProgress,
        training: TrainingState | None,
        rank: int,
        world_size: int,
        device: torch.device,
        log: logging.Logger,
    ) -> None:
        self.config, self.directory, self.model = config, directory, model
        self.tokenizer_identity, self.progress, self.training = (
            tokenizer_identity,
            progress,
            training,
        )
        self.rank, self.world_size, self.device, self.log = rank, world_size, device, log
        self.last_save_time = time.monotonic()

    # ------------------------------------------------------------------ saving

    def due_by_time(self) -> bool:
        minutes = self.config.checkpoint.save_every_minutes
        # Rank 0's clock decides; the step's flag all-reduce tells the others.
        return (
            bool(minutes)
            and self.rank == 0
            and (time.monotonic() - self.last_save_time >= minutes * 60)
        )

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's contents (a collective: the ranks' generators are gathered)."""
        return self._contents(self._gather_rng_states())

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        assert self.training is not None, "an evaluation-only run saves no checkpoint"
        return self.training.rng.state_dict()

    def _contents(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.training is not None
        progress = self.progress.state_dict()
        return {
            "format": checkpoint.CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.training.optimizer.state_dict(),
            "scaler": self.training.scaler.state_dict(),
            "step": progress["step"],
            "epoch": progress["epoch"],
            "data": self.training.loader.state_dict(),
            "nonfinite_steps": progress["nonfinite_steps"],
            "config": self.config.to_dict(),
            "rng": rng_states,
            "tokenizer": self.tokenizer_identity,
        }

    def save(self, *, end_of_epoch: bool) -> str:
        """Every rank calls this at the same step (it has collectives); rank 0 writes.
        Returns the checkpoint's URL. A failed write stops every rank alike."""
        rng_states = self._gather_rng_states()
        name = checkpoint.checkpoint_name(
            epoch=self.progress.epoch, step=self.progress.step, end_of_epoch=end_of_epoch
        )
        url = f"{self.directory}/{name}"
        error = ""
        if self.rank == 0:
            try:
                url = checkpoint.save_checkpoint(
                    self.directory,
                    name=name,
                    state=self._contents(rng_states),
                    keep_last=self.config.checkpoint.keep_last,
                )
                self.log.info("saved checkpoint %s", storage.redact_url(url))
            except OSError as e:
                error = str(e)
        if distributed.any_rank(bool(error), self.device, self.world_size):
            # The requeued job resumes from the previous checkpoint, which is intact.
            raise TrainingStopped(error or "rank 0 could not write a checkpoint (see its log)")
        self.last_save_time = time.monotonic()
        return url

    def remove_staged(self) -> None:
        """Rank 0, the folder's only writer: remove the staged file of a save that was
        killed (at start-up) or interrupted (Ctrl-C, wherever it landed in the save), and
        the local staging files of S3 uploads whose process on this host has ended."""
        if self.rank == 0:
            storage.remove_stale_staging_files(*storage.url_to_fs(self.directory))
            storage.remove_orphaned_uploads()

    # ------------------------------------------------------------------ resuming

    def resume(self) -> None:
        """Load what --resume names: weights always, the training pieces when training."""
        target = self.config.checkpoint.resume
        if target is None:
            return
        if target == RELEASED_CHECKPOINT:
            url = self.config.checkpoint.pmc_clip_beta
            assert url is not None  # checked by the config
            state_dict = checkpoint.load_pmc_clip_checkpoint(url)
            self._load_weights(storage.redact_url(url), state_dict, saved_spec=None)
            self.log.info(
                "initialised from the released PMC-CLIP weights (--model %s)",
                self.config.model.model,
            )
            return
        path = checkpoint.resolve_latest(self.directory) if target == "latest" else target
        if path is None:
            self.log.info(
                "--resume latest: no checkpoint in %s yet, starting fresh",
                storage.redact_url(self.directory),
            )
            return
        where = storage.redact_url(path)
        state = checkpoint.load_checkpoint(path)
        self._load_weights(where, state["model"], state["config"]["model"])
        self._check_same_tokenizer(where, state.get("tokenizer"))
        if self.training is None:
            self.log.info("loaded weights from %s (step %d)", where, state["step"])
            return
        try:
            self._restore_training_state(self.training, state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            # load_checkpoint checked the structure; this is state that fits no run of
            # this model and data (a hand-edited or foreign file), or other data flags.
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"cannot continue from checkpoint {where}: {reason}") from None
        self.log.info(
            "resumed from %s at epoch %d step %d", where, self.progress.epoch, self.progress.step
        )

    def _load_weights(
        self, where: str, weights: dict[str, torch.Tensor], saved_spec: dict[str, Any] | None
    ) -> None:
        """Load `weights` whole, or stop at start-up saying what differs (never a partial
        load, never load_state_dict's traceback of 300 missing keys). `saved_spec`: the
        --model flags the checkpoint was saved with (None: the released weights)."""
        spec = self.config.model
        mine = {"model": spec.model, "mlm": spec.mlm}
        if saved_spec is not None and any(saved_spec[k] != v for k, v in mine.items()):
            raise ValueError(
                f"{where} holds a {_model_flags(saved_spec)} model, this run builds a "
                f"{_model_flags(dataclasses.asdict(spec))} one: pass the same flags to load it"
            )
        differences = checkpoint.weights_misfit(self.model, weights)
        if differences:
            saved_with = (
                f"It was saved with {_model_flags(saved_spec)}"
                if saved_spec is not None
                else "The released weights are --model RN50_fusion4 --mlm with the PubMedBERT "
                "--text-encoder"
            )
            raise ValueError(
                f"{where} does not fit the model this run builds "
                f"({_model_flags(dataclasses.asdict(spec))}): {'; '.join(differences[:3])}. "
                f"{saved_with}: pass the same flags (model config, text encoder, tokenizer)"
            )
        self.model.load_state_dict(weights)

    def _check_same_tokenizer(self, where: str, saved: Any) -> None:
        """Same shapes but another vocabulary (or order) would map token ids to other words
        without an error. Checkpoints from before the tokenizer was recorded pass."""
        if saved is None or saved == self.tokenizer_identity:
            return
        described = (
            f"{saved.get('num_tokens')} tokens, vocabulary sha256 "
            f"{str(saved.get('vocab_sha256'))[:12]}"
            if isinstance(saved, dict)
            else repr(saved)
        )
        mine = self.tokenizer_identity
        raise ValueError(
            f"{where} was trained with another tokenizer ({described}) than this run's "
            f"({mine['num_tokens']} tokens, sha256 {mine['vocab_sha256'][:12]}): its token "
            "ids would mean other words. Pass the --tokenizer (or --text-encoder) it was "
            "trained with"
        )

    def _restore_training_state(self, training: TrainingState, state: dict[str, Any]) -> None:
        training.optimizer.load_state_dict(state["optimizer"])
        training.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state)
        data_state = state["data"]
        if data_state["epoch"] == self.progress.epoch:
            # Stopped inside this epoch (or after its last step, before its end-of-epoch
            # evaluation and save): continue the stream exactly there.
            training.loader.load_state_dict(data_state)
        training.rng.load_state_dict(state["rng"])


def check_writable(directory: str, *, rank: int, world_size: int) -> None:
    """Rank 0 probes the checkpoint folder at start-up and every rank learns the result
    (all stop alike, none waits in a collective for a rank that left)."""
    problem: list[str | None] = [None]
    if rank == 0:
        try:
            checkpoint.probe_writable(directory)
        except OSError as e:
            problem[0] = str(e)
    if world_size > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ValueError(
            f"--checkpoint-dir {storage.redact_url(directory)} cannot be written "
            f"({problem[0]}): fix the path, the bucket or the credentials"
        )


def _model_flags(spec: dict[str, Any]) -> str:
    """The model flags of a ModelSpec (as a dict), as a command line would give them."""
    flags = [f"--model {spec.get('model')}"]
    flags += [
        f"--{name.replace('_', '-')} {spec[name]}"
        for name in ("text_encoder", "tokenizer")
        if spec.get(name)
    ]
    return " ".join(flags + (["--mlm"] if spec.get("mlm") else []))


def _rng_state() -> dict[str, Any]:
    """Every generator the step uses, as tensors and plain Python values only."""
    numpy_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))

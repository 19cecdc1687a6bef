"""The Trainer: a Session (session.py) that trains: epochs, optimizer steps, checkpoints.

Reads top to bottom: `_build_training` builds what only training needs (optimizer, grad
scaler, loss, train loader), `_wrap_model` wraps the model for DDP, `fit` loops over
epochs, `_train_epoch` over optimizer steps, `_step` is one optimizer step (micro-batches,
backward, clip, step). What a checkpoint holds and how a run resumes: checkpointer.py;
the logged numbers: metrics.py; autocast and the grad scaler: precision.py.

Sync points per optimizer step, by design:
- DDP's gradient all-reduce in the last micro-batch's backward (earlier micro-batches
  run under `no_sync`, so accumulation costs no communication);
- one all-reduce of two flags (non-finite loss or grad norm on any rank; stop requested
  on any rank) followed by one host sync to read them. Every rank therefore skips the
  same steps and stops at the same step boundary;
- every `log_every_n_steps`, an all-reduce of the loss sums for the log line.
Checkpoints are written by rank 0 alone; the others go on and meet it in the next step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from pmc_clip import distributed, metrics, optim, precision, storage, transforms
from pmc_clip.checkpointer import RngState, TrainingState, TrainingStopped
from pmc_clip.config import DataConfig
from pmc_clip.data.loaders import TrainLoader, build_train_loader
from pmc_clip.losses import ClipLoss, PMCClipLoss
from pmc_clip.model.pmc_clip import MAX_LOGIT_SCALE
from pmc_clip.session import Session

# Exit code of a run stopped by SIGUSR1/SIGTERM after saving its checkpoint: the launch
# scripts requeue the job on it (launch/pretrain_8node.sh).
EXIT_CODE_PREEMPTED = 3


@dataclasses.dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # detached, on device: summed over micro-batches
    grad_norm: torch.Tensor
    nonfinite: bool
    stop_requested: bool
    save_due_by_time: bool


class Trainer(Session):
    trains: ClassVar[bool] = True
    training: TrainingState

    # ------------------------------------------------------------------ building

    def _build_training(self, data_config: DataConfig) -> TrainingState:
        config = self.config
        optimizer = optim.build_optimizer(self.model, config.optim)
        scaler = precision.build_grad_scaler(self.device, config.model.precision)
        self.loss_fn = PMCClipLoss(
            ClipLoss(rank=self.rank, world_size=self.world_size, local_loss=config.loss.local_loss),
            clip_weight=config.loss.clip_weight,
            mlm_weight=config.loss.mlm_weight if config.model.mlm else 0.0,
        )
        self.train_loader = build_train_loader(
            data_config,
            self.tokenizer,
            rank=self.rank,
            world_size=self.world_size,
            seed=config.train.seed,
            ranks_per_node=self.info.local_world_size,
        )
        self.steps_per_epoch = math.ceil(self.train_loader.num_batches / config.train.accum_freq)
        self.total_steps = self.steps_per_epoch * config.train.epochs
        self.num_nonfinite_in_a_row = 0
        self.training = TrainingState(
            optimizer,
            scaler,
            self.train_loader,
            RngState(rank=self.rank, world_size=self.world_size, log=self.log),
        )
        return self.training

    def _wrap_model(self) -> None:
        self.ddp_model: Any = distributed.wrap_model(self.model, self.info, self.device)
        self.forward_model: Any = self.ddp_model
        if self.config.model.torch_compile:
            self.forward_model = torch.compile(self.ddp_model)

    def _describe(self) -> str:
        return (
            f"{self.steps_per_epoch} steps per epoch, {self.config.train.epochs} epochs, "
            f"{self.train_loader.num_samples} samples per epoch"
        )

    def stage(self) -> str:
        return f"at step {self.progress.step}"

    # ------------------------------------------------------------------ training

    def fit(self) -> int:
        """Train to the last epoch; return 0, or EXIT_CODE_PREEMPTED after a stop signal.
        A failure on the way raises (`entry.stop_reason` says which are expected)."""
        try:
            for epoch in range(self.progress.epoch, self.config.train.epochs):
                self.progress.epoch = epoch
                if self.train_loader.epoch != epoch:
                    self.train_loader.set_epoch(epoch)
                if not self._train_epoch(self.train_loader):
                    self.checkpointer.save(end_of_epoch=False)
                    self.log.info(
                        "stopped on request at step %d; checkpoint saved", self.progress.step
                    )
                    return EXIT_CODE_PREEMPTED
                self._end_of_epoch(epoch)
            return 0
        finally:
            self.records.close()

    def _end_of_epoch(self, epoch: int) -> None:
        last = epoch + 1 == self.config.train.epochs
        val_every, save_every = (
            self.config.eval.val_frequency,
            self.config.checkpoint.save_frequency,
        )
        # Saved first: an evaluation that fails (bad val data) must not cost the epoch.
        if last or (save_every and (epoch + 1) % save_every == 0):
            self.progress.epoch = epoch + 1  # the next epoch to run, as a resume should see it
            self.checkpointer.save(end_of_epoch=True)
        if self.val_loader is not None and (last or (val_every and (epoch + 1) % val_every == 0)):
            self.evaluate()

    def _train_epoch(self, loader: TrainLoader) -> bool:
        """One epoch from the loader's position. False if a stop was requested."""
        window = metrics.StepWindow(self.device)
        for group in self._micro_batch_groups(loader):
            result = self._step(group)
            window.add(result.losses, sum(len(b["keys"]) for b in group))
            if self.progress.step % self.config.log.log_every_n_steps == 0:
                self._log_window(window, result, loader)
                window = metrics.StepWindow(self.device)
            if result.stop_requested:
                return False
            every_n = self.config.checkpoint.save_every_n_steps
            if result.save_due_by_time or (every_n and self.progress.step % every_n == 0):
                self.checkpointer.save(end_of_epoch=False)
        return True

    def _micro_batch_groups(self, loader: TrainLoader) -> Iterator[list[dict[str, Any]]]:
        """The loader's batches in groups of --accum-freq (the last group of an epoch may
        be smaller: every batch of the epoch is used)."""
        group: list[dict[str, Any]] = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.config.train.accum_freq:
                yield group
                group = []
        if group:
            yield group

    def _step(self, group: list[dict[str, Any]]) -> StepResult:
        spec = self.config.model
        optimizer = self.training.optimizer
        scaler = self.training.scaler
        lr = optim.lr_at_step(self.progress.step, self.config.optim, total_steps=self.total_steps)
        optim.set_lr(optimizer, lr)
        loss_sums: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(group):
            is_last = index == len(group) - 1
            # Gradients are all-reduced only in the last micro-batch's backward.
            defer_sync = not is_last and self.world_size > 1
            with self.ddp_model.no_sync() if defer_sync else contextlib.nullcontext():
                with precision.autocast_context(self.device, spec.precision):
                    outputs = self.forward_model(*self._model_inputs(batch))
                    mlm_labels = batch.get("mlm_labels")
                    if mlm_labels is not None:
                        mlm_labels = mlm_labels.to(self.device, non_blocking=True)
                    losses = self.loss_fn(outputs, mlm_labels)
                scaler.scale(losses["loss"] / len(group)).backward()
            for name, value in losses.items():
                loss_sums[name] = loss_sums.get(name, 0) + value.detach() / len(group)
        scaler.unscale_(optimizer)
        max_norm = self.config.optim.grad_clip_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # One collective and one host sync per step: every rank learns whether any rank
        # saw a non-finite loss, was asked to stop, or (rank 0's clock) is due to save.
        loss_nonfinite = ~torch.isfinite(loss_sums["loss"])
        grad_nonfinite = precision.nonfinite_grad(grad_norm, spec.precision)
        local_flags = [self.stop_requested, self.checkpointer.due_by_time()]
        flags = torch.cat(
            [
                (loss_nonfinite | grad_nonfinite).view(1),
                torch.tensor(local_flags, device=self.device),
            ]
        ).float()
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop_now, save_due = (bool(v) for v in flags.tolist())
        precision.optimizer_step(optimizer, scaler, precision=spec.precision, nonfinite=nonfinite)
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.progress.step += 1  # steps are counted 1-based in logs, metrics and checkpoint names
        self._count_nonfinite(nonfinite)
        return StepResult(loss_sums, grad_norm.detach(), nonfinite, stop_now, save_due)

    def _model_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        memory_format = (
            torch.channels_last if self.config.model.channels_last else torch.contiguous_format
        )
        images = transforms.normalize_images(
            batch["images"].to(self.device, non_blocking=True), memory_format
        )
        inputs = [
            images,
            batch["input_ids"].to(self.device, non_blocking=True),
            batch["attention_mask"].to(self.device, non_blocking=True),
        ]
        if "mlm_input_ids" in batch:
            inputs.append(batch["mlm_input_ids"].to(self.device, non_blocking=True))
        return tuple(inputs)

    def _count_nonfinite(self, nonfinite: bool) -> None:
        if not nonfinite:
            self.num_nonfinite_in_a_row = 0
            return
        self.num_nonfinite_in_a_row += 1
        self.progress.num_nonfinite_steps += 1
        self.log.warning(
            "step %d: non-finite loss or gradient on some rank; step skipped (%d in a row)",
            self.progress.step,
            self.num_nonfinite_in_a_row,
        )
        limit = self.config.train.max_consecutive_nonfinite
        if self.num_nonfinite_in_a_row >= limit:
            # Skipped steps never touched the weights: this is the last good state.
            path = self.checkpointer.save(end_of_epoch=False)
            raise TrainingStopped(
                f"{limit} non-finite steps in a row at step {self.progress.step}: stopping. "
                f"The last good weights are in {storage.redact_url(path)}. Lower --lr, set "
                "--grad-clip-norm, or check the data for broken samples"
            )

    # ------------------------------------------------------------------ logging

    def _log_window(
        self, window: metrics.StepWindow, result: StepResult, loader: TrainLoader
    ) -> None:
        means = window.mean(self.world_size)  # a collective: every rank calls it
        if self.rank != 0:
            return
        meter = loader.meter.snapshot()
        loader.meter.reset()
        state = {
            "train/lr": self.training.optimizer.param_groups[0]["lr"],
            "train/logit_scale": float(self.model.logit_scale.detach().exp()),
            "train/grad_norm": float(result.grad_norm),
            "train/nonfinite_steps": float(self.progress.num_nonfinite_steps),
        }
        scalars = metrics.train_scalars(
            window,
            means=means,
            state=state,
            loader_meter=meter,
            world_size=self.world_size,
            device=self.device,
        )
        self.records.train(
            scalars,
            epoch=self.progress.epoch,
            step=self.progress.step,
            total_steps=self.total_steps,
        )

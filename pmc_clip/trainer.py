"""The Trainer: build everything from a RunConfig, then train, evaluate and checkpoint.

Reads top to bottom: `Trainer.__init__` builds (device and process group, logging,
tokenizer, model, optimizer, loss, loaders, resume), `fit` loops over epochs, `_train_epoch`
over optimizer steps, `_step` is one optimizer step (micro-batches, backward, clip, step).

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
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
import torch.distributed as dist

from pmc_clip import checkpoint, distributed, evaluate, metrics, optim, storage, transforms
from pmc_clip.api import build_model, build_tokenizer, tokenizer_identity
from pmc_clip.config import RELEASED_CHECKPOINT, DataConfig, RunConfig, parse_run_config
from pmc_clip.data import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from pmc_clip.losses import ClipLoss, PMCClipLoss
from pmc_clip.model import PMCClip
from pmc_clip.model.pmc_clip import MAX_LOGIT_SCALE
from pmc_clip.sharding import ShardOptions, make_shards

# Exit code of a run stopped by SIGUSR1/SIGTERM after saving its checkpoint: the launch
# scripts requeue the job on it (launch/pretrain_8node.sh).
EXIT_CODE_PREEMPTED = 3
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_CODE_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C'd command
# torch's messages for a data-loader worker that died: "DataLoader worker (pid 123) is
# killed by signal: Killed." (its SIGCHLD handler), "... (pid(s) 1, 2) exited unexpectedly".
_DEAD_WORKER = re.compile(r"DataLoader worker \(pid(?:\(s\))? (?P<pids>[\d, ]+)\)")
EVAL_SEED = 0
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
# Small shards so that every rank (and loader worker) gets a share of a 2,000-pair table.
VAL_TABLE_SHARD_SIZE = 128


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps, a checkpoint that cannot be
    written); the message says why and what was kept."""


@dataclasses.dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # detached, on device: summed over micro-batches
    grad_norm: torch.Tensor
    nonfinite: bool
    stop_requested: bool
    save_due_by_time: bool


class Trainer:
    def __init__(
        self, config: RunConfig, info: distributed.DistInfo | None = None, train: bool = True
    ) -> None:
        """train=False builds for evaluation only: no train data, optimizer state unused."""
        if config.checkpoint.resume == RELEASED_CHECKPOINT:
            # The released weights compute the original's function only with its options
            # (RN50_fusion4 -> RN50_fusion4_original); in self.config, so this run's
            # checkpoints name the model they hold.
            released_model = checkpoint.released_model_name(config.model.model)
            config = dataclasses.replace(
                config, model=dataclasses.replace(config.model, model=released_model)
            )
        self.config = config
        self.info = info or distributed.detect()
        self.rank, self.world_size = self.info.rank, self.info.world_size
        self.device = distributed.select_device(self.info, config.dist.device)
        distributed.init_process_group(
            self.info, self.device, config.dist.dist_backend, config.dist.dist_timeout_seconds
        )
        self.run_dir = os.path.join(config.log.logs, self._run_name())
        self.log = metrics.setup_logging(self.run_dir, self.rank)
        self.checkpoint_dir = config.checkpoint.checkpoint_dir or os.path.join(
            self.run_dir, "checkpoints"
        )
        if train:
            self._check_checkpoint_dir_writable()
        self._install_stop_handlers()

        # Same seed everywhere for the initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(config.train.seed)
        self.tokenizer = build_tokenizer(config.model)
        self.tokenizer_identity = tokenizer_identity(self.tokenizer)
        self.model = self._build_model()
        self.optimizer = optim.build_optimizer(self.model, config.optim)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.model.precision == "amp"
        )
        self.loss_fn = PMCClipLoss(
            ClipLoss(self.rank, self.world_size, config.loss.local_loss),
            config.loss.clip_weight,
            config.loss.mlm_weight if config.model.mlm else 0.0,
        )
        # The model decides the input resolution; the pipeline follows it. The loader ships
        # uint8 pixels (4x fewer bytes through shared memory and PCIe than float32) and
        # _model_inputs normalises them on the device.
        data_config = dataclasses.replace(config.data, image_size=self.model.config.image_size)
        self.train_loader: TrainLoader | None = None
        if train:
            self.train_loader = build_train_loader(
                data_config,
                self.tokenizer,
                self.rank,
                self.world_size,
                config.train.seed,
                ranks_per_node=self.info.local_world_size,
            )
        self.val_loader: EvalLoader | None = None
        data_config = self._val_data_as_shards(data_config)
        if config.data.val_data:
            # A fixed seed for the val masks: MLM accuracy compares across runs and seeds.
            self.val_loader = build_eval_loader(
                data_config, self.tokenizer, self.rank, self.world_size, seed=EVAL_SEED
            )
            num_pairs = self.val_loader.num_samples  # from the manifest (or --val-num-samples)
            if config.eval.test_2000 and num_pairs < evaluate.TEST_2000_PAIRS:
                raise ValueError(
                    f"--test-2000 needs at least {evaluate.TEST_2000_PAIRS} val pairs; "
                    f"--val-data has {num_pairs}: drop --test-2000 or give a larger val set"
                )
        num_batches = self.train_loader.num_batches if self.train_loader else 0
        self.steps_per_epoch = math.ceil(num_batches / config.train.accum_freq)
        self.total_steps = self.steps_per_epoch * config.train.epochs
        self.step = 0  # optimizer steps taken
        self.epoch = 0
        self.num_nonfinite_in_a_row = 0
        self.num_nonfinite_total = 0
        self.rng_restored = False
        self._resume()
        if not self.rng_restored:
            # Per-rank randomness (dropout) differs between ranks, after the shared init.
            torch.manual_seed(config.train.seed * 1000 + self.rank)
        self.ddp_model: Any = distributed.wrap_model(self.model, self.info, self.device)
        self.forward_model: Any = self.ddp_model
        if config.model.torch_compile:
            self.forward_model = torch.compile(self.ddp_model)
        report_to = config.log.report_to if self.rank == 0 else ()
        self.scalars = metrics.ScalarWriter(
            os.path.join(self.run_dir, "tensorboard") if "tensorboard" in report_to else None,
            metrics.start_wandb_run(
                self.run_dir,
                os.path.basename(self.run_dir),
                config.log.wandb_project,
                config.to_dict(),
            )
            if "wandb" in report_to
            else None,
        )
        self.last_save_time = time.monotonic()
        self._prepare_run_dir()
        self.log.info(
            "world size %d (%s launcher), device %s, %d steps per epoch, %d epochs, "
            "%d samples per epoch",
            self.world_size,
            self.info.launcher,
            self.device,
            self.steps_per_epoch,
            config.train.epochs,
            self.train_loader.num_samples if self.train_loader else 0,
        )

    # ------------------------------------------------------------------ building

    def _run_name(self) -> str:
        name = self.config.log.name or time.strftime("run-%Y%m%d-%H%M%S")
        if self.world_size > 1 and self.config.log.name is None:
            names = [name]
            dist.broadcast_object_list(names, src=0)  # ranks must agree on the folder
            name = names[0]
        return name

    def _build_model(self) -> PMCClip:
        spec = self.config.model
        model = build_model(spec, self.tokenizer)
        if spec.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(self.device)
        if spec.channels_last:
            model.visual.to(memory_format=torch.channels_last)
        return model

    def _val_data_as_shards(self, data_config: DataConfig) -> DataConfig:
        """--val-data may be a CSV/JSONL table with --image-dir (the original PMC-CLIP's
        evaluation input). Rank 0 shards it once into <run dir>/val_shards with
        make_shards (every row checked, bad ones listed in its skipped.jsonl; a rerun
        finds it done), the other ranks wait, and evaluation streams those shards."""
        table = data_config.val_data
        if table is None or not urlsplit(table).path.lower().endswith(TABLE_SUFFIXES):
            return data_config
        if not data_config.image_dir:
            raise ValueError(
                f"--val-data {storage.redact_url(table)} is a table of image paths and "
                "captions: pass --image-dir with the folder (or images.zip) they are under"
            )
        output = os.path.join(self.run_dir, "val_shards")
        if self.rank == 0:
            make_shards(
                ShardOptions(
                    input=table,
                    images=data_config.image_dir,
                    output=output,
                    prefix="pairs",
                    img_key=data_config.csv_img_key,
                    caption_key=data_config.csv_caption_key,
                    csv_separator=data_config.csv_separator,
                    split="val",
                    shard_size=VAL_TABLE_SHARD_SIZE,
                    workers=min(4, os.cpu_count() or 1),
                )
            )
        distributed.barrier(self.world_size)
        with open(os.path.join(output, "manifest.json")) as f:
            pattern = json.load(f)["splits"]["val"]["pattern"]
        return dataclasses.replace(data_config, val_data=os.path.join(output, pattern))

    def _install_stop_handlers(self) -> None:
        """SLURM sends SIGUSR1 before the time limit (--signal) and SIGTERM on preemption:
        note it and stop at the next step boundary, together with every other rank."""
        self.stop_requested = False

        def request_stop(signum: int, _frame: Any) -> None:
            self.stop_requested = True

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def _check_checkpoint_dir_writable(self) -> None:
        """Rank 0 probes the checkpoint folder at start-up and every rank learns the
        result (all stop alike, none waits in a collective for a rank that left)."""
        problem: list[str | None] = [None]
        if self.rank == 0:
            try:
                checkpoint.probe_writable(self.checkpoint_dir)
            except OSError as e:
                problem[0] = str(e)
        if self.world_size > 1:
            dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise ValueError(
                f"--checkpoint-dir {storage.redact_url(self.checkpoint_dir)} cannot be written "
                f"({problem[0]}): fix the path, the bucket or the credentials"
            )

    def _prepare_run_dir(self) -> None:
        """Rank 0: clear what a killed save left behind, write the resolved config."""
        self.remove_staged_checkpoints()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump(self.config.to_dict(), f, indent=1)

    def remove_staged_checkpoints(self) -> None:
        """Rank 0, the folder's only writer: remove the staged file of a save that was
        killed (at start-up) or interrupted (Ctrl-C, wherever it landed in the save), and
        the local staging files of S3 uploads whose process on this host has ended."""
        if self.rank == 0:
            storage.remove_stale_staging_files(*storage.url_to_fs(self.checkpoint_dir))
            storage.remove_orphaned_uploads()

    # ------------------------------------------------------------------ training

    def fit(self) -> int:
        """Train to the last epoch; return 0, or EXIT_CODE_PREEMPTED after a stop signal.
        A failure on the way raises (`stop_reason` says which are expected: cli)."""
        assert self.train_loader is not None, "built with train=False"
        try:
            for epoch in range(self.epoch, self.config.train.epochs):
                self.epoch = epoch
                if self.train_loader.epoch != epoch:
                    self.train_loader.set_epoch(epoch)
                if not self._train_epoch(self.train_loader):
                    self._save(end_of_epoch=False)
                    self.log.info("stopped on request at step %d; checkpoint saved", self.step)
                    return EXIT_CODE_PREEMPTED
                self._end_of_epoch(epoch)
            return 0
        finally:
            self.scalars.close()

    def evaluate_and_print(self) -> int:
        """`python -m pmc_clip.evaluate`: evaluate, print the results (rank 0) as JSON."""
        try:
            results = self.evaluate()
        finally:
            self.scalars.close()  # ends a --report-to wandb run
        if self.rank == 0:
            print(json.dumps(results, indent=1))
        return 0

    def stop_reason(self, error: Exception) -> str | None:
        """What to log, in one line, when `error` ends a run after start-up (exit code 1),
        or None when it is a bug, whose traceback is the message."""
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
                f"data-loader worker (pid {dead_worker['pids']}) of rank {self.rank} died "
                f"({how}; out of memory? see dmesg). The requeued job resumes from the last "
                "checkpoint"
            )
        if self.world_size > 1:
            # gloo and NCCL report a dead peer, a broken link or a collective that timed
            # out (--dist-timeout-seconds) as RuntimeError/DistError from the collective.
            return (
                "a collective with the other ranks failed (a rank died, the network broke, or "
                "a rank hung for --dist-timeout-seconds). The requeued job resumes from the "
                f"last checkpoint. Cause: {cause}"
            )
        return None  # no peers: a bug

    def _end_of_epoch(self, epoch: int) -> None:
        last = epoch + 1 == self.config.train.epochs
        val_every, save_every = (
            self.config.eval.val_frequency,
            self.config.checkpoint.save_frequency,
        )
        # Saved first: an evaluation that fails (bad val data) must not cost the epoch.
        if last or (save_every and (epoch + 1) % save_every == 0):
            self.epoch = epoch + 1  # the next epoch to run, as a resume should see it
            self._save(end_of_epoch=True)
        if self.val_loader is not None and (last or (val_every and (epoch + 1) % val_every == 0)):
            self.evaluate()

    def _train_epoch(self, loader: TrainLoader) -> bool:
        """One epoch from the loader's position. False if a stop was requested."""
        window = _Window(self.device)
        for group in self._micro_batch_groups(loader):
            result = self._step(group)
            window.add(result, sum(len(b["keys"]) for b in group))
            if self.step % self.config.log.log_every_n_steps == 0:
                self._log_window(window, result, loader)
                window = _Window(self.device)
            if result.stop_requested:
                return False
            every_n = self.config.checkpoint.save_every_n_steps
            if result.save_due_by_time or (every_n and self.step % every_n == 0):
                self._save(end_of_epoch=False)
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
        lr = optim.lr_at_step(self.step, self.config.optim, self.total_steps)
        optim.set_lr(self.optimizer, lr)
        loss_sums: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(group):
            is_last = index == len(group) - 1
            # Gradients are all-reduced only in the last micro-batch's backward.
            defer_sync = not is_last and self.world_size > 1
            with self.ddp_model.no_sync() if defer_sync else contextlib.nullcontext():
                with evaluate.autocast_context(self.device, spec.precision):
                    outputs = self.forward_model(*self._model_inputs(batch))
                    mlm_labels = batch.get("mlm_labels")
                    if mlm_labels is not None:
                        mlm_labels = mlm_labels.to(self.device, non_blocking=True)
                    losses = self.loss_fn(outputs, mlm_labels)
                self.scaler.scale(losses["loss"] / len(group)).backward()
            for name, value in losses.items():
                loss_sums[name] = loss_sums.get(name, 0) + value.detach() / len(group)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.optim.grad_clip_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # One collective and one host sync per step: every rank learns whether any rank
        # saw a non-finite loss, was asked to stop, or (rank 0's clock) is due to save.
        loss_nonfinite = ~torch.isfinite(loss_sums["loss"])
        grad_nonfinite = ~torch.isfinite(grad_norm) & (spec.precision != "amp")
        local_flags = [self.stop_requested, self._save_due_by_time()]
        flags = torch.cat(
            [
                (loss_nonfinite | grad_nonfinite).view(1),
                torch.tensor(local_flags, device=self.device),
            ]
        ).float()
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop_now, save_due = (bool(v) for v in flags.tolist())
        if spec.precision == "amp":
            self.scaler.step(self.optimizer)  # skips steps whose gradients overflowed
            self.scaler.update()
        elif not nonfinite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step += 1  # steps are counted 1-based in logs, metrics and checkpoint names
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
        self.num_nonfinite_total += 1
        self.log.warning(
            "step %d: non-finite loss or gradient on some rank; step skipped (%d in a row)",
            self.step,
            self.num_nonfinite_in_a_row,
        )
        limit = self.config.train.max_consecutive_nonfinite
        if self.num_nonfinite_in_a_row >= limit:
            # Skipped steps never touched the weights: this is the last good state.
            path = self._save(end_of_epoch=False)
            raise TrainingStopped(
                f"{limit} non-finite steps in a row at step {self.step}: stopping. The last "
                f"good weights are in {storage.redact_url(path)}. Lower --lr, set "
                "--grad-clip-norm, or check the data for broken samples"
            )

    # ------------------------------------------------------------------ logging

    def _log_window(self, window: _Window, result: StepResult, loader: TrainLoader) -> None:
        means = window.mean(self.world_size)  # a collective: every rank calls it
        if self.rank != 0:
            return
        seconds = window.seconds()
        meter = loader.meter.snapshot()
        loader.meter.reset()
        global_rate = window.num_samples * self.world_size / seconds
        scalars = {
            **{f"train/{name}": value for name, value in means.items()},
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/logit_scale": float(self.model.logit_scale.detach().exp()),
            "train/grad_norm": float(result.grad_norm),
            "train/nonfinite_steps": float(self.num_nonfinite_total),
            "perf/samples_per_second": global_rate,
            "perf/samples_per_second_per_device": global_rate / self.world_size,
            "perf/step_seconds": seconds / window.num_steps,
            "perf/memory_gb": _memory_gb(self.device),
            **{f"perf/{k.split('/', 1)[1]}": v for k, v in meter.items()},
        }
        self.scalars.write(self.step, scalars)
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": self.epoch, "step": self.step, **scalars}) + "\n")
        self.log.info(
            "epoch %d step %d/%d | %s",
            self.epoch,
            self.step,
            self.total_steps,
            metrics.format_scalars({k: scalars[k] for k in _CONSOLE_KEYS if k in scalars}),
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Retrieval on the val shards (all ranks), zero-shot on rank 0; logged."""
        self._use_rank0_buffers()
        results: dict[str, float] = {}
        if self.val_loader is not None:
            test_2000_seed = self.config.eval.test_2000_seed if self.config.eval.test_2000 else None
            results.update(
                evaluate.evaluate_retrieval(
                    self.model,
                    self.val_loader,
                    self.device,
                    self.config.model.precision,
                    self.rank,
                    self.world_size,
                    self.config.eval.similarity_chunk_size,
                    test_2000_seed,
                )
            )
        if self.config.eval.zeroshot_data and self.rank == 0:
            zero_shot = evaluate.zero_shot_classification(
                self.model,
                self.tokenizer,
                self.config.eval.zeroshot_data,
                self.device,
                self.config.model.precision,
                preprocess=self.config.data.eval_preprocess,
            )
            results.update({f"zeroshot_{k}": v for k, v in zero_shot.items()})
        if self.rank == 0 and results:
            self.scalars.write(self.step, {f"val/{k}": v for k, v in results.items()})
            self.log.info("eval at step %d: %s", self.step, json.dumps(results))
            with open(os.path.join(self.run_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": self.epoch, "step": self.step, **results}) + "\n")
        distributed.barrier(self.world_size)
        return results

    def _use_rank0_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics) before it embeds
        its share of the val set. They drift apart in training (DDP runs with
        broadcast_buffers=False) and a checkpoint keeps rank 0's, so without this the
        evaluation mixes ranks' statistics and differs from evaluating the checkpoint.
        Training does not read them (BatchNorm in train mode uses the batch's statistics)."""
        if self.world_size == 1:
            return
        for buffer in self.model.buffers():
            dist.broadcast(buffer, src=0)

    # ------------------------------------------------------------------ checkpoints

    def _save_due_by_time(self) -> bool:
        minutes = self.config.checkpoint.save_every_minutes
        # Rank 0's clock decides; the step's flag all-reduce tells the others.
        return (
            bool(minutes)
            and self.rank == 0
            and (time.monotonic() - self.last_save_time >= minutes * 60)
        )

    def _save(self, end_of_epoch: bool) -> str:
        """Every rank calls this at the same step (it has collectives); rank 0 writes.
        Returns the checkpoint's URL. A failed write stops every rank alike."""
        rng_states = self._gather_rng_states()
        name = checkpoint.checkpoint_name(self.epoch, self.step, end_of_epoch)
        url = f"{self.checkpoint_dir}/{name}"
        error = ""
        if self.rank == 0:
            try:
                url = checkpoint.save_checkpoint(
                    self.checkpoint_dir,
                    name,
                    self._state_dict(rng_states),
                    self.config.checkpoint.keep_last,
                )
                self.log.info("saved checkpoint %s", storage.redact_url(url))
            except OSError as e:
                error = str(e)
        if distributed.any_rank(bool(error), self.device, self.world_size):
            # The requeued job resumes from the previous checkpoint, which is intact.
            raise TrainingStopped(error or "rank 0 could not write a checkpoint (see its log)")
        self.last_save_time = time.monotonic()
        return url

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        """Every rank's generators (dropout differs per rank), indexed by rank."""
        states: list[Any] = [_rng_state()]
        if self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, _rng_state())
        return states

    def _state_dict(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": checkpoint.CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "data": self.train_loader.state_dict() if self.train_loader else None,
            "nonfinite_steps": self.num_nonfinite_total,
            "config": self.config.to_dict(),
            "rng": rng_states,
            "tokenizer": self.tokenizer_identity,
        }

    def _resume(self) -> None:
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
        path = checkpoint.resolve_latest(self.checkpoint_dir) if target == "latest" else target
        if path is None:
            self.log.info(
                "--resume latest: no checkpoint in %s yet, starting fresh",
                storage.redact_url(self.checkpoint_dir),
            )
            return
        where = storage.redact_url(path)
        state = checkpoint.load_checkpoint(path)
        self._load_weights(where, state["model"], state["config"]["model"])
        self._check_same_tokenizer(where, state.get("tokenizer"))
        if self.train_loader is None:
            self.log.info("loaded weights from %s (step %d)", where, state["step"])
            return
        try:
            self._restore_training_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            # load_checkpoint checked the structure; this is state that fits no run of
            # this model and data (a hand-edited or foreign file), or other data flags.
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise ValueError(f"cannot continue from checkpoint {where}: {reason}") from None
        self.log.info("resumed from %s at epoch %d step %d", where, self.epoch, self.step)

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

    def _restore_training_state(self, state: dict[str, Any]) -> None:
        assert self.train_loader is not None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.num_nonfinite_total = state["nonfinite_steps"]
        data_state = state["data"]
        if data_state["epoch"] == self.epoch:
            # Stopped inside this epoch (or after its last step, before its end-of-epoch
            # evaluation and save): continue the stream exactly there.
            self.train_loader.load_state_dict(data_state)
        if len(state["rng"]) == self.world_size:
            _set_rng_state(state["rng"][self.rank])
            self.rng_restored = True
        else:
            self.log.warning(
                "checkpoint saved by %d ranks, resumed on %d: random streams (dropout) "
                "start afresh",
                len(state["rng"]),
                self.world_size,
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


_CONSOLE_KEYS = (
    "train/loss",
    "train/contrastive_loss",
    "train/mlm_loss",
    "train/lr",
    "train/logit_scale",
    "perf/samples_per_second",
    "perf/wait_fraction",
)


class _Window:
    """Loss sums and counts between two log lines, kept on the device (no host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.num_steps = 0
        self.num_samples = 0
        self.start = time.perf_counter()

    def add(self, result: StepResult, num_samples: int) -> None:
        for name, value in result.losses.items():
            self.sums[name] = self.sums.get(name, torch.zeros((), device=self.device)) + value
        self.num_steps += 1
        self.num_samples += num_samples

    def mean(self, world_size: int) -> dict[str, float]:
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names]) / max(self.num_steps, 1)
        averaged = distributed.all_reduce_mean(stacked, world_size)
        return dict(zip(names, averaged.tolist(), strict=True))

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


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


def cli(
    start: Callable[[list[str]], Trainer],
    work: Callable[[Trainer], int],
    argv: list[str],
    prog: str,
) -> int:
    """Run an entry point: `start` parses the command line and builds the Trainer (the
    start-up checks), `work` trains or evaluates. Exit codes, each failure one line:
    2 a user error found at start-up (ValueError); 1 a storage failure (StorageError,
    named by its redacted URL) or anything found after start-up (`Trainer.stop_reason`:
    data errors, a dead data-loader worker or peer, a checkpoint that cannot be written;
    a requeue may retry it); 130 Ctrl-C. Lines printed or logged go through the secret
    filter installed first (metrics.install_secret_filter)."""
    metrics.install_secret_filter(argv)
    trainer: Trainer | None = None
    try:
        trainer = start(argv)
        return work(trainer)
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches every process of its group: data-loader workers end
        # quietly (torch's worker loop expects it), this process says so here, once.
        step = ""
        if trainer is not None:
            trainer.remove_staged_checkpoints()
            step = f" at step {trainer.step}"
        _print_line(f"{prog}: interrupted (Ctrl-C){step}; the checkpoints so far are kept")
        return EXIT_CODE_INTERRUPTED
    except (ValueError, RuntimeError, storage.StorageError) as e:
        if trainer is None:
            if isinstance(e, RuntimeError):
                raise  # a bug at start-up: its traceback is the message
            # User errors are caught at start-up, before any step: say what to change.
            _print_line(f"{prog}: error: {e}")
            return 2 if isinstance(e, ValueError) else 1
        reason = trainer.stop_reason(e)
        if reason is None:
            raise
        stage = "the evaluation" if trainer.train_loader is None else f"at step {trainer.step}"
        trainer.log.error("stopping %s: %s", stage, reason)
        trainer.log.debug("stopped by", exc_info=True)
        return 1
    finally:
        distributed.shutdown()


def _print_line(line: str) -> None:
    print(metrics.mask_secrets(line), file=sys.stderr)


def start_training(argv: list[str]) -> Trainer:
    return Trainer(parse_run_config(argv, "Pretrain PMC-CLIP."))


def start_evaluation(argv: list[str]) -> Trainer:
    """`python -m pmc_clip.evaluate`: the training flags, --resume naming the weights."""
    config = parse_run_config(argv, "Evaluate a PMC-CLIP checkpoint.")
    if config.checkpoint.resume is None:
        raise ValueError("--resume CHECKPOINT (or PMC_CLIP:beta) is required")
    return Trainer(config, train=False)

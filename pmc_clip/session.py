"""A Session: what training and evaluation both build from a RunConfig, and evaluation.

Reads top to bottom: `Session.__init__` builds the device and process group, the run
folder and logging, the tokenizer and model, the val data, then resumes (`--resume`:
weights, and for training every resumable piece: see checkpointer.py) and opens the
metric writers. A Session itself is an evaluation-only run (`python -m pmc_clip.evaluate`):
no optimizer, no train data, the bare model (no DDP wrapper). The Trainer (trainer.py) is
a Session that also builds its training pieces (`_build_training`) and wraps the model for
training (`_wrap_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from pmc_clip import checkpoint, checkpointer, distributed, evaluator, metrics
from pmc_clip.api import build_model, build_tokenizer, tokenizer_identity
from pmc_clip.checkpointer import Checkpointer, TrainingState, TrainProgress
from pmc_clip.config import RELEASED_CHECKPOINT, DataConfig, RunConfig
from pmc_clip.data.loaders import EvalLoader, build_eval_loader
from pmc_clip.data.val_tables import shard_val_table
from pmc_clip.model import PMCClip

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EVAL_SEED = 0


class Session:
    # Whether this kind of run trains: it then checks at start-up that checkpoints can
    # be written.
    trains: ClassVar[bool] = False

    def __init__(self, config: RunConfig, info: distributed.DistInfo | None = None) -> None:
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
            self.info,
            self.device,
            backend=config.dist.dist_backend,
            timeout_seconds=config.dist.dist_timeout_seconds,
        )
        self.run_dir = os.path.join(config.log.logs, self._run_name())
        self.log = metrics.setup_logging(self.run_dir, self.rank)
        checkpoint_dir = config.checkpoint.checkpoint_dir or os.path.join(
            self.run_dir, "checkpoints"
        )
        if self.trains:
            checkpointer.check_writable(checkpoint_dir, rank=self.rank, world_size=self.world_size)
        self._install_stop_handlers()

        # Same seed everywhere for the initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(config.train.seed)
        self.tokenizer = build_tokenizer(config.model)
        self.tokenizer_identity = tokenizer_identity(self.tokenizer)
        self.model = self._build_model()
        # The model decides the input resolution; the pipeline follows it. The loader ships
        # uint8 pixels (4x fewer bytes through shared memory and PCIe than float32) and
        # the model's inputs are normalised on the device.
        data_config = dataclasses.replace(config.data, image_size=self.model.config.image_size)
        self.progress = TrainProgress()
        training = self._build_training(data_config)
        self.val_loader = self._build_val_loader(data_config)
        self.checkpointer = Checkpointer(
            config,
            directory=checkpoint_dir,
            model=self.model,
            tokenizer_identity=self.tokenizer_identity,
            progress=self.progress,
            training=training,
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            log=self.log,
        )
        self.checkpointer.resume()
        if training is None or not training.rng.restored:
            # Per-rank randomness (dropout) differs between ranks, after the shared init.
            torch.manual_seed(config.train.seed * 1000 + self.rank)
        self._wrap_model()
        report_to = config.log.report_to if self.rank == 0 else ()
        self.records = metrics.RunRecords(
            self.run_dir,
            metrics.ScalarWriter(
                os.path.join(self.run_dir, "tensorboard") if "tensorboard" in report_to else None,
                metrics.start_wandb_run(
                    self.run_dir,
                    name=os.path.basename(self.run_dir),
                    project=config.log.wandb_project,
                    config=config.to_dict(),
                )
                if "wandb" in report_to
                else None,
            ),
            self.log,
        )
        self._prepare_run_dir()
        self.log.info(
            "world size %d (%s launcher), device %s, %s",
            self.world_size,
            self.info.launcher,
            self.device,
            self._describe(),
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

    def _build_training(self, data_config: DataConfig) -> TrainingState | None:
        """The training pieces (optimizer, scaler, train loader, ...): none to evaluate."""
        return None

    def _build_val_loader(self, data_config: DataConfig) -> EvalLoader | None:
        data_config = shard_val_table(
            data_config, work_dir=self.run_dir, rank=self.rank, world_size=self.world_size
        )
        if not self.config.data.val_data:
            return None
        # A fixed seed for the val masks: MLM accuracy compares across runs and seeds.
        val_loader = build_eval_loader(
            data_config, self.tokenizer, rank=self.rank, world_size=self.world_size, seed=EVAL_SEED
        )
        num_pairs = val_loader.num_samples  # from the manifest (or --val-num-samples)
        if self.config.eval.test_2000 and num_pairs < evaluator.TEST_2000_PAIRS:
            raise ValueError(
                f"--test-2000 needs at least {evaluator.TEST_2000_PAIRS} val pairs; "
                f"--val-data has {num_pairs}: drop --test-2000 or give a larger val set"
            )
        return val_loader

    def _wrap_model(self) -> None:
        """Evaluation embeds with the bare model (see evaluator.embed): nothing to wrap."""

    def _describe(self) -> str:
        """The rest of the start-up log line."""
        return f"0 steps per epoch, {self.config.train.epochs} epochs, 0 samples per epoch"

    def _install_stop_handlers(self) -> None:
        """SLURM sends SIGUSR1 before the time limit (--signal) and SIGTERM on preemption:
        note it and stop at the next step boundary, together with every other rank."""
        self.stop_requested = False

        def request_stop(signum: int, _frame: Any) -> None:
            self.stop_requested = True

        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def _prepare_run_dir(self) -> None:
        """Rank 0: clear what a killed save left behind, write the resolved config."""
        self.checkpointer.remove_staged()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump(self.config.to_dict(), f, indent=1)

    def stage(self) -> str:
        """Where a run that stops on an error was, for its one-line message."""
        return "the evaluation"

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Retrieval on the val shards (all ranks), zero-shot on rank 0; logged."""
        self._use_rank0_buffers()
        results: dict[str, float] = {}
        if self.val_loader is not None:
            test_2000_seed = self.config.eval.test_2000_seed if self.config.eval.test_2000 else None
            results.update(
                evaluator.evaluate_retrieval(
                    self.model,
                    self.val_loader,
                    device=self.device,
                    precision=self.config.model.precision,
                    rank=self.rank,
                    world_size=self.world_size,
                    chunk_size=self.config.eval.similarity_chunk_size,
                    test_2000_seed=test_2000_seed,
                )
            )
        if self.config.eval.zeroshot_data and self.rank == 0:
            zero_shot = evaluator.zero_shot_classification(
                self.model,
                self.tokenizer,
                root=self.config.eval.zeroshot_data,
                device=self.device,
                precision=self.config.model.precision,
                preprocess=self.config.data.eval_preprocess,
            )
            results.update({f"zeroshot_{k}": v for k, v in zero_shot.items()})
        if self.rank == 0 and results:
            self.records.evaluation(results, epoch=self.progress.epoch, step=self.progress.step)
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

"""Training under faults: a rank or a data-loader worker killed or hung, kill -9
mid-checkpoint, Ctrl-C, NaN, disk full, data errors found mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_port
from helpers_train import (
    DEADLINE_SECONDS,
    build_train_data,
    metrics_by_step,
    run,
    train_args,
    train_command,
)

from pmc_clip import checkpoint, entry, evaluate
from pmc_clip.checkpointer import TrainingStopped
from pmc_clip.config import parse_run_config
from pmc_clip.entry import EXIT_CODE_INTERRUPTED
from pmc_clip.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_train_data(tmp_path_factory.mktemp("fault-data"))


def _wait_for_steps(run_dir: Path, num_steps: int, procs: list[subprocess.Popen[str]]) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= num_steps):
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training did not reach the step in time"
        time.sleep(0.02)


def _two_ranks_at_step_3(
    data: dict[str, str], tmp_path: Path, timeout_seconds: int
) -> list[subprocess.Popen[str]]:
    """A long 2-rank run (logs in tmp_path/job) that has done 3 steps."""
    args = train_args(
        data, tmp_path, "job", "--epochs", "50", "--dist-timeout-seconds", str(timeout_seconds)
    )
    procs = _start_ranks(args, world_size=2)
    try:
        _wait_for_steps(tmp_path / "job", 3, procs)
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.communicate()
        raise
    return procs


def _start_ranks(args: list[str], world_size: int) -> list[subprocess.Popen[str]]:
    """One process per rank, started the way launch/pretrain_8node.sh's srun tasks are."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        procs.append(
            subprocess.Popen(
                train_command(*args),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill -9", "hang"])
def test_a_dead_or_hung_rank_stops_the_others_with_a_clear_error(
    data: dict[str, str], tmp_path: Path, fault: str
) -> None:
    timeout_seconds = 8
    procs = _two_ranks_at_step_3(data, tmp_path, timeout_seconds)
    try:
        procs[1].send_signal(signal.SIGKILL if fault == "kill -9" else signal.SIGSTOP)
        faulted = time.monotonic()
        output, _ = procs[0].communicate(timeout=DEADLINE_SECONDS)
        waited = time.monotonic() - faulted
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs[0].returncode == 1, output[-3000:]
    # Bounded by --dist-timeout-seconds (plus a step), not NCCL's default 30 minutes.
    assert waited < timeout_seconds + 30, waited
    assert "a collective with the other ranks failed" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(
    data: dict[str, str], tmp_path: Path
) -> None:
    args = train_args(
        data,
        tmp_path,
        "job",
        "--epochs",
        "2",
        "--save-every-n-steps",
        "1",
        "--keep-last",
        "2",
        "--resume",
        "latest",
    )
    checkpoints = tmp_path / "job" / "checkpoints"
    proc = subprocess.Popen(
        train_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        # Once a checkpoint exists, kill the moment the next one is half-written.
        while not ((checkpoints / "latest.json").exists() and any(checkpoints.glob(".tmp-step_*"))):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    latest = checkpoint.resolve_latest(str(checkpoints))
    assert latest is not None
    state = checkpoint.load_checkpoint(latest)  # complete and matching its sha256
    assert state["step"] >= 1
    result = run(train_command(*args))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {latest} at epoch" in (tmp_path / "job" / "out.log").read_text()
    assert not list(checkpoints.glob(".tmp-*"))
    assert max(metrics_by_step(tmp_path / "job")) == 2 * 16


@pytest.fixture()
def in_process(data: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """Build Trainers in this process (so a test can reach into the loss); the handlers
    the Trainer installs for SIGTERM/SIGUSR1 are put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def build(name: str, *extra: str) -> Trainer:
        args = train_args(data, tmp_path, name, "--epochs", "1", *extra)
        return Trainer(parse_run_config(args))

    yield build
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _instrument(trainer: Trainer, nan_steps: set[int]) -> dict[int, float]:
    """Make the loss NaN at `nan_steps` (1-based); return a parameter checksum per step."""
    real_loss, real_step = trainer.loss_fn, trainer._step
    checksums: dict[int, float] = {0: _checksum(trainer)}

    def loss_fn(outputs: dict[str, torch.Tensor], mlm_labels: Any) -> dict[str, torch.Tensor]:
        losses = real_loss(outputs, mlm_labels)
        if trainer.progress.step + 1 in nan_steps:  # the step being computed
            return {name: value * float("nan") for name, value in losses.items()}
        return losses

    def step(group: list[dict[str, Any]]) -> Any:
        result = real_step(group)
        checksums[trainer.progress.step] = _checksum(trainer)
        return result

    trainer.loss_fn = loss_fn  # type: ignore[assignment]
    trainer._step = step  # type: ignore[method-assign]
    return checksums


def _checksum(trainer: Trainer) -> float:
    return float(sum(p.detach().double().sum() for p in trainer.model.parameters()))


def test_nan_loss_steps_are_skipped_and_counted(in_process: Any, tmp_path: Path) -> None:
    trainer = in_process("nan")
    checksums = _instrument(trainer, nan_steps={3, 4})
    assert trainer.fit() == 0
    assert checksums[3] == checksums[4] == checksums[2]  # skipped: weights untouched
    assert checksums[5] != checksums[4]  # and training goes on
    metrics = metrics_by_step(tmp_path / "nan")
    assert metrics[2]["train/nonfinite_steps"] == 0 and metrics[16]["train/nonfinite_steps"] == 2
    assert all(metrics[s]["train/loss"] == metrics[s]["train/loss"] for s in (2, 5, 16))


def test_too_many_nan_steps_stop_with_the_last_good_weights(
    in_process: Any, tmp_path: Path
) -> None:
    trainer = in_process("nan-stop", "--max-consecutive-nonfinite", "3")
    checksums = _instrument(trainer, nan_steps=set(range(5, 100)))
    with pytest.raises(TrainingStopped) as stopped:
        trainer.fit()
    assert "3 non-finite steps in a row at step 7: stopping" in str(stopped.value)
    # cli: logged, exit 1
    assert entry.stop_reason(stopped.value, rank=0, world_size=1) == str(stopped.value)
    latest = checkpoint.resolve_latest(str(tmp_path / "nan-stop" / "checkpoints"))
    assert latest is not None and latest.endswith("step_7.pt")
    saved = checkpoint.load_checkpoint(latest)
    trainer.model.load_state_dict(saved["model"])
    assert _checksum(trainer) == checksums[4]  # the weights after the last good step


def test_disk_full_on_the_checkpoint_path_stops_cleanly(in_process: Any, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    full = tmp_path / "small-disk"
    full.mkdir()
    trainer = in_process("full", "--checkpoint-dir", str(full), "--save-every-n-steps", "2")
    # Before the first step the optimizer holds no state; AdamW's two moments then add
    # twice the weights: a checkpoint is ~3x this. Room for one (and its json), not two.
    weights_only_size = io_size(trainer)
    size_kib = int(weights_only_size * 4.5) // 1024
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(full)], check=True
    )
    try:
        with pytest.raises(TrainingStopped) as stopped:
            trainer.fit()
        assert "could not write checkpoint" in str(stopped.value)
        assert "No space left on device" in str(stopped.value)
        assert checkpoint.resolve_latest(str(full)) == f"{full}/step_2.pt"
        assert checkpoint.load_checkpoint(f"{full}/step_2.pt")["step"] == 2
        assert sorted(os.listdir(full)) == ["latest.json", "step_2.pt", "step_2.pt.json"]
    finally:
        subprocess.run(["umount", str(full)], check=True)


def io_size(trainer: Trainer) -> int:
    import io

    buffer = io.BytesIO()
    torch.save(trainer.checkpointer.state_dict(), buffer)
    return buffer.tell()


def test_gradient_accumulation_steps_once_per_group(in_process: Any, tmp_path: Path) -> None:
    trainer = in_process("accum", "--accum-freq", "3")
    checksums = _instrument(trainer, nan_steps=set())
    assert trainer.fit() == 0
    # 16 batches per epoch in groups of 3: 5 full groups and one of 1, 6 optimizer steps.
    assert sorted(metrics_by_step(tmp_path / "accum")) == [1, 2, 3, 4, 5, 6]
    assert len(set(checksums.values())) == 7  # every step moved the weights


def test_a_data_error_found_mid_run_exits_1_in_one_line(
    data: dict[str, str], tmp_path: Path
) -> None:
    """A shard rewritten after it was indexed is found when its samples are read, after
    training started: one log line naming it, exit 1 (2 is for the command line)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    source = Path(data["train"]).parent
    for path in source.iterdir():
        if path.is_file():
            (shards / path.name).write_bytes(path.read_bytes())
    shard = shards / "pmc-oa-train-000005.tar"
    shard.write_bytes(shard.read_bytes().replace(b"0000444", b"0000400", 1))  # a header
    changed = {**data, "train": str(shards / Path(data["train"]).name)}
    result = run(train_command(*train_args(changed, tmp_path, "changed", "--epochs", "1")))
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "000005.tar" in line]
    assert len(lines) == 1 and "stopping at step" in lines[0] and "index_shards" in lines[0]
    assert "Traceback" not in result.stderr


def test_an_evaluation_error_after_an_epoch_keeps_that_epochs_checkpoint(
    data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The epoch's checkpoint is saved before its evaluation: val data that fails there
    (val shards that are garbage by now, though their indexes passed the start-up checks:
    no val pair left) costs the evaluation, not the epoch."""
    broken = shutil.copytree(Path(data["val"]).parent, tmp_path / "broken")
    for shard in broken.glob("pmc-oa-valid-*.tar"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    garbage = {**data, "val": str(broken / Path(data["val"]).name)}
    result = run(train_command(*train_args(garbage, tmp_path, "bad", "--epochs", "1")))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "got no val pairs" in result.stderr and "Traceback" not in result.stderr
    latest = json.loads((tmp_path / "bad" / "checkpoints" / "latest.json").read_text())
    assert latest["name"] == "epoch_1.pt"
    # `python -m pmc_clip.evaluate` finds it mid-evaluation too: exit 1 (it was 2, which
    # is for the command line), one line.
    resume = str(tmp_path / "bad" / "checkpoints" / "epoch_1.pt")
    assert evaluate.main(train_args(garbage, tmp_path, "bad-eval", "--resume", resume)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert errors[0].endswith("stopping the evaluation: retrieval evaluation got no val pairs")
    # What can be checked before training is: --test-2000 with 16 val pairs.
    early = run(train_command(*train_args(data, tmp_path, "t2000", "--test-2000")))
    assert early.returncode == 2
    assert "--test-2000 needs at least 2000 val pairs; --val-data has 16" in early.stderr
    assert not (tmp_path / "t2000" / "metrics.jsonl").exists()


def test_a_checkpoint_dir_that_cannot_be_written_is_found_at_start_up(
    data: dict[str, str], tmp_path: Path, s3_bucket: str
) -> None:
    """A missing bucket: one line naming the folder before any step, not at the first
    save an epoch into the run."""
    missing = "s3://no-such-bucket-for-checkpoints/run"
    args = train_args(data, tmp_path, "nowrite", "--checkpoint-dir", missing)
    result = run(train_command(*args))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"--checkpoint-dir {missing} cannot be written" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "nowrite" / "metrics.jsonl").exists()


def _data_loader_workers(rank_pid: int) -> list[int]:
    """A rank's data-loader workers: the children forked from it (the same command line;
    multiprocessing's helper processes run another)."""
    command = Path(f"/proc/{rank_pid}/cmdline").read_bytes()
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == rank_pid and (stat.parent / "cmdline").read_bytes() == command:
                workers.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # a process that ended while listed
    return workers


@pytest.mark.slow
def test_a_killed_data_loader_worker_is_named_and_every_rank_stops(
    data: dict[str, str], tmp_path: Path
) -> None:
    """kill -9 of one of rank 1's workers: rank 1 names the worker and itself, rank 0
    reports that a peer stopped; both exit 1 (without the fix: rank 1 ended in a
    traceback, or blamed the other ranks)."""
    timeout_seconds = 8
    procs = _two_ranks_at_step_3(data, tmp_path, timeout_seconds)
    try:
        workers = _data_loader_workers(procs[1].pid)
        assert len(workers) == 1, workers  # --workers 1
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        outputs = [proc.communicate(timeout=DEADLINE_SECONDS)[0] for proc in procs]
        waited = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [1, 1], outputs[1][-3000:]
    assert waited < timeout_seconds + 30, waited
    errors = [line for line in outputs[1].splitlines() if " ERROR " in line]
    assert len(errors) == 1, outputs[1][-3000:]
    assert (
        "[rank 1] ERROR stopping at step " in errors[0]
        and f"data-loader worker (pid {workers[0]}) of rank 1 died (is killed by signal: Killed"
        in errors[0]
    ), errors[0]
    assert "a collective with the other ranks failed" in outputs[0]
    assert "Traceback" not in outputs[0] + outputs[1]


@pytest.mark.slow
def test_ctrl_c_exits_quietly_with_130_and_leaves_no_staged_checkpoint(
    data: dict[str, str], tmp_path: Path
) -> None:
    """SIGINT to the whole process group (a terminal's Ctrl-C: the data-loader workers get
    it too) while a checkpoint is being written: one line, exit 130, no traceback from
    any process, no staged file; latest.json names a complete checkpoint."""
    args = train_args(data, tmp_path, "job", "--epochs", "50", "--save-every-n-steps", "1")
    proc = subprocess.Popen(
        train_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    checkpoints = tmp_path / "job" / "checkpoints"
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        while not ((checkpoints / "latest.json").exists() and any(checkpoints.glob(".tmp-*"))):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=DEADLINE_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_CODE_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    interrupted = [line for line in err.splitlines() if "interrupted" in line]
    assert len(interrupted) == 1 and interrupted[0].startswith(
        "pmc_clip.train: interrupted (Ctrl-C) at step "
    )
    assert not list(checkpoints.glob(".tmp-*"))
    latest = checkpoint.resolve_latest(str(checkpoints))
    assert latest is not None and checkpoint.load_checkpoint(latest)["step"] >= 1

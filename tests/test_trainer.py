"""Trainer, checkpoints, evaluation and launch plumbing: real processes, real gloo, real S3."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import free_port
from helpers_data import killed_process_owner
from helpers_train import (
    DEADLINE_SECONDS,
    REPO,
    build_train_data,
    metrics_by_step,
    run,
    train_args,
    train_command,
)

from pmc_clip import checkpoint, distributed
from pmc_clip.config import parse_run_config
from pmc_clip.evaluator import Embeddings, macro_auc, retrieval_metrics, select_test_2000
from pmc_clip.optim import lr_at_step


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_train_data(tmp_path_factory.mktemp("train-data"))


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # `--` ends torchrun's own options: it would take --logs for its --logs-specs.
    port = str(free_port())
    return run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master-port",
            port,
            "-m",
            "pmc_clip.train",
            "--",
            *args,
        ]
    )


@pytest.mark.slow
def test_two_process_training_learns_and_resumes_bit_identically(
    data: dict[str, str], tmp_path: Path
) -> None:
    straight = _torchrun(
        train_args(data, tmp_path, "straight", "--save-every-n-steps", "3", "--keep-last", "10")
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "straight"
    log = (run_dir / "out.log").read_text()
    assert "world size 2 (torchrun launcher)" in log
    losses = metrics_by_step(run_dir)
    assert sorted(losses) == list(range(1, 17))  # 64 samples / (4 x 2 ranks) x 2 epochs
    first, last = losses[1]["train/loss"], np.mean([losses[s]["train/loss"] for s in (14, 15, 16)])
    assert last < 0.8 * first, (first, last)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [8, 16] and evals[-1]["num_pairs"] == 16
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["name"] == "epoch_2.pt"
    # launch/eval.sh (python -m pmc_clip.evaluate) on the last checkpoint reproduces the
    # trainer's own final evaluation: same weights, same val shards, centre crops.
    env = {
        **os.environ,
        "CHECKPOINT": str(run_dir / "checkpoints"),
        "VAL_DATA": data["val"],
        "MODEL": "tiny",
        "TEXT_ENCODER": "",
        "TOKENIZER": data["tokenizer"],
        "BATCH_SIZE": "5",
        "WORKERS": "1",
        "LOGS_DIR": str(tmp_path),
        "PMC_CLIP_DEVICE": "cpu",
        "PMC_CLIP_PYTHON": sys.executable,
    }
    evaluated = run(["bash", str(REPO / "launch" / "eval.sh"), "--mlm", "--report-to"], env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    printed = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    # Other batch sizes and one rank instead of two: float noise may reorder a near-tie
    # (the generated captions repeat), so allow one pair (100/16 %) per recall.
    assert printed["num_pairs"] == 16
    for name in (
        "image_to_text_R@1",
        "image_to_text_R@5",
        "text_to_image_R@1",
        "text_to_image_R@10",
    ):
        assert abs(printed[name] - evals[-1][name]) <= 100 / 16 + 1e-6, name
    assert abs(printed["mlm_accuracy"] - evals[-1]["mlm_accuracy"]) < 5
    without_mlm = run(["bash", str(REPO / "launch" / "eval.sh"), "--report-to"], env=env)
    assert without_mlm.returncode == 2 and "pass the same flags" in without_mlm.stderr

    resumed = _torchrun(
        train_args(data, tmp_path, "resumed", "--resume", f"{run_dir}/checkpoints/step_6.pt")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = metrics_by_step(tmp_path / "resumed")
    assert sorted(again) == list(range(7, 17))  # the step count continues
    for step in again:
        for name in ("train/loss", "train/contrastive_loss", "train/mlm_loss", "train/lr"):
            assert again[step][name] == pytest.approx(losses[step][name], rel=1e-6, abs=1e-9), (
                step,
                name,
            )


@pytest.mark.slow
def test_a_two_rank_checkpoint_mid_epoch_resumes_on_one_rank(
    data: dict[str, str], tmp_path: Path
) -> None:
    """Requeued on fewer ranks: the 2-rank run's step-3 checkpoint (24 of epoch 0's 64
    samples consumed) continues on one rank with the rest of that epoch, 40 samples in 10
    steps of 4, then a whole epoch of 16."""
    straight = _torchrun(
        train_args(data, tmp_path, "two", "--save-every-n-steps", "3", "--epochs", "1")
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint_path = tmp_path / "two" / "checkpoints" / "step_3.pt"
    resumed = run(
        train_command(*train_args(data, tmp_path, "one", "--resume", str(checkpoint_path)))
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / "one" / "out.log").read_text()
    assert "world size 1" in log and "saved by 2 ranks, resumed on 1" in log
    steps = sorted(metrics_by_step(tmp_path / "one"))
    assert steps == list(range(4, 4 + 10 + 16)), steps
    evals = [
        json.loads(line) for line in (tmp_path / "one" / "eval.jsonl").read_text().splitlines()
    ]
    assert [e["step"] for e in evals] == [13, 29]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_for_requeue_and_resume_continues(
    data: dict[str, str], tmp_path: Path, s3_bucket: str
) -> None:
    checkpoints = f"{s3_bucket}/ckpt"
    args = [
        sys.executable,
        "-m",
        "pmc_clip.train",
        *train_args(
            data,
            tmp_path,
            "preempt",
            "--checkpoint-dir",
            checkpoints,
            "--resume",
            "latest",
            "--epochs",
            "1",
        ),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics_file = tmp_path / "preempt" / "metrics.jsonl"
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=DEADLINE_SECONDS)
    assert proc.returncode == 3, stderr[-3000:]  # trainer.EXIT_CODE_PREEMPTED
    stopped_at = max(metrics_by_step(tmp_path / "preempt"))
    latest = checkpoint.resolve_latest(checkpoints)
    assert latest == f"{checkpoints}/step_{stopped_at}.pt"
    # The requeued job: same command, resumes from `latest` on S3 and finishes, and
    # removes what a save killed in the middle of an upload left in the temp folder.
    temp = tmp_path / "tmp"
    temp.mkdir()
    orphan = temp / f"pmc_clip-upload+{killed_process_owner().tag()}+x"
    orphan.write_bytes(b"half a checkpoint")
    result = run(args, env={**os.environ, "TMPDIR": str(temp)})
    assert not orphan.exists()
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()]
    assert steps == list(range(1, 17)), steps  # continued, not restarted
    assert (
        f"resumed from {checkpoints}/step_{stopped_at}.pt"
        in (tmp_path / "preempt" / "out.log").read_text()
    )


def _state(step: int) -> dict[str, Any]:
    """What load_checkpoint checks a training checkpoint for, with made-up contents."""
    return {
        "format": checkpoint.CHECKPOINT_FORMAT,
        "step": step,
        "epoch": 0,
        "model": {"w": torch.full((3,), float(step))},
        "optimizer": {},
        "scaler": {},
        "nonfinite_steps": 0,
        "data": None,
        "rng": [],
        "config": {"model": {"model": "tiny", "mlm": False}},
    }


def test_corrupt_or_partial_checkpoints_are_detected_and_latest_stays_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = str(tmp_path / "ckpt")
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(
            directory, name=f"step_{step}.pt", state=_state(step), keep_last=2
        )
    assert sorted(p.name for p in Path(directory).glob("*.pt")) == ["step_3.pt", "step_4.pt"]
    assert checkpoint.resolve_latest(directory) == f"{directory}/step_4.pt"

    # A write that fails half-way (disk full): clear error, nothing new visible.
    def full_disk(obj: Any, file: Any) -> None:
        file.write(b"PK" * 50)  # part of the archive made it to disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"step_5.pt: .*No space left.*previous checkpoint"):
        checkpoint.save_checkpoint(directory, name="step_5.pt", state=_state(5), keep_last=2)
    monkeypatch.undo()
    assert checkpoint.resolve_latest(directory) == f"{directory}/step_4.pt"
    assert sorted(os.listdir(directory)) == sorted(
        ["latest.json", "step_3.pt", "step_3.pt.json", "step_4.pt", "step_4.pt.json"]
    )
    assert checkpoint.load_checkpoint(f"{directory}/step_4.pt")["model"]["w"][0] == 4
    # Truncated or bit-flipped files are refused by name.
    path = Path(directory) / "step_3.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"step_3.pt is corrupt or partial"):
        checkpoint.load_checkpoint(str(path))
    (tmp_path / "orphan.pt").write_bytes(Path(directory, "step_4.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match=r"orphan.pt cannot be read"):
        checkpoint.load_checkpoint(str(tmp_path / "orphan.pt"))
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.load_checkpoint(str(tmp_path / "nope.pt"))


def test_checkpoints_round_trip_through_s3(s3_bucket: str) -> None:
    directory = f"{s3_bucket}/run/checkpoints"
    assert checkpoint.resolve_latest(directory) is None
    url = checkpoint.save_checkpoint(directory, name="step_7.pt", state=_state(7), keep_last=1)
    assert checkpoint.resolve_latest(directory) == url
    loaded = checkpoint.load_checkpoint(url)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.full((3,), 7.0))


def test_retrieval_recall_on_a_hand_built_case() -> None:
    # 4 pairs in 2-D; image i's partner is text i.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, -1.0]])
    # image->text: image1 scores t2 (1.0) above its partner t1 (0.8): rank 1. image2 scores
    # its partner t2 0.0, tied with t3 which comes later: rank 0. Others rank 0.
    # text->image: text2 scores image1 (1.0) above its partner image2 (0.0), and image0
    # ties at 0.0 but comes first: rank 2. Others rank 0.
    for chunk in (1, 3, 4):
        metrics = retrieval_metrics(image=image, text=text, chunk_size=chunk)
        assert metrics["image_to_text_R@1"] == 75.0 and metrics["image_to_text_R@5"] == 100.0
        assert metrics["text_to_image_R@1"] == 75.0 and metrics["text_to_image_R@10"] == 100.0
        assert metrics["mean_recall"] == pytest.approx(550 / 6)
        assert metrics["num_pairs"] == 4
    # Ten identical captions: a tie never counts in the query's favour.
    same = retrieval_metrics(image=torch.eye(10), text=torch.ones(10, 10) / 10**0.5, chunk_size=4)
    assert same["image_to_text_R@1"] == 10.0 and same["image_to_text_R@5"] == 50.0


def test_macro_auc_and_test_2000_sampling() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: positives 0.9, 0.8 vs negatives 0.3, 0.6 -> 4/4 pairs; class 1 likewise.
    assert macro_auc(scores, labels) == 100.0
    assert macro_auc(torch.tensor([[0.5, 0.5]] * 4), labels) == 50.0  # ties count half
    keys = [f"k{i:05d}" for i in range(2500)]
    embeddings = Embeddings(keys, torch.randn(2500, 4), torch.randn(2500, 4))
    a, b = select_test_2000(embeddings, 0), select_test_2000(embeddings, 0)
    assert a.keys == b.keys and len(set(a.keys)) == 2000  # without replacement, repeatable
    assert select_test_2000(embeddings, 1).keys != a.keys
    small = Embeddings(keys[:10], torch.randn(10, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2000"):
        select_test_2000(small, 0)


def test_cli_rejects_unknown_and_conflicting_options() -> None:
    with pytest.raises(SystemExit):
        parse_run_config(["--train-data", "x.tar", "--no-such-flag"])
    with pytest.raises(ValueError, match="needs --dataset-resampled"):
        parse_run_config(
            ["--train-data", "a.tar::b.tar", "--train-data-upsampling-factors", "1", "2"]
        )
    with pytest.raises(ValueError, match="--pmc-clip-beta"):
        parse_run_config(["--resume", "PMC_CLIP:beta"])
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        parse_run_config(["--epochs", "0"])
    with pytest.raises(ValueError, match=r"--train-data s3://b/x\.tar: an s3:// URL cannot"):
        parse_run_config(["--train-data", "s3://KEY:SECRET@b/x.tar"])  # s3fs cannot use them
    presigned = "https://host/x.tar?X-Amz-Signature=SECRET"  # read as given, saved redacted
    config = parse_run_config(["--train-data", presigned, "--mlm", "--global-loss"])
    assert config.model.mlm and not config.loss.local_loss and config.optim.lr == 1e-4
    assert "SECRET" not in json.dumps(config.to_dict())


def test_rank_and_world_from_torchrun_or_slurm() -> None:
    torchrun = distributed.detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "h0",
            "MASTER_PORT": "1234",
        }
    )
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size, torchrun.launcher) == (
        3,
        1,
        8,
        "torchrun",
    )
    slurm = distributed.detect(
        {
            "SLURM_PROCID": "9",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "16",
            "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1",
            "SLURM_JOB_ID": "42",
        }
    )
    assert (slurm.rank, slurm.local_rank, slurm.world_size) == (9, 1, 16)
    assert slurm.master_addr == "gpu07" and slurm.master_port == 15042
    assert distributed.expand_nodelist("gpu[07-09,12],cpu1") == [
        "gpu07",
        "gpu08",
        "gpu09",
        "gpu12",
        "cpu1",
    ]
    assert distributed.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    config = parse_run_config(["--lr", "1e-3", "--warmup", "10", "--min-lr", "1e-5"]).optim
    lrs = [lr_at_step(s, config, total_steps=110) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_zero_shot_classification_on_a_hand_built_case(
    data: dict[str, str], tmp_path: Path
) -> None:
    """A model whose image feature is the mean colour and whose text feature says which
    colour word the prompt holds: every image is classified by its colour."""
    from PIL import Image

    from pmc_clip.evaluator import zero_shot_classification
    from pmc_clip.model import create_model
    from pmc_clip.tokenize import CaptionTokenizer, load_tokenizer

    colours = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), rgb).save(tmp_path / name / f"{i}.png")
    Image.new("RGB", (40, 30), colours["red"]).save(tmp_path / "blue" / "2.png")  # mislabelled
    tokenizer = CaptionTokenizer(load_tokenizer(data["tokenizer"]))
    word_ids = [tokenizer.tokenizer.convert_tokens_to_ids(name) for name in colours]
    model = create_model("tiny", mlm=False)

    def encode_text(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([(input_ids == i).any(dim=1).float() for i in word_ids], dim=1)

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # CLIP-normalised channel means: R, G, B

    model.encode_text = encode_text  # type: ignore[method-assign]
    model.encode_image = encode_image  # type: ignore[method-assign]
    results = zero_shot_classification(
        model, tokenizer, root=str(tmp_path), device=torch.device("cpu"), precision="fp32"
    )
    assert results["num_classes"] == 3 and results["num_images"] == 7
    assert results["accuracy"] == pytest.approx(100 * 6 / 7)
    # For "blue", the mislabelled red image scores like the red negatives: AUC below 100.
    assert 50 < results["macro_auc"] < 100

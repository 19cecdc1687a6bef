"""pmc_clip/config.py: the run configuration's flags, defaults, help and checks."""

from __future__ import annotations

import re
from typing import Any

import pytest

from pmc_clip.config import (
    CheckpointConfig,
    DataConfig,
    DistConfig,
    EvalConfig,
    LogConfig,
    LossConfig,
    ModelSpec,
    OptimConfig,
    RunConfig,
    TrainConfig,
    parse_run_config,
)
from pmc_clip.data import shard_reader
from pmc_clip.flags import nested_parser


def _flags() -> set[str]:
    return set(nested_parser(RunConfig, "")._option_string_actions)


def test_no_flag_keeps_every_dataclass_default() -> None:
    defaults = RunConfig(
        DataConfig(), ModelSpec(), LossConfig(), OptimConfig(), TrainConfig(),
        CheckpointConfig(), EvalConfig(), LogConfig(), DistConfig(),
    )  # fmt: skip
    config = parse_run_config([])
    assert config == defaults
    assert (config.data.batch_size, config.data.crop_scale, config.log.report_to) == (
        128,
        (0.5, 1.0),
        ("tensorboard",),
    )
    assert config.loss.local_loss and not config.model.mlm and config.data.image_size is None


def test_each_kind_of_flag_parses_to_its_field() -> None:
    config = parse_run_config(
        [
            *("--train-data", "a.tar::b.tar", "--dataset-resampled"),  # store_true
            *("--train-data-upsampling-factors", "1", "2.5"),  # nargs +, float
            *("--crop-scale", "0.3", "0.9", "--report-to"),  # nargs 2; nargs * given empty
            *("--global-loss", "--precision", "fp32"),  # store_false; choices
            *("--image_dir", "figs/", "--workers", "3", "--wd", "0.2"),  # alias; renamed fields
            *("--prefetch-factor", "2", "--read-timeout-seconds", "5"),
        ]
    )
    assert config.data.dataset_resampled and config.data.train_data == "a.tar::b.tar"
    assert config.data.train_data_upsampling_factors == (1.0, 2.5)
    assert config.data.crop_scale == (0.3, 0.9) and config.log.report_to == ()
    assert config.loss.local_loss is False and config.model.precision == "fp32"
    assert config.data.image_dir == "figs/" and config.data.num_workers == 3
    assert config.optim.weight_decay == 0.2
    assert (config.data.prefetch_factor, config.data.read_timeout_seconds) == (2, 5.0)
    assert parse_run_config(["--image-dir", "x"]).data.image_dir == "x"
    assert parse_run_config(["--report-to", "tensorboard"]).log.report_to == ("tensorboard",)


@pytest.mark.parametrize(
    "argv",
    [
        ["--precision", "fp16"],  # not a choice
        ["--image-size", "64"],  # the model decides the image size: no flag
        ["--batch", "4"],  # no abbreviations
        ["--crop-scale", "0.5"],  # two values
    ],
)
def test_bad_command_lines_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_run_config(argv)
    assert exited.value.code == 2


def test_help_shows_meaning_unit_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_run_config(["--help"], "Pretrain PMC-CLIP.")
    text = " ".join(capsys.readouterr().out.split())
    assert "Pretrain PMC-CLIP." in text
    assert "--batch-size BATCH_SIZE per step on each rank [samples] (default: 128)" in text
    assert "[seconds] (default: 1800.0)" in text.split("--data-timeout-seconds", 1)[1]
    chunk = "--read-chunk-bytes READ_CHUNK_BYTES largest range request of a remote shard"
    assert f"{chunk} [bytes] (default: 16777216)" in text
    assert "--global-loss every rank builds all" in text and "(default: off)" in text
    assert "--image-dir IMAGE_DIR, --image_dir IMAGE_DIR" in text
    assert "--precision {amp_bf16,amp,fp32}" in text
    for concern in ("data:", "model:", "loss:", "optim:", "train:", "checkpoint:", "dist:"):
        assert concern in text


_BAD_VALUES: list[tuple[type, dict[str, Any], str]] = [
    (DataConfig, {"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    (DataConfig, {"num_workers": -1}, "--workers must be >= 0, got -1"),
    (DataConfig, {"prefetch_factor": 0}, "--prefetch-factor must be >= 1, got 0"),
    (DataConfig, {"span_samples": 0}, "--shuffle-span-samples must be >= 1, got 0"),
    (DataConfig, {"train_num_samples": 0}, "--train-num-samples must be >= 1, got 0"),
    (DataConfig, {"num_canonical_nodes": 0}, "--num-canonical-nodes must be >= 1, got 0"),
    (DataConfig, {"cache_limit_bytes": 5}, "--cache-limit-bytes needs --cache-dir"),
    (DataConfig, {"read_chunk_bytes": 10}, "--read-chunk-bytes must be >= 1024, got 10"),
    (DataConfig, {"read_max_attempts": 0}, "--read-max-attempts must be >= 1, got 0"),
    (DataConfig, {"read_backoff_max_seconds": -1.0}, "--read-backoff-seconds must be >= 0"),
    (DataConfig, {"read_timeout_seconds": 0.0}, "--read-timeout-seconds must be > 0"),
    (DataConfig, {"batch_timeout_seconds": 0.0}, "--data-timeout-seconds must be > 0"),
    (DataConfig, {"max_member_bytes": 0}, "--max-member-bytes must be >= 1, got 0"),
    (OptimConfig, {"warmup_steps": -1}, "--warmup must be >= 0 steps, got -1"),
    (TrainConfig, {"accum_freq": 0}, "--accum-freq must be >= 1, got 0"),
    (CheckpointConfig, {"keep_last": 0}, "--keep-last must be >= 1, got 0"),
    (EvalConfig, {"val_frequency": -1}, "--val-frequency must be >= 0, got -1"),
    (LogConfig, {"log_every_n_steps": 0}, "--log-every-n-steps must be >= 1, got 0"),
    (DistConfig, {"dist_timeout_seconds": 0.0}, "--dist-timeout-seconds must be > 0"),
]


@pytest.mark.parametrize(("cls", "values", "message"), _BAD_VALUES)
def test_an_error_names_a_flag_that_exists(cls: type, values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        cls(**values)
    assert str(raised.value) == message
    assert set(re.findall(r"--[a-z0-9-]+", message)) <= _flags()


def test_image_size_is_the_models_and_a_loader_must_be_given_it() -> None:
    assert DataConfig(image_size=64).loader_image_size == 64
    with pytest.raises(ValueError, match="model's input size"):
        DataConfig().loader_image_size  # noqa: B018 (the property raises)
    with pytest.raises(ValueError, match="image_size must be >= 8 pixels"):
        DataConfig(image_size=4)


def test_read_defaults_are_the_shard_readers() -> None:
    read, data = shard_reader.ShardReadOptions(), DataConfig()
    assert (data.read_chunk_bytes, data.read_timeout_seconds) == (
        read.chunk_bytes,
        read.timeout_seconds,
    )
    retry = (read.retry.max_attempts, read.retry.backoff_seconds, read.retry.backoff_max_seconds)
    assert (data.read_max_attempts, data.read_backoff_seconds, data.read_backoff_max_seconds) == (
        retry
    )

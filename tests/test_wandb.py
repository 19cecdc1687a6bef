"""--report-to wandb (offline runs read back from their files) and the progress bars."""

from __future__ import annotations

import io
import json
import signal
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wandb
from helpers_train import build_train_data, metrics_by_step, train_args

from pmc_clip import metrics
from pmc_clip.config import parse_run_config
from pmc_clip.trainer import Trainer

# A credential on the command line (a presigned URL's signature): it must reach no wandb file.
SIGNATURE = "0123456789abcdef0123456789abcdef"


@pytest.fixture()
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    presigned = f"s3://bucket/x.tar?X-Amz-Signature={SIGNATURE}"
    monkeypatch.setattr(sys, "argv", ["pmc_clip.train", "--train-data", presigned])
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield wandb_dir
    for sig, handler in saved.items():  # the Trainer installs its stop handlers
        signal.signal(sig, handler)


def _wandb_records(path: Path) -> list[Any]:
    """The records of a `.wandb` file: a 7-byte header, then a LevelDB log (32 KiB blocks
    of chunks: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    raw, block, position, pending = path.read_bytes(), 32768, 7, b""
    records = []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a chunk header
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if kind == 0:
            break
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _read_run(path: Path) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(run id, config, history rows) of an offline run file."""
    run_id, config, history = "", {}, []
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            items = record.history.item  # "a/b" comes as nested_key ["a", "b"]
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            )
    return run_id, config, history


def test_offline_wandb_run_holds_the_metrics_and_a_requeued_job_continues_it(
    offline_wandb: Path, tmp_path: Path
) -> None:
    data = build_train_data(tmp_path / "data")
    logs = tmp_path / "logs"
    first = train_args(
        data, logs, "job", "--report-to", "wandb", "--epochs", "1", "--batch-size", "16"
    )
    assert Trainer(parse_run_config(first)).fit() == 0
    run_id = (logs / "job" / metrics.WANDB_RUN_ID_FILE).read_text().strip()
    # The requeued job: same command, one more epoch, continuing from its checkpoint.
    second = [*first, "--epochs", "2", "--resume", "latest"]
    assert Trainer(parse_run_config(second)).fit() == 0
    assert (logs / "job" / metrics.WANDB_RUN_ID_FILE).read_text().strip() == run_id
    # finish() can return before wandb's service has written the last records; teardown
    # waits for the service to end.
    wandb.teardown()

    run_files = sorted(offline_wandb.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(run_files) == 2  # one per job, both of the same wandb run
    runs = [_read_run(path) for path in run_files]
    assert [r[0] for r in runs] == [run_id, run_id]
    resolved = json.loads(json.dumps(parse_run_config(first).to_dict()))  # redacted
    assert {k: v for k, v in runs[0][1].items() if k != "_wandb"} == resolved
    logged = metrics_by_step(logs / "job").values()
    for (_, _, history), epoch in zip(runs, (0, 1), strict=True):
        train_rows = [row for row in history if "train/loss" in row]
        expected = [record for record in logged if record["epoch"] == epoch]
        assert [row["trainer/step"] for row in train_rows] == [r["step"] for r in expected]
        for row, record in zip(train_rows, expected, strict=True):
            for name in ("train/loss", "train/lr", "perf/samples_per_second"):
                assert row[name] == pytest.approx(record[name])
        (evaluation,) = [row for row in history if "val/mean_recall" in row]
        assert evaluation["trainer/step"] == 4 * (epoch + 1)
    everything = b"".join(p.read_bytes() for p in offline_wandb.rglob("*") if p.is_file())
    assert SIGNATURE.encode() not in everything


def test_report_to_wandb_without_the_package_is_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec reports when missing
    with pytest.raises(ValueError, match=r"pip install 'pmc_clip\[wandb\]'"):
        parse_run_config(["--report-to", "wandb"])
    with pytest.raises(ValueError, match="--report-to accepts tensorboard and wandb"):
        parse_run_config(["--report-to", "mlflow"])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "enabled", "drawn"),
    [(_Terminal(), True, True), (io.StringIO(), True, False), (_Terminal(), False, False)],
)
def test_progress_bar_is_drawn_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, stream: io.StringIO, enabled: bool, drawn: bool
) -> None:
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(metrics.progress_bar(range(3), "embedding", enabled=enabled)) == [0, 1, 2]
    assert ("embedding" in stream.getvalue()) == drawn

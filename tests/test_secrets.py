"""Credentials never reach a log, manifest, saved config, checkpoint or error message
(issue 7). Unique marker values are the AWS keys of a real run: make_shards to S3, then a
1-process CPU training run that reads the shards from S3 and checkpoints to S3; a bad URL
carrying the marker as user info and as a `?token=` must come back redacted. Every file
written locally, every object in the bucket and all captured output are read as bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from pmc_clip.synthetic import SyntheticOptions, generate, write_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEADLINE_SECONDS = 240


def _run(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, capture_output=True, timeout=DEADLINE_SECONDS)


@pytest.mark.slow
def test_credentials_appear_in_no_file_object_or_output(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    markers = {
        "key id": f"AKIDMARKER{uuid.uuid4().hex[:12].upper()}",
        "secret key": f"SECRETMARKER{uuid.uuid4().hex}",
        "url token": f"TOKENMARKER{uuid.uuid4().hex}",
    }
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", markers["key id"])  # moto accepts any keys
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", markers["secret key"])
    token = markers["url token"]

    jsonl = Path(
        generate(
            SyntheticOptions(
                output=str(tmp_path / "raw"),
                num_articles=10,
                figures_per_article=2,
                subfigures_per_figure=2,
            )
        )
    )
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    write_tokenizer([r["caption"] for r in rows], str(tmp_path / "tokenizer"))
    for row in rows:  # 2 of 10 articles to valid: 32 train, 8 valid pairs
        row["split"] = "valid" if int(row["pmcid"][3:]) % 5 == 0 else "train"
    split_jsonl = tmp_path / "split.jsonl"
    split_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))

    outputs: list[bytes] = []
    shards = f"{s3_bucket}/shards"
    make = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--workers", "1"]
    made = _run([*make, "--input", str(split_jsonl), "--images", str(tmp_path / "raw" / "images"),
                  "--output", shards, "--shard-size", "8"])  # fmt: skip
    assert made.returncode == 0, made.stderr.decode()[-3000:]
    outputs += [made.stdout, made.stderr]
    # A bad --output carrying the marker as user info and as a token: a redacted error.
    bad_url = f"s3://user:{token}@{s3_bucket.removeprefix('s3://')}/x?token={token}"
    bad = _run([*make, "--input", str(split_jsonl), "--images", str(tmp_path / "raw" / "images"),
                "--output", bad_url, "--upload-max-attempts", "1"])  # fmt: skip
    assert bad.returncode == 1 and b"make_shards: error: " in bad.stderr
    assert b"Traceback" not in bad.stderr and b"token=REDACTED" in bad.stderr
    outputs += [bad.stdout, bad.stderr]

    manifest = json.loads(
        boto3.client("s3")
        .get_object(Bucket=s3_bucket.removeprefix("s3://"), Key="shards/manifest.json")["Body"]
        .read()
    )
    train = f"{shards}/{manifest['splits']['train']['pattern']}"
    val = f"{shards}/{manifest['splits']['valid']['pattern']}"
    trained = _run([
        sys.executable, "-m", "pmc_clip.train", "--train-data", train, "--val-data", val,
        "--model", "tiny", "--tokenizer", str(tmp_path / "tokenizer"), "--mlm",
        "--batch-size", "4", "--workers", "1", "--epochs", "1", "--precision", "fp32",
        "--device", "cpu", "--warmup", "2", "--logs", str(tmp_path / "logs"), "--name", "run",
        "--log-every-n-steps", "1", "--save-every-n-steps", "4",
        "--checkpoint-dir", f"{s3_bucket}/ckpt",
    ])  # fmt: skip
    assert trained.returncode == 0, trained.stderr.decode()[-3000:]
    outputs += [trained.stdout, trained.stderr]

    # Every local file of both runs (the generated input has no markers either).
    written = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*")
               if p.is_file()}  # fmt: skip
    run = "logs/run"
    for name in ("out.log", "metrics.jsonl", "eval.jsonl", "config.json"):
        assert f"{run}/{name}" in written, sorted(written)
    assert any(name.startswith(f"{run}/tensorboard/events.out.tfevents") for name in written)
    assert b"s3://pmc-clip-test/ckpt" in written[f"{run}/config.json"]  # the URL, redacted
    # Every object in the bucket: shards, manifest, sizes, skipped.jsonl, progress
    # records, checkpoints and their metadata.
    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    for item in client.list_objects_v2(Bucket=bucket)["Contents"]:
        written[f"s3:{item['Key']}"] = client.get_object(Bucket=bucket, Key=item["Key"])[
            "Body"
        ].read()
    objects = {name.removeprefix("s3:") for name in written if name.startswith("s3:")}
    assert {"shards/manifest.json", "shards/skipped.jsonl", "shards/sizes.json"} <= objects
    assert any(name.startswith("ckpt/") and name.endswith(".pt") for name in objects), objects
    for what, marker in markers.items():
        needle = marker.encode()
        leaks = [name for name, data in written.items() if needle in data]
        assert not leaks, f"the {what} is in {leaks}"
        assert not any(needle in output for output in outputs), f"the {what} was printed"

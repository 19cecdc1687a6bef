"""Credentials never reach a log, manifest, saved config, checkpoint or error message
(issue 7). Unique marker values are the AWS keys of a real run: make_shards to S3, then a
1-process CPU training run that reads the shards from S3 and checkpoints to S3; a bad URL
carrying the marker as user info and as a `?token=` must come back redacted. Every file
written locally, every object in the bucket and all captured output are read as bytes."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import traceback
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import boto3
import pytest
import torch

from pmc_clip import checkpoint, metrics, storage, train
from pmc_clip.sharding import cli as make_shards_cli
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
    # A bad --output carrying the marker as user info and as a token: refused at start-up
    # (a command-line error), the URL redacted.
    bad_url = f"s3://user:{token}@{s3_bucket.removeprefix('s3://')}/x?token={token}"
    bad = _run([*make, "--input", str(split_jsonl), "--images", str(tmp_path / "raw" / "images"),
                "--output", bad_url, "--upload-max-attempts", "1"])  # fmt: skip
    assert bad.returncode == 2 and b"make_shards: error: --output " in bad.stderr
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


# --------------------------------------------------------------------------- issue 13
#
# Credentials in a URL flag never reach a log line, an error, a traceback or an object
# key: s3:// URLs carrying them and folders written to that carry them are refused at
# start-up (exit 2, one line, redacted); every other storage error names the URL redacted.


def _marker() -> str:
    return f"MARKER{uuid.uuid4().hex}"


def _train_argv(tmp_path: Path, *extra: str) -> list[str]:
    # Never reaches the data: the command line is refused first.
    return ["--train-data", str(tmp_path / "none-{0..1}.tar"), "--model", "tiny",
            "--device", "cpu", "--logs", str(tmp_path / "logs"), "--name", "run",
            *extra]  # fmt: skip


def _bucket_keys(s3_bucket: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))
    return [item["Key"] for item in listing.get("Contents", [])]


def test_checkpoint_dir_with_a_token_is_refused_before_any_log_line_or_object(
    tmp_path: Path, s3_bucket: str
) -> None:
    """Without the check the run logged "no checkpoint in s3://.../ck?token=..." and
    "saved checkpoint ..." and wrote objects under the key `ck?token=.../`."""
    token = _marker()
    argv = _train_argv(tmp_path, "--checkpoint-dir", f"{s3_bucket}/ck?token={token}",
                       "--resume", "latest")  # fmt: skip
    result = _run([sys.executable, "-m", "pmc_clip.train", *argv])
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr[-3000:]
    assert (
        stderr.startswith("pmc_clip.train: error: --checkpoint-dir ") and "Traceback" not in stderr
    )
    assert "token=REDACTED" in stderr
    assert token.encode() not in result.stdout + result.stderr
    assert _bucket_keys(s3_bucket) == []
    logged = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert not any(token.encode() in data for data in logged)


@pytest.mark.parametrize(
    "flag", ["--train-data", "--val-data", "--image-dir", "--checkpoint-dir", "--pmc-clip-beta"]
)
def test_s3_url_with_user_info_is_refused_in_one_redacted_line(
    tmp_path: Path, s3_bucket: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the check botocore's `Invalid bucket name "KEY:SECRET@bucket"` ended the
    run in a traceback."""
    secret = _marker()
    url = f"s3://KEY:{secret}@{s3_bucket.removeprefix('s3://')}/x/pmc-oa-train-{{0..1}}.tar"
    extra = ["--resume", "PMC_CLIP:beta"] if flag == "--pmc-clip-beta" else []
    assert train.main([*_train_argv(tmp_path), flag, url, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pmc_clip.train: error: {flag} s3://pmc-clip-test/x/")
    assert len(err.splitlines()) == 1 and secret not in err and "Invalid bucket" not in err


@pytest.mark.parametrize("flag", ["--images", "--input", "--output"])
def test_make_shards_refuses_credentials_in_its_urls(
    tmp_path: Path, s3_bucket: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = _marker()
    argv = {"--input": str(tmp_path / "rows.jsonl"), "--images": str(tmp_path),
            "--output": f"{s3_bucket}/shards"}  # fmt: skip
    argv[flag] = f"s3://KEY:{secret}@{s3_bucket.removeprefix('s3://')}/data"
    assert make_shards_cli.main([arg for pair in argv.items() for arg in pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"make_shards: error: {flag} s3://pmc-clip-test/data: ")
    assert secret not in err and _bucket_keys(s3_bucket) == []


def test_checkpoint_reads_name_the_url_redacted_in_errors_and_tracebacks(
    s3_bucket: str,
) -> None:
    """latest.json and checkpoint loads on a URL s3fs rejects: botocore quotes the bucket
    name with the credentials; the error (and its printed traceback) must not."""
    secret = _marker()
    url = f"s3://KEY:{secret}@{s3_bucket.removeprefix('s3://')}/ck"
    for read in (checkpoint.resolve_latest, checkpoint.load_checkpoint):
        with pytest.raises(storage.StorageError) as caught:
            read(url)
        text = "".join(traceback.format_exception(caught.value))
        assert "s3://pmc-clip-test/ck" in str(caught.value), str(caught.value)
        assert secret not in text and "KEY:" not in text


def test_released_checkpoint_loader_redacts_a_presigned_url(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--pmc-clip-beta as a presigned https URL (its signature a credential): the loader
    once quoted the raw URL when the file was no PMC-CLIP checkpoint."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # download cache
    client, bucket = boto3.client("s3"), s3_bucket.removeprefix("s3://")
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(1)}, not_a_checkpoint)
    client.upload_file(str(not_a_checkpoint), bucket, "weights.pt")
    for key, error in (("weights.pt", ValueError), ("missing.pt", storage.StorageError)):
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600
        )
        signature = dict(parse_qsl(urlsplit(url).query))["Signature"]
        with pytest.raises(error) as caught:
            checkpoint.load_pmc_clip_checkpoint(url)
        text = "".join(traceback.format_exception(caught.value))
        assert "Signature=REDACTED" in str(caught.value), str(caught.value)
        assert signature not in text


def test_the_log_filter_masks_command_line_and_environment_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth behind redact_url: a record that quotes a credential anyway (a
    library's message, an exception's text, its traceback), from any logger and through
    a handler made after the filter was installed, shows *** instead."""
    environment = {name: _marker() for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    user, signature, token = _marker(), _marker(), _marker()
    presigned = f"https://host/ckpt.pt?X-Amz-Signature={signature}"
    metrics.install_secret_filter(["--pmc-clip-beta", presigned, f"--resume=ck.pt?token={token}",
                                   "--train-data", f"s3://KEY:{user}@bucket/x.tar"])  # fmt: skip
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("botocore.masking-test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("GET %s: 403", presigned)
        logger.warning(
            f"Invalid bucket name KEY:{user}@bucket, session {environment['AWS_SESSION_TOKEN']}"
        )
        try:
            raise OSError(
                f"key {environment['AWS_SECRET_ACCESS_KEY']} rejected reading ck.pt?token={token}"
            )
        except OSError:
            logger.exception("upload failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert not [s for s in [*environment.values(), user, signature, token] if s in text], text
    assert "GET https://host/ckpt.pt?X-Amz-Signature=***: 403" in text
    assert "Invalid bucket name ***@bucket, session ***" in text  # user info: KEY:SECRET
    assert "Traceback" in text and "OSError: key *** rejected reading ck.pt?token=***" in text

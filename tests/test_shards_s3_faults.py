"""make_shards writing to S3 through a proxy that breaks uploads (issue 7): a run rides
through 503s, resets, stalls and a short outage with retries; a run whose upload keeps
failing stops with an error naming the shard, and the rerun resumes. Either way the final
shards are byte-identical to an uninterrupted local run. (moto loses its objects when
restarted, so the server "restart" is injected at the proxy as a burst of failures.)"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from conftest import FaultProxy, as_s3_endpoint

from pmc_clip.sharding.cli import main
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.run import make_shards
from pmc_clip.synthetic import SyntheticOptions, generate


class UploadFaultProxy(FaultProxy):
    """FaultProxy for writes. Every `put_fail_every`-th PUT gets the next of `put_actions`
    ("503", "reset", "stall"); the `outage_at_put`-th PUT starts an outage in which it and
    the next `outage_requests - 1` requests of any kind are reset (a restarting server);
    every PUT of an object in `always_fail_put` (a path suffix) gets a 503."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.put_fail_every = 0
        self.put_actions: tuple[str, ...] = ("503",)
        self.outage_at_put = 0
        self.outage_requests = 0
        self.always_fail_put: tuple[str, ...] = ()
        self.num_puts = 0
        self.forwarded_puts: list[str] = []  # object paths of PUTs let through
        self._outage_left = 0

    def _action(self, method: str, path: str) -> str | None:
        object_path = path.split("?", 1)[0]
        with self._lock:
            if method == "PUT":
                self.num_puts += 1
                if self.num_puts == self.outage_at_put:
                    self._outage_left = self.outage_requests
            action = self._choose(method, object_path)
            if action is None:
                if method == "PUT":
                    self.forwarded_puts.append(object_path)
            else:
                self.faults[action] = self.faults.get(action, 0) + 1
            return action

    def _choose(self, method: str, object_path: str) -> str | None:
        if self._outage_left > 0:
            self._outage_left -= 1
            return "reset"
        if method != "PUT":
            return None
        if any(object_path.endswith(name) for name in self.always_fail_put):
            return "503"
        if self.put_fail_every and self.num_puts % self.put_fail_every == 0:
            index = self.num_puts // self.put_fail_every - 1
            return self.put_actions[index % len(self.put_actions)]
        return None


@pytest.fixture()
def upload_proxy(
    s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[UploadFaultProxy]:
    with as_s3_endpoint(UploadFaultProxy(s3_endpoint), monkeypatch) as proxy:
        yield proxy


def _options(tmp_path: Path, output: str, **overrides: object) -> ShardOptions:
    jsonl = tmp_path / "data" / "pmc_oa.jsonl"
    if not jsonl.exists():
        generate(
            SyntheticOptions(
                output=str(tmp_path / "data"),
                num_articles=6,
                figures_per_article=2,
                subfigures_per_figure=2,
                min_side=16,
                max_side=24,
            )
        )
    settings: dict[str, object] = {
        "input": str(jsonl),
        "images": str(tmp_path / "data" / "images"),
        "output": output,
        "shard_size": 3,
        "shuffle": True,
        "seed": 5,
        "split_fractions": (("train", 0.7), ("valid", 0.3)),
        "upload_backoff_seconds": 0.01,
    }
    return ShardOptions(**(settings | overrides))  # type: ignore[arg-type]


def _argv(options: ShardOptions) -> list[str]:
    return [
        "--input", options.input, "--images", options.images, "--output", options.output,
        "--shard-size", str(options.shard_size), "--shuffle", "--seed", str(options.seed),
        "--split-fractions", "train=0.7,valid=0.3", "--workers", "0",
        "--upload-max-attempts", str(options.upload_max_attempts),
        "--upload-backoff-seconds", str(options.upload_backoff_seconds),
    ]  # fmt: skip


def _local_reference(tmp_path: Path) -> dict[str, bytes]:
    """Every file of an uninterrupted local run but its progress records, by name."""
    out = tmp_path / "reference"
    make_shards(_options(tmp_path, str(out)))
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert sum(name.endswith(".tar") for name in files) > 6
    return files


def _assert_same_as_local(remote: str, reference: dict[str, bytes]) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = {path.rsplit("/", 1)[1] for path in fs.ls(remote, detail=False)} - {"_progress"}
    assert names == set(reference)
    for name, data in reference.items():
        if name == "manifest.json":  # names its own --output: compare everything else
            remote_manifest = json.loads(fs.cat_file(f"{remote}/{name}"))
            local_manifest = json.loads(data)
            for manifest in (remote_manifest, local_manifest):
                manifest["options"].pop("output")
            assert remote_manifest == local_manifest
        else:
            assert fs.cat_file(f"{remote}/{name}") == data, name


def test_upload_faults_and_an_outage_are_ridden_through(
    tmp_path: Path, s3_bucket: str, upload_proxy: UploadFaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    reference = _local_reference(tmp_path)
    upload_proxy.put_fail_every = 3
    upload_proxy.put_actions = ("503", "reset", "stall")
    upload_proxy.stall_seconds = 0.2
    upload_proxy.outage_at_put = 8
    upload_proxy.outage_requests = 3
    remote = f"{s3_bucket}/shards"
    with caplog.at_level(logging.INFO, logger="pmc_clip.storage"):
        make_shards(_options(tmp_path, remote, upload_max_attempts=6))
    _assert_same_as_local(remote, reference)
    assert set(upload_proxy.faults) == {"503", "reset", "stall"}, upload_proxy.faults
    num_faults = sum(upload_proxy.faults.values())
    assert num_faults >= 8
    # Each 503 cost one retry of ours. A connection closed before any response is often
    # re-sent by aiohttp itself (on a reused keep-alive connection): those may not reach us.
    retries = caplog.text.count("retrying ")
    assert upload_proxy.faults["503"] <= retries <= num_faults
    assert "testing-secret-key" not in caplog.text


def test_upload_that_keeps_failing_stops_naming_the_shard_and_the_rerun_resumes(
    tmp_path: Path,
    s3_bucket: str,
    upload_proxy: UploadFaultProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    reference = _local_reference(tmp_path)
    remote = f"{s3_bucket}/shards"
    options = _options(tmp_path, remote, upload_max_attempts=3)
    victim = "pmc-oa-train-000002.tar"
    upload_proxy.always_fail_put = (victim,)
    assert main(_argv(options)) == 1
    err = capsys.readouterr().err
    assert f"upload {remote}/{victim} failed 3 times, last: " in err, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert upload_proxy.faults == {"503": 3}
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists(f"{remote}/manifest.json") and not fs.exists(f"{remote}/{victim}")
    recorded = sorted(p.rsplit("/", 1)[1] for p in fs.glob(f"{remote}/_progress/*.tar.json"))
    assert recorded == ["pmc-oa-train-000000.tar.json", "pmc-oa-train-000001.tar.json"]

    # The store is well again: the same command resumes after the recorded shards.
    upload_proxy.always_fail_put = ()
    upload_proxy.forwarded_puts.clear()
    assert main(_argv(options)) == 0
    _assert_same_as_local(remote, reference)
    uploaded = [path.rsplit("/", 1)[1] for path in upload_proxy.forwarded_puts]
    assert victim in uploaded
    assert "pmc-oa-train-000000.tar" not in uploaded  # finished shards are not redone
    assert "pmc-oa-train-000001.tar" not in uploaded

"""Shared fixtures: a real S3-compatible server on loopback (moto's server mode), a
fault-injecting proxy in front of it (helpers_s3.FaultProxy), logger and signal resets."""

from __future__ import annotations

import logging
import os
import signal
import urllib.request
from collections.abc import Iterator

import pytest
from helpers_s3 import S3_BUCKET, FaultProxy, as_s3_endpoint, free_port


@pytest.fixture(autouse=True)
def _pmc_clip_logger_reset() -> Iterator[None]:
    """A Trainer built in-process (metrics.setup_logging) gives the `pmc_clip` logger a
    handler bound to that test's captured stderr, which pytest closes after it: later
    tests logging through it would print "--- Logging error ---" tracebacks instead."""
    yield
    logger = logging.getLogger("pmc_clip")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture()
def restore_stop_handlers() -> Iterator[None]:
    """For tests building a Trainer in-process: it installs SIGTERM/SIGUSR1 handlers; put
    the test process's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, with dummy credentials in the environment (so
    spawned worker processes and subprocesses reach it the way a real job would: through
    AWS_ENDPOINT_URL_S3 and the standard credential variables)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """An empty bucket on a freshly reset server; returns its s3:// URL."""
    import boto3
    import s3fs

    request = urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    s3fs.S3FileSystem.clear_instance_cache()  # drop listings cached before the reset
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    return f"s3://{S3_BUCKET}"


@pytest.fixture()
def fault_proxy(
    s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the moto server, made the S3 endpoint of this test (and of
    the data-loader workers it forks). Injects nothing until configured."""
    with as_s3_endpoint(FaultProxy(s3_endpoint), monkeypatch) as proxy:
        yield proxy

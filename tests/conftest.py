"""Shared fixtures: a real S3-compatible server on loopback (moto's server mode)."""

from __future__ import annotations

import logging
import os
import socket
import urllib.request
from collections.abc import Iterator

import pytest

S3_BUCKET = "pmc-clip-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

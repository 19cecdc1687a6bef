"""Shared fixtures: a real S3-compatible server on loopback (moto's server mode)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest

S3_BUCKET = "pmc-clip-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the moto server that breaks a deterministic
    subset of shard reads: every `fail_every`-th GET of a `.tar` object gets the next
    action of `actions`, in turn:
      "503"    -- an S3 `SlowDown` 503 (throttling),
      "drop"   -- the status line, headers and half the body, then the connection closes,
      "reset"  -- the connection closes before any response,
      "stall"  -- nothing for `stall_seconds` (the client's read timeout must fire).
    `always_fail` names objects (a path suffix, any object) whose every GET gets a 503.
    """

    def __init__(self, upstream: str) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.fail_every = 0
        self.actions: tuple[str, ...] = ("503",)
        self.always_fail: tuple[str, ...] = ()
        self.stall_seconds = 2.0
        self.num_tar_gets = 0
        self.faults: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []  # (method, object path), as they arrive
        self._lock = threading.Lock()
        upstream_host = urlsplit(upstream).netloc
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path.split("?", 1)[0]))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = proxy._action(self.command, self.path)
                if action == "reset":
                    self.close_connection = True
                    return
                if action == "stall":
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                if action == "503":
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(upstream_host, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = upstream_host
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                finally:
                    connection.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if action == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _action(self, method: str, path: str) -> str | None:
        object_path = path.split("?", 1)[0]
        if method != "GET":
            return None
        with self._lock:
            if any(object_path.endswith(name) for name in self.always_fail):
                self.faults["503"] = self.faults.get("503", 0) + 1
                return "503"
            if not object_path.endswith(".tar"):
                return None
            self.num_tar_gets += 1
            if not self.fail_every or self.num_tar_gets % self.fail_every:
                return None
            action = self.actions[(self.num_tar_gets // self.fail_every - 1) % len(self.actions)]
            self.faults[action] = self.faults.get(action, 0) + 1
            return action

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


P = TypeVar("P", bound="FaultProxy")


@pytest.fixture()
def fault_proxy(
    s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the moto server, made the S3 endpoint of this test (and of
    the data-loader workers it forks). Injects nothing until configured."""
    with as_s3_endpoint(FaultProxy(s3_endpoint), monkeypatch) as proxy:
        yield proxy


@contextmanager
def as_s3_endpoint(proxy: P, monkeypatch: pytest.MonkeyPatch) -> Iterator[P]:
    """Make `proxy` the S3 endpoint for the rest of the test; close it afterwards."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    try:
        yield proxy
    finally:
        proxy.close()

"""The S3 side of the tests: a free loopback port, the test bucket's name, and an HTTP
proxy that breaks a deterministic subset of reads (`FaultProxy`). The pytest fixtures that
start the moto server and put a proxy in front of it are in conftest.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest

S3_BUCKET = "pmc-clip-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@contextmanager
def as_s3_endpoint(proxy: P, monkeypatch: pytest.MonkeyPatch) -> Iterator[P]:
    """Make `proxy` the S3 endpoint for the rest of the test; close it afterwards."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    try:
        yield proxy
    finally:
        proxy.close()

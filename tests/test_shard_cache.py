"""The node-local shard cache (pmc_clip.data.shard_cache): one download per file per node
across real processes, LRU eviction within the limit, failed and killed downloads leave
nothing that looks complete, and credentials never reach a file name or an error."""

from __future__ import annotations

import functools
import hashlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pmc_clip.data.shard_cache import ShardCache, cache_name, check_cache_limit

SIZE = 4096
DEADLINE_SECONDS = 30


def _payload(url: str, size: int = SIZE) -> bytes:
    seed = hashlib.sha256(url.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _write(url: str, record: str | None, delay: float, size: int, tmp_path: str) -> None:
    """A download function: records the call (one line, O_APPEND: atomic between
    processes), waits `delay` seconds halfway through, and writes `size` bytes."""
    if record is not None:
        with open(record, "a") as log:
            log.write(f"{os.getpid()} {url}\n")
    data = _payload(url)[:size] if size <= SIZE else _payload(url, size)
    with open(tmp_path, "wb") as f:
        f.write(data[: size // 2])
        f.flush()
        time.sleep(delay)
        f.write(data[size // 2 :])


def _download(
    url: str, record: str | None = None, delay: float = 0.0, size: int = SIZE
) -> Callable[[str], None]:
    return functools.partial(_write, url, record, delay, size)


def _calls(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def _visible(cache_dir: Path) -> dict[str, int]:
    """Every file in the folder except the (empty) lock files, with its size."""
    return {
        p.name: p.stat().st_size
        for p in cache_dir.iterdir()
        if not (p.name.startswith(".lock-") or p.name == ".cache.lock")
    }


def _disk_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.iterdir())


# --------------------------------------------------------------------------- concurrency


def _open_and_digest(cache_dir: str, url: str, record: str, barrier: Any, results: Any) -> None:
    cache = ShardCache(cache_dir, 10 * SIZE)
    barrier.wait()
    with cache.open(url, SIZE, _download(url, record, delay=0.5)) as f:
        data = f.read()
    results.put((hashlib.sha256(data).hexdigest(), len(data), cache.stats()))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_concurrent_processes_download_once(tmp_path: Path, start_method: str) -> None:
    ctx: Any = multiprocessing.get_context(start_method)
    cache_dir, record = tmp_path / "cache", tmp_path / "calls.txt"
    url = "s3://bucket/shards/shard-000000.tar"
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(
            target=_open_and_digest, args=(str(cache_dir), url, str(record), barrier, results)
        )
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=DEADLINE_SECONDS) for _ in procs]
    for p in procs:
        p.join(DEADLINE_SECONDS)
        assert p.exitcode == 0
    assert len(_calls(record)) == 1
    expected = hashlib.sha256(_payload(url)).hexdigest()
    assert [(digest, n) for digest, n, _ in got] == [(expected, SIZE)] * 4
    assert sum(stats["downloads"] for _, _, stats in got) == 1
    assert sum(stats["hits"] for _, _, stats in got) == 3
    assert _visible(cache_dir) == {cache_name(url): SIZE}


def test_concurrent_threads_download_once(tmp_path: Path) -> None:
    """An open-ahead thread and the worker's own thread share one ShardCache object."""
    cache, record = ShardCache(str(tmp_path / "cache"), None), tmp_path / "calls.txt"
    url = "s3://bucket/shards/shard-000001.tar"
    datas: list[bytes] = []

    def read() -> None:
        with cache.open(url, SIZE, _download(url, str(record), delay=0.3)) as f:
            datas.append(f.read())

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_SECONDS)
    assert datas == [_payload(url)] * 3
    assert len(_calls(record)) == 1
    assert cache.stats() == {"hits": 2, "downloads": 1, "evictions": 0, "bytes_downloaded": SIZE}


# --------------------------------------------------------------------------- eviction


def test_least_recently_used_file_is_evicted(tmp_path: Path) -> None:
    cache_dir, record = tmp_path / "cache", tmp_path / "calls.txt"
    limit = 2 * SIZE
    cache = ShardCache(str(cache_dir), limit)
    a, b, c = (f"s3://bucket/shard-{i}.tar" for i in "abc")

    def download(url: str) -> Callable[[str], None]:
        inner = _download(url, str(record))

        def checked(tmp_path: str) -> None:
            inner(tmp_path)
            assert _disk_bytes(cache_dir) <= limit  # the room was made before the download

        return checked

    handle_a = cache.open(a, SIZE, download(a))  # kept open, unread, across its eviction
    cache.open(b, SIZE, download(b)).close()
    assert _disk_bytes(cache_dir) <= limit
    cache.open(c, SIZE, download(c)).close()
    assert _visible(cache_dir) == {cache_name(b): SIZE, cache_name(c): SIZE}
    assert _disk_bytes(cache_dir) <= limit
    assert cache.stats() == {
        "hits": 0,
        "downloads": 3,
        "evictions": 1,
        "bytes_downloaded": 3 * SIZE,
    }
    with handle_a:
        assert handle_a.read() == _payload(a)

    with cache.open(b, SIZE, download(b)) as f:  # a hit: b is now more recent than c
        assert f.read() == _payload(b)
    with cache.open(a, SIZE, download(a)) as f:  # downloaded again; evicts c, not b
        assert f.read() == _payload(a)
    assert _visible(cache_dir) == {cache_name(a): SIZE, cache_name(b): SIZE}
    assert _disk_bytes(cache_dir) <= limit
    assert len(_calls(record)) == 4
    assert cache.stats() == {
        "hits": 1,
        "downloads": 4,
        "evictions": 2,
        "bytes_downloaded": 4 * SIZE,
    }


def test_files_larger_than_the_limit_are_refused(tmp_path: Path) -> None:
    check_cache_limit(limit_bytes=None, largest_file_bytes=1 << 40)
    check_cache_limit(limit_bytes=SIZE, largest_file_bytes=SIZE)
    with pytest.raises(ValueError, match=rf"smaller than one shard.*at least {SIZE + 1} bytes"):
        check_cache_limit(limit_bytes=SIZE, largest_file_bytes=SIZE + 1)
    cache = ShardCache(str(tmp_path / "cache"), SIZE - 1)
    url = "s3://bucket/shard-0.tar"
    with pytest.raises(ValueError, match=rf"at least {SIZE} bytes"):
        cache.open(url, SIZE, _download(url))
    assert _visible(tmp_path / "cache") == {}
    with pytest.raises(ValueError, match=">= 0"):
        ShardCache(str(tmp_path / "cache"), -1)


def test_a_copy_of_the_wrong_size_is_downloaded_again(tmp_path: Path) -> None:
    """The object changed at the source (or a node crash truncated the copy)."""
    cache = ShardCache(str(tmp_path / "cache"), None)
    url = "s3://bucket/shard-0.tar"
    cache.open(url, SIZE // 2, _download(url, size=SIZE // 2)).close()
    with cache.open(url, SIZE, _download(url)) as f:
        assert f.read() == _payload(url)
    assert _visible(tmp_path / "cache") == {cache_name(url): SIZE}
    assert cache.stats()["downloads"] == 2


# --------------------------------------------------------------------------- failures


def test_short_download_raises_and_leaves_nothing(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache = ShardCache(str(cache_dir), 4 * SIZE)
    url = "s3://bucket/shard-0.tar"
    with pytest.raises(OSError, match=rf"s3://bucket/shard-0.tar.*wrote {SIZE - 1} bytes"):
        cache.open(url, SIZE, _download(url, size=SIZE - 1))
    assert _visible(cache_dir) == {}

    def fails(tmp_path: str) -> None:
        raise ConnectionError("the store hung up")

    with pytest.raises(ConnectionError):
        cache.open(url, SIZE, fails)
    assert _visible(cache_dir) == {}
    assert cache.stats()["downloads"] == 0

    with cache.open(url, SIZE, _download(url)) as f:  # the next open retries
        assert f.read() == _payload(url)
    assert cache.stats()["downloads"] == 1


def _open_in_child(cache_dir: str, url: str, limit: int, started: str) -> None:
    cache = ShardCache(cache_dir, limit)

    def hangs(tmp_path: str) -> None:
        with open(tmp_path, "wb") as f:
            f.write(_payload(url)[: SIZE // 2])
        Path(started).touch()
        time.sleep(DEADLINE_SECONDS)

    cache.open(url, SIZE, hangs)


def _kill_mid_download(tmp_path: Path, cache_dir: Path, url: str, limit: int) -> None:
    started = tmp_path / f"started-{cache_name(url)}"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_open_in_child, args=(str(cache_dir), url, limit, str(started)))
    child.start()
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not started.exists():
        assert time.monotonic() < deadline and child.is_alive()
        time.sleep(0.01)
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(DEADLINE_SECONDS)
    assert child.exitcode == -signal.SIGKILL


def test_download_killed_midway_leaves_no_visible_file(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    url = "s3://bucket/shard-0.tar"
    _kill_mid_download(tmp_path, cache_dir, url, 2 * SIZE)
    left = _visible(cache_dir)
    assert cache_name(url) not in left
    assert [name for name in left if name.startswith(".tmp-")] == list(left)  # only its tmp

    cache = ShardCache(str(cache_dir), 2 * SIZE)
    with cache.open(url, SIZE, _download(url)) as f:
        assert f.read() == _payload(url)
    assert _visible(cache_dir) == {cache_name(url): SIZE}  # the dead tmp file is gone


def test_a_killed_download_releases_its_reserved_room(tmp_path: Path) -> None:
    """The dead `.tmp-` file of another URL is not counted as a live download forever."""
    cache_dir, limit = tmp_path / "cache", 2 * SIZE
    _kill_mid_download(tmp_path, cache_dir, "s3://bucket/dead.tar", limit)
    cache = ShardCache(str(cache_dir), limit)
    urls = ["s3://bucket/shard-0.tar", "s3://bucket/shard-1.tar"]
    for url in urls:
        cache.open(url, SIZE, _download(url)).close()
    assert _visible(cache_dir) == {cache_name(url): SIZE for url in urls}
    assert cache.stats()["evictions"] == 0


def test_credentials_stay_out_of_names_errors_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pmc_clip.data.shard_cache")
    secrets = ["AKIDMARKER", "SECRETMARKER", "SIGMARKER", "TOKENMARKER"]
    url = (
        "s3://AKIDMARKER:SECRETMARKER@bucket/path/shard-000001.tar"
        "?X-Amz-Signature=SIGMARKER&token=TOKENMARKER"
    )
    cache_dir = tmp_path / "cache"
    cache = ShardCache(str(cache_dir), 4 * SIZE)
    with pytest.raises(OSError) as failure:
        cache.open(url, SIZE, _download(url, size=1))
    assert "bucket/path/shard-000001.tar" in str(failure.value)
    with cache.open(url, SIZE, _download(url)) as f:
        assert f.read() == _payload(url)
    name = cache_name(url)
    assert name.endswith("-shard-000001.tar") and len(name) < 64
    texts = [str(failure.value), caplog.text, *os.listdir(cache_dir)]
    assert not [secret for secret in secrets for text in texts if secret in text]
    # A credential change is a different URL: a different copy, never a collision.
    assert cache_name(url.replace("SECRETMARKER", "OTHER")) != name


def test_cache_names_are_short_and_safe() -> None:
    assert cache_name("/data/shards/a b?.tar").endswith("-a_b_.tar")
    assert cache_name("zip://inner.tar::s3://K:S@bucket/outer.zip").endswith("-inner.tar")
    assert cache_name("simplecache::s3://bucket/x.tar").endswith("-x.tar")
    assert cache_name("s3://K:S@bucket").endswith("-bucket")
    assert cache_name("s3://bucket/folder/").endswith("-file")
    long = cache_name("s3://bucket/" + "y" * 500 + ".tar")
    assert len(long) <= 117 and long.endswith("y.tar")


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_a_child_forked_during_a_download_does_not_hold_its_lock(tmp_path: Path) -> None:
    """A data-loader worker forked while a thread of its parent downloads must not keep the
    file's lock (and every other opener of that file waiting) for its whole life."""
    cache = ShardCache(str(tmp_path / "cache"), None)
    url = "s3://bucket/shard-0.tar"
    started, forked = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def fails_after_fork(tmp_path: str) -> None:
        started.set()
        forked.wait(DEADLINE_SECONDS)
        raise ConnectionError("the store hung up")

    def first_open() -> None:
        try:
            cache.open(url, SIZE, fails_after_fork)
        except ConnectionError as exc:
            errors.append(exc)

    thread = threading.Thread(target=first_open)
    thread.start()
    assert started.wait(DEADLINE_SECONDS)
    child = multiprocessing.get_context("fork").Process(target=_sleep, args=(DEADLINE_SECONDS,))
    child.start()
    try:
        forked.set()
        thread.join(DEADLINE_SECONDS)
        assert len(errors) == 1
        began = time.monotonic()
        with cache.open(url, SIZE, _download(url)) as f:  # needs the lock the child inherited
            assert f.read() == _payload(url)
        assert time.monotonic() - began < DEADLINE_SECONDS / 2
        assert child.is_alive()
    finally:
        child.kill()
        child.join(DEADLINE_SECONDS)

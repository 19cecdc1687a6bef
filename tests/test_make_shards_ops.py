"""make_shards under operational faults (issue 13): a rerun after the input or the output
changed, durable publishing, one run per output, a full or read-only disk, a missing
bucket or wrong credentials, staged uploads of a killed run, Ctrl-C."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from helpers_data import killed_process_owner, make_figures
from PIL import Image

from pmc_clip import process_owner, storage
from pmc_clip.sharding import lock as output_lock
from pmc_clip.sharding.cli import main
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.run import make_shards

REPO = Path(__file__).resolve().parent.parent


def _dataset(root: Path, num_articles: int = 2, max_side: int = 24) -> tuple[Path, Path]:
    """`num_articles` x 4 small figures and their rows (pmc_oa.jsonl)."""
    jsonl, images = make_figures(root, num_articles, min_side=16, max_side=max_side)
    return Path(jsonl), Path(images)


def _options(jsonl: Path, images: Path, output: Path | str, **overrides: Any) -> ShardOptions:
    """One `train` split in plan order (no shuffle): row i is at plan position i."""
    settings: dict[str, Any] = {
        "input": str(jsonl),
        "images": str(images),
        "output": str(output),
        "shard_size": 2,
        "split_fractions": (("train", 1.0),),
        "upload_backoff_seconds": 0.01,
    }
    return ShardOptions(**(settings | overrides))


def _argv(options: ShardOptions, *extra: str) -> list[str]:
    return [
        "--input", options.input, "--images", options.images, "--output", options.output,
        "--shard-size", str(options.shard_size), "--split-fractions", "train=1.0",
        "--upload-max-attempts", "2", "--upload-backoff-seconds", "0.01", *extra,
    ]  # fmt: skip


def _cli(options: ShardOptions, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "make_shards.py"), *_argv(options, *extra)]


def _files(out: Path) -> dict[str, bytes]:
    """Shards, indexes and listings by name (not the progress records)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def _rewrite_rows(jsonl: Path, change: dict[int, dict[str, Any]]) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for i, fields in change.items():
        rows[i].update(fields)
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("make_shards: error")]


# --------------------------------------------------------------------------- resume


def test_a_rerun_after_the_input_changed_rewrites_from_the_first_changed_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, images = _dataset(tmp_path)
    out = tmp_path / "out"
    make_shards(_options(jsonl, images, out))
    before = _stats(out)
    assert len(before) == 4

    # A caption of row 5 (shard 2) edited: shards 0 and 1 are kept, 2 and 3 rewritten.
    _rewrite_rows(jsonl, {5: {"caption": "An edited caption."}})
    make_shards(_options(jsonl, images, out))
    err = capsys.readouterr().err
    assert "pmc-oa-train-000002.tar: its input rows changed since it was written" in err
    assert "rewriting it and the 1 shard(s) after it" in err
    after = _stats(out)
    for name in ("pmc-oa-train-000000.tar", "pmc-oa-train-000001.tar"):
        assert after[name] == before[name], f"{name} was rewritten"
    assert b"An edited caption." in (out / "pmc-oa-train-000002.tar").read_bytes()

    # The figure of row 0 replaced under the same name: everything from shard 0 is redone.
    figure = images / json.loads(jsonl.read_text().splitlines()[0])["image"]
    replacement = Image.new("RGB", (20, 20), "red")
    replacement.save(figure, format=Image.open(figure).format)
    make_shards(_options(jsonl, images, out))
    assert "pmc-oa-train-000000.tar: one of its figures changed" in capsys.readouterr().err
    assert figure.read_bytes() in (out / "pmc-oa-train-000000.tar").read_bytes()

    # The output is now what a fresh run over the changed input makes, byte for byte.
    fresh = tmp_path / "fresh"
    make_shards(_options(jsonl, images, fresh))
    assert _files(out).keys() == _files(fresh).keys()
    for name, data in _files(fresh).items():
        if name != "manifest.json":  # names its own --output
            assert _files(out)[name] == data, name
    # Nothing changed: nothing is rewritten.
    kept = _stats(out)
    make_shards(_options(jsonl, images, out))
    assert _stats(out) == kept and "rewriting" not in capsys.readouterr().err


def test_a_deleted_truncated_or_unindexed_shard_is_rewritten_with_those_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, images = _dataset(tmp_path)
    out = tmp_path / "out"
    options = _options(jsonl, images, out)
    make_shards(options)
    reference = _files(out)
    damages = {
        "pmc-oa-train-000001.tar: the recorded shard is missing": lambda: (
            out / "pmc-oa-train-000001.tar"
        ).unlink(),
        "pmc-oa-train-000002.tar: the shard changed since it was recorded": lambda: os.truncate(
            out / "pmc-oa-train-000002.tar", 1024
        ),
        "pmc-oa-train-000003.tar: its index pmc-oa-train-000003.idx is missing": lambda: (
            out / "pmc-oa-train-000003.idx"
        ).unlink(),
    }
    for message, damage in damages.items():
        damage()
        make_shards(options)
        assert message in capsys.readouterr().err
        assert _files(out) == reference, message
    # A shard rewritten in place with its old size (a replaced file) is found too.
    victim = out / "pmc-oa-train-000000.tar"
    victim.write_bytes(victim.read_bytes())
    make_shards(options)
    assert "pmc-oa-train-000000.tar: the shard changed" in capsys.readouterr().err
    assert _files(out) == reference


def test_local_publishing_syncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1)
    out = tmp_path / "out"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    make_shards(_options(jsonl, images, out))
    published = [e for e in events if e[0] == "replace"]
    names = {Path(e[1].split(" -> ")[1]).name for e in published}
    assert {"pmc-oa-train-000000.tar", "pmc-oa-train-000000.idx", "manifest.json"} <= names
    assert "pmc-oa-train-000000.tar.json" in names  # the progress record
    for i, (_, move) in enumerate(events):
        if events[i][0] != "replace":
            continue
        staged, dest = move.split(" -> ")
        assert events[i - 1] == ("fsync", staged), move
        assert events[i + 1] == ("fsync", os.path.dirname(dest)), move


# --------------------------------------------------------------------------- one run


_HOLD_LOCK = """
import sys, time
from pmc_clip import storage
from pmc_clip.sharding import lock as output_lock
fs, root = storage.url_to_fs(sys.argv[1])
with output_lock.OutputLock(fs, root + "/_progress", sys.argv[1], storage.RetryPolicy()):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture()
def lock_holder() -> Iterator[Any]:
    """Start a process holding the lock of an output; killed afterwards."""
    procs: list[subprocess.Popen[str]] = []

    def start(output: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, output],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_run_on_a_local_output_stops_naming_the_first_and_a_killed_one_blocks_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lock_holder: Any
) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1)
    out = tmp_path / "out"
    holder = lock_holder(str(out))
    assert main(_argv(_options(jsonl, images, out))) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == err.splitlines(), err
    assert (
        f"--output {out} is in use by another make_shards run (pid {holder.pid} on host "
        f"{socket.gethostname()}, started " in err
    )
    assert not list(out.glob("*.tar"))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert main(_argv(_options(jsonl, images, out))) == 0
    assert len(list(out.glob("*.tar"))) == 2


def _put_lock(url: str, host: str, pid: int, pid_start: str | None = None) -> None:
    holder = {"host": host, "pid": pid, "pid_start": pid_start, "started": "then", "token": "x"}
    fsspec.filesystem("s3", skip_instance_cache=True).pipe_file(url, json.dumps(holder).encode())


def test_an_s3_output_lock_is_refused_while_live_and_taken_over_once_stale(
    tmp_path: Path,
    s3_bucket: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1)
    output = f"{s3_bucket}/shards"
    lock = f"{output}/_progress/lock.json"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)

    # Held by a run on another host, renewed recently: refused, naming it and the expiry.
    _put_lock(lock, "other-host", 4242)
    assert main(_argv(_options(jsonl, images, output))) == 2
    err = capsys.readouterr().err
    assert "is in use by another make_shards run (pid 4242 on host other-host" in err
    assert "its lock expires at " in err and f"(or delete {lock})" in err
    assert not fs.exists(f"{output}/pmc-oa-train-000000.tar")

    # The same lock, not renewed for longer than the expiry: taken over, removed at the end.
    monkeypatch.setattr(output_lock, "EXPIRY_SECONDS", 0.0)
    assert main(_argv(_options(jsonl, images, output))) == 0
    assert "taking over the stale lock" in capsys.readouterr().err
    assert fs.exists(f"{output}/pmc-oa-train-000001.tar") and not fs.exists(lock)

    # Held by a process of this host that has ended (kill -9): taken over at once.
    monkeypatch.setattr(output_lock, "EXPIRY_SECONDS", 600.0)
    dead = killed_process_owner()
    _put_lock(lock, dead.host, dead.pid, dead.start)
    assert main(_argv(_options(jsonl, images, output))) == 0
    assert f"pid {dead.pid} on host {dead.host}" in capsys.readouterr().err


def test_a_run_whose_s3_lock_was_taken_over_learns_it_at_its_next_renewal(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output_lock, "HEARTBEAT_SECONDS", 0.05)
    fs, root = storage.url_to_fs(f"{s3_bucket}/out")
    lock_url = f"{s3_bucket}/out/_progress/lock.json"
    with output_lock.OutputLock(fs, f"{root}/_progress", root, storage.RetryPolicy()) as lock:
        time.sleep(0.3)
        lock.check()  # renewed several times, still ours
        _put_lock(lock_url, "other-host", 4242)  # a run that took it for stale
        deadline = time.monotonic() + 10
        with pytest.raises(storage.StorageError, match="was taken over by another run"):
            while time.monotonic() < deadline:
                lock.check()
                time.sleep(0.05)
    assert json.loads(fs.cat_file(lock_url))["host"] == "other-host"  # left to its holder


# --------------------------------------------------------------------------- faults


def _limit_file_size() -> None:
    """In the child: files may not grow past 4 KiB (EFBIG, as a full disk gives ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_full_disk_on_the_output_stops_in_one_line_and_the_rerun_resumes(
    tmp_path: Path,
) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1, max_side=48)
    out = tmp_path / "out"
    options = _options(jsonl, images, out)
    result = subprocess.run(
        _cli(options, "--workers", "0"),
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"make_shards: error: write {out}/pmc-oa-train-000000.tar: ")
    assert "File too large" in lines[0] and "rerun the same command to resume" in lines[0]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert main(_argv(options)) == 0
    assert len(list(out.glob("*.tar"))) == 2


@pytest.fixture()
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder that cannot be written: a read-only bind mount as root (who may write
    anywhere chmod forbids), else chmod 555."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", str(folder), str(folder)]).returncode:
            pytest.skip("no bind mount here, and chmod does not bind root")
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)]).returncode:
            subprocess.run(["umount", str(folder)], check=True)
            pytest.skip("no read-only remount here, and chmod does not bind root")
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def test_a_read_only_output_is_a_start_up_error(
    tmp_path: Path, read_only_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1)
    assert main(_argv(_options(jsonl, images, read_only_folder / "out"))) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == err.splitlines() and len(err.splitlines()) == 1, err
    assert f"--output {read_only_folder}/out cannot be written (" in err


def test_a_missing_bucket_or_wrong_credentials_is_a_start_up_error(
    tmp_path: Path,
    s3_bucket: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1)
    missing = "s3://no-such-bucket-for-shards/out"
    assert main(_argv(_options(jsonl, images, missing))) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--output {missing} cannot be written (" in err, err

    # The moto server checks signatures from here on: our keys are unknown to it.
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    output = f"{s3_bucket}/out"
    assert main(_argv(_options(jsonl, images, output))) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--output {output} cannot be written (" in err, err
    assert "InvalidAccessKeyId" in err or "PermissionError" in err, err
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err


def test_staged_uploads_of_killed_runs_are_removed_and_no_one_elses(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    jsonl, images = _dataset(tmp_path, num_articles=1)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    dead = killed_process_owner()
    staged = {
        "killed": f"pmc_clip-upload+{dead.tag()}+k1",
        "live": f"pmc_clip-upload+{process_owner.ProcessOwner.current().tag()}+l1",
        "other host": f"pmc_clip-upload+elsewhere+{dead.pid}+{dead.start}+o1",
        "not ours": "pmc_clip-upload-abc",
    }
    for name in staged.values():
        (temp / name).write_bytes(b"half an upload")
    make_shards(_options(jsonl, images, f"{s3_bucket}/out"))
    left = {p.name for p in temp.iterdir()}
    assert left == {staged["live"], staged["other host"], staged["not ours"]}


@pytest.mark.parametrize(
    ("stop_signal", "exit_code", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")],
)
def test_ctrl_c_or_sigterm_exits_in_one_line_and_the_rerun_resumes(
    tmp_path: Path, stop_signal: signal.Signals, exit_code: int, said: str
) -> None:
    """Ctrl-C, or SIGTERM as SLURM sends it to every process of a cancelled job (or one
    at its --time): one line, the pool stopped, staged files removed, the lock released."""
    jsonl, images = _dataset(tmp_path, num_articles=24, max_side=96)
    out = tmp_path / "out"
    options = _options(jsonl, images, out)
    # Its own session: the signal to the group reaches the workers too, as a terminal's does.
    proc = subprocess.Popen(
        _cli(options, "--workers", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not list((out / "_progress").glob("*.tar.json")):
        assert proc.poll() is None, "finished before Ctrl-C"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, stop_signal)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == exit_code, err
    assert err.splitlines() == [
        f"make_shards: {said}; finished shards are recorded in _progress/: rerun the "
        "same command to resume"
    ], err
    assert not (out / "manifest.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert main(_argv(options)) == 0
    fresh = tmp_path / "fresh"
    make_shards(_options(jsonl, images, fresh))
    for name, data in _files(fresh).items():
        if name != "manifest.json":
            assert _files(out)[name] == data, name

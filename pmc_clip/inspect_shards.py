"""Check shards against their manifest and show a few samples.

    python tools/inspect_shards.py shards/                 # verify every shard, show 3 samples
    python tools/inspect_shards.py s3://bucket/pmc-oa --samples 5 --no-verify
    python tools/inspect_shards.py shards/ --extract out/ --samples 10

Verification reads every shard named in manifest.json and checks its size, sha256,
member names (key.ext, no folders, no dots in keys), sample count and its sample index
(`.idx`, rebuilt from the shard and compared). Extraction writes
members of the first samples into a folder; a member name that would land outside it
(absolute, '..', a link) is refused. Shard content is only ever read as bytes: nothing
is unpickled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from pmc_clip import shard_index, storage

_MAX_CAPTION_CHARS_SHOWN = 160


@dataclass
class ShardReport:
    name: str
    problems: list[str]
    num_samples: int


def iter_members(fileobj: Any) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """(member, bytes) of the regular files of a tar stream, read sequentially."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                yield member, b""
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            yield member, extracted.read()


def member_problem(name: str) -> str | None:
    if name.startswith("/") or ".." in name.split("/") or "/" in name:
        return f"member {name!r} has a folder or escapes the shard"
    if "." not in name:
        return f"member {name!r} has no extension"
    return None


def verify_shard(fs: fsspec.AbstractFileSystem, root: str, entry: dict[str, Any]) -> ShardReport:
    name = entry["name"]
    problems: list[str] = []
    digest = hashlib.sha256()
    keys: set[str] = set()
    path = storage.join(root, name)
    try:
        with fs.open(path, "rb") as raw:
            hashing = _HashingReader(raw, digest)
            for member, _ in iter_members(hashing):
                if not member.isfile():
                    problems.append(f"member {member.name!r} is not a regular file")
                    continue
                problem = member_problem(member.name)
                if problem:
                    problems.append(problem)
                keys.add(member.name.split(".", 1)[0])
            hashing.drain()
    except FileNotFoundError:
        return ShardReport(name, ["missing"], 0)
    except tarfile.TarError as e:
        return ShardReport(name, [f"not a readable tar: {e}"], len(keys))
    if hashing.num_bytes != entry["bytes"]:
        problems.append(f"{hashing.num_bytes} bytes, manifest says {entry['bytes']}")
    if digest.hexdigest() != entry["sha256"]:
        problems.append("sha256 differs from the manifest")
    if len(keys) != entry["count"]:
        problems.append(f"{len(keys)} samples, manifest says {entry['count']}")
    index_problem = verify_index(fs, path, hashing.num_bytes)
    if index_problem:
        problems.append(index_problem)
    return ShardReport(name, problems, len(keys))


def verify_index(fs: fsspec.AbstractFileSystem, shard_path: str, num_bytes: int) -> str | None:
    """What is wrong with the shard's `.idx` file, or None: it must exist and equal the
    index rebuilt from the shard (a second read of it)."""
    path = shard_index.index_url(shard_path)
    name = posixpath.basename(path)
    try:
        stored = shard_index.read_index(fs, path, name)
    except FileNotFoundError:
        return f"index {name} is missing; build it with: {shard_index.INDEX_TOOL} 'SHARDS'"
    except ValueError as e:
        return str(e)
    with fs.open(shard_path, "rb") as raw:
        try:
            rebuilt = shard_index.build_index(raw, num_bytes)
        except ValueError as e:
            return f"cannot be indexed: {e}"
    if rebuilt != stored:
        return f"index {name} does not match the shard; {shard_index.REBUILD_HINT}"
    return None


class _HashingReader:
    """A read-only file wrapper that hashes and counts every byte read through it."""

    def __init__(self, raw: Any, digest: Any) -> None:
        self.raw, self.digest, self.num_bytes = raw, digest, 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.raw.read(size)
        self.digest.update(data)
        self.num_bytes += len(data)
        return data

    def drain(self) -> None:
        """tarfile stops at the end-of-archive marker; hash the padding after it too."""
        while self.read(1 << 20):
            pass


def show_samples(
    fs: fsspec.AbstractFileSystem, root: str, names: list[str], num_samples: int,
    extract_dir: str | None,
) -> None:  # fmt: skip
    shown: dict[str, dict[str, bytes]] = {}
    for name in names:
        with fs.open(storage.join(root, name), "rb") as raw:
            for member, data in iter_members(raw):
                if not member.isfile() or member_problem(member.name):
                    continue
                key, ext = member.name.split(".", 1)
                if key not in shown and len(shown) == num_samples:
                    break
                shown.setdefault(key, {})[ext] = data
        if len(shown) == num_samples:
            break
    for key, members in shown.items():
        caption = members.get("txt", b"").decode("utf-8", "replace")
        if len(caption) > _MAX_CAPTION_CHARS_SHOWN:
            caption = caption[:_MAX_CAPTION_CHARS_SHOWN] + "..."
        meta = json.loads(members.get("json", b"{}"))
        sizes = ", ".join(f"{ext}: {len(data)} B" for ext, data in sorted(members.items()))
        print(f"{key}  [{sizes}]  {meta.get('width')}x{meta.get('height')}")
        print(f"    {caption}")
        if extract_dir is not None:
            for ext, data in members.items():
                _extract(extract_dir, f"{key}.{ext}", data)


def _extract(folder: str, member_name: str, data: bytes) -> None:
    target = os.path.realpath(os.path.join(folder, member_name))
    if os.path.dirname(target) != os.path.realpath(folder):
        raise ValueError(f"refusing to extract {member_name!r}: it would land outside {folder}")
    os.makedirs(folder, exist_ok=True)
    with open(target, "wb") as f:
        f.write(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify shards against manifest.json.")
    parser.add_argument("shards", help="folder or URL holding manifest.json and the shards")
    parser.add_argument("--samples", type=int, default=3, help="samples to print")
    parser.add_argument("--no-verify", action="store_true", help="skip size/sha256 checks")
    parser.add_argument("--extract", default=None, help="write the printed samples here")
    args = parser.parse_args(argv)
    fs, root = storage.url_to_fs(args.shards)
    where = storage.redact_url(args.shards)
    try:
        manifest = json.loads(storage.read_bytes(fs, storage.join(root, "manifest.json")))
    except FileNotFoundError:
        print(f"inspect_shards: error: no manifest.json in {where}", file=sys.stderr)
        return 2
    entries = manifest["shards"]
    num_bad = 0
    if not args.no_verify:
        for entry in entries:
            report = verify_shard(fs, root, entry)
            if report.problems:
                num_bad += 1
                print(f"BAD {report.name}: {'; '.join(report.problems)}")
        print(f"verified {len(entries)} shards: {len(entries) - num_bad} ok, {num_bad} bad")
    show_samples(fs, root, [e["name"] for e in entries], args.samples, args.extract)
    return 1 if num_bad else 0


if __name__ == "__main__":
    sys.exit(main())

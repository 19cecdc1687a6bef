"""Check shards against their manifest and show a few samples.

    python tools/inspect_shards.py shards/                 # verify every shard, show 3 samples
    python tools/inspect_shards.py s3://bucket/pmc-oa --samples 5 --no-verify
    python tools/inspect_shards.py shards/ --extract out/ --samples 10

Verification reads every shard named in manifest.json and checks its size, sha256,
member names (key.ext, no folders, no dots in keys), sample count and its sample index
(`.idx`, rebuilt from the shard and compared), and runs every sample through the loader's
own reading and decoding (`data.group_samples`, `data.SampleProcessor`): a member over
`--max-member-bytes`, a missing image or caption, an image PIL cannot decode, a caption
that is not UTF-8 or is blank, a `.json` that does not parse, a key used twice (in a shard
or across shards), a member whose header claims more bytes than the shard holds. So "ok"
means the loader reads every sample. One line per problem, naming the shard and the key;
exit code 1 when any shard is not ok. Extraction writes members of the first samples
into a folder; a member name that would land outside it (absolute, '..', a link) is
refused. Shard content is only ever read as bytes, within the size limit: nothing is
unpickled.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import posixpath
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from pmc_clip import metrics, shard_index, storage
from pmc_clip.config import DataConfig
from pmc_clip.data.decode import SampleProcessor
from pmc_clip.data.eval_stages import group_samples
from pmc_clip.model.config import ModelConfig
from pmc_clip.shard_index import TarMember
from pmc_clip.sharding.format import MANIFEST_FILE, ShardEntry, read_shard_entries

_MAX_CAPTION_CHARS_SHOWN = 160


@dataclass
class ShardReport:
    name: str
    problems: list[str]  # one line each, naming the key where a sample is at fault
    num_samples: int


def member_problem(name: str) -> str | None:
    if name.startswith("/") or ".." in name.split("/") or "/" in name:
        return f"member {name!r} has a folder or escapes the shard"
    if "." not in name:
        return f"member {name!r} has no extension"
    return None


def verify_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    entry: ShardEntry,
    max_member_bytes: int = DataConfig.max_member_bytes,
    shard_of_key: dict[str, str] | None = None,
) -> ShardReport:
    """Everything wrong with one shard of the manifest. `shard_of_key` (key -> shard
    name) collects the keys of the shards verified so far, to find a key in two."""
    name = entry.name
    shard_of_key = {} if shard_of_key is None else shard_of_key
    problems: list[str] = []
    digest = hashlib.sha256()
    path = storage.join(root, name)
    # Any input size runs the loader's decode and crop: the default model's.
    check = SampleProcessor(ModelConfig.image_size, None)
    num_samples = 0

    def named_members(members: Iterable[TarMember]) -> Iterator[TarMember]:
        for member in members:
            if not member.info.isfile():
                problems.append(f"member {member.name!r} is not a regular file")
            elif problem := member_problem(member.name):
                problems.append(problem)
            elif "." in member.extension and member.key is not None:
                problems.append(
                    f"{member.key!r}: member {member.name!r} is read as key {member.key!r} "
                    f"with extension {member.extension!r} (a key must not contain a dot)"
                )
            yield member

    try:
        shard_bytes = int(fs.size(path))
        with fs.open(path, "rb") as raw:
            hashing = _HashingReader(raw, digest)
            with tarfile.open(fileobj=hashing, mode="r|") as tar:  # type: ignore[call-overload]
                members = named_members(shard_index.tar_members(tar, shard_bytes))
                for sample in group_samples(members, name, max_member_bytes):
                    num_samples += 1
                    problems += sample_problems(sample, check)
                    key = sample["__key__"]
                    if shard_of_key.setdefault(key, name) != name:
                        problems.append(f"{key!r}: key also in {shard_of_key[key]}")
                    shard_of_key[key] = name  # a second sample of it here is found next time
            hashing.drain()
    except FileNotFoundError:
        return ShardReport(name, ["missing"], 0)
    except (tarfile.TarError, ValueError) as e:
        problems.append(f"unreadable after {num_samples} samples: {e}")
        return ShardReport(name, problems, num_samples)
    if hashing.num_bytes != entry.bytes:
        problems.append(f"{hashing.num_bytes} bytes, manifest says {entry.bytes}")
    if digest.hexdigest() != entry.sha256:
        problems.append("sha256 differs from the manifest")
    if num_samples != entry.count:
        problems.append(f"{num_samples} samples, manifest says {entry.count}")
    index_problem = verify_index(fs, path, hashing.num_bytes)
    if index_problem:
        problems.append(index_problem)
    return ShardReport(name, problems, num_samples)


def sample_problems(sample: dict[str, Any], check: SampleProcessor) -> list[str]:
    """What the loader would find wrong with a sample (it would drop it or substitute it),
    and a `.json` member that does not parse."""
    key = sample["__key__"]
    problems = []
    try:
        check(sample, np.random.default_rng(0))
    except Exception as e:  # what data.SampleDecoder counts as a bad sample
        problems.append(f"{key!r}: {type(e).__name__}: {e}")
    if "json" in sample:
        try:
            json.loads(sample["json"])
        except ValueError as e:
            problems.append(f"{key!r}: its .json member does not parse: {e}")
    return problems


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
    fs: fsspec.AbstractFileSystem,
    root: str,
    names: list[str],
    *,
    num_samples: int,
    extract_dir: str | None,
    max_member_bytes: int,
) -> None:
    """Print (and extract) the first samples, as the loader reads them (members over the
    size limit and members it drops are not read)."""
    shown: list[dict[str, Any]] = []
    for name in names:
        if len(shown) == num_samples:
            break
        path = storage.join(root, name)
        try:
            with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                members = shard_index.tar_members(tar, int(fs.size(path)))
                samples = group_samples(members, name, max_member_bytes)
                for sample in itertools.islice(samples, num_samples - len(shown)):
                    if not member_problem(f"{sample['__key__']}.x"):
                        shown.append(sample)
        except (OSError, tarfile.TarError, ValueError) as e:
            print(f"cannot show the samples of {name}: {e}", file=sys.stderr)
    for sample in shown:
        key = sample["__key__"]
        parts = {ext: data for ext, data in sample.items() if not ext.startswith("__")}
        caption = parts.get("txt", b"").decode("utf-8", "replace")
        if len(caption) > _MAX_CAPTION_CHARS_SHOWN:
            caption = caption[:_MAX_CAPTION_CHARS_SHOWN] + "..."
        try:
            meta = json.loads(parts.get("json", b"{}"))
        except ValueError:
            meta = {}
        sizes = ", ".join(f"{ext}: {len(data)} B" for ext, data in sorted(parts.items()))
        print(f"{key}  [{sizes}]  {meta.get('width')}x{meta.get('height')}")
        print(f"    {caption}")
        if extract_dir is not None:
            for ext, data in parts.items():
                _extract(extract_dir, f"{key}.{ext}", data)


def _extract(folder: str, member_name: str, data: bytes) -> None:
    target = os.path.realpath(os.path.join(folder, member_name))
    if os.path.dirname(target) != os.path.realpath(folder):
        raise ValueError(f"refusing to extract {member_name!r}: it would land outside {folder}")
    os.makedirs(folder, exist_ok=True)
    with open(target, "wb") as f:
        f.write(data)


def main(argv: Sequence[str] | None = None) -> int:
    metrics.install_secret_filter(argv)
    parser = argparse.ArgumentParser(description="Verify shards against manifest.json.")
    parser.add_argument("shards", help="folder or URL holding manifest.json and the shards")
    parser.add_argument("--samples", type=int, default=3, help="samples to print")
    parser.add_argument("--no-verify", action="store_true", help="skip size/sha256 checks")
    parser.add_argument("--extract", default=None, help="write the printed samples here")
    parser.add_argument(
        "--max-member-bytes",
        type=int,
        default=DataConfig.max_member_bytes,
        help="the loader's limit (--max-member-bytes of training): larger members are flagged",
    )
    args = parser.parse_args(argv)
    fs, root = storage.url_to_fs(args.shards)
    where = storage.redact_url(args.shards)
    try:
        entries = read_shard_entries(fs, root)
    except FileNotFoundError:
        print(f"inspect_shards: error: no {MANIFEST_FILE} in {where}", file=sys.stderr)
        return 2
    num_bad = 0
    if not args.no_verify:
        shard_of_key: dict[str, str] = {}
        for entry in entries:
            report = verify_shard(fs, root, entry, args.max_member_bytes, shard_of_key)
            if report.problems:
                num_bad += 1
                for problem in report.problems:
                    print(f"BAD {report.name}: {problem}")
        print(f"verified {len(entries)} shards: {len(entries) - num_bad} ok, {num_bad} bad")
    names = [e.name for e in entries]
    show_samples(
        fs,
        root,
        names,
        num_samples=args.samples,
        extract_dir=args.extract,
        max_member_bytes=args.max_member_bytes,
    )
    return 1 if num_bad else 0


if __name__ == "__main__":
    sys.exit(main())

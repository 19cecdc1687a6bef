"""Resume: which finished shards a rerun keeps, from the records in `_progress/`.

Each finished shard gets a record (`ShardRecord`) *after* the shard itself is in place
(renamed, or uploaded) and, locally, synced to disk with its folder, so a power cut cannot
leave a recorded but short shard. Shard boundaries depend only on the input and the
options, so a rerun after a crash continues after the last recorded shard and yields the
same bytes as an uninterrupted run. A shard without its record is simply rewritten. A
record is trusted only while the shard's input is unchanged (its rows and its figures'
size and mtime/ETag/CRC, from one listing of --images: `input_digests`) and its file is
the one recorded (size and mtime, or ETag): else that shard and every later one of its
split are deleted and rewritten, with a line saying why (`load_progress`). Other options
than the recorded ones are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import fsspec

from pmc_clip import storage
from pmc_clip.sharding import identities
from pmc_clip.sharding.format import (
    PART_SUMMARY,
    PROGRESS_DIR,
    ShardRecord,
    index_name,
    merged_listing_paths,
    shard_name,
)
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.plan import PlannedSample
from pmc_clip.sharding.store import (
    delete,
    delete_present,
    exists,
    list_folder,
    read_json,
    retried,
    write_json,
)


def input_digests(
    samples: Sequence[PlannedSample], figures: dict[str, str], *, start: int, end: int
) -> tuple[str, str]:
    """(rows, figures) sha256 of plan positions [start, end): every field of each planned
    sample (row, key, caption, metadata...), and each figure's identity (size and
    mtime/ETag/CRC from `figures`; absent ones as such). Whether `end` is the split's end
    counts too: the last shard closes there, so its boundary depends on the split's length."""
    rows, identities = hashlib.sha256(), hashlib.sha256()
    for sample in samples[start:end]:
        rows.update(json.dumps(vars(sample), sort_keys=True).encode() + b"\n")
        identity = figures.get(sample.image, "absent")
        identities.update(json.dumps([sample.image, identity]).encode() + b"\n")
    if end == len(samples):
        rows.update(b"end of split\n")
    return rows.hexdigest(), identities.hexdigest()


def load_progress(
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    options: ShardOptions,
    *,
    samples_by_split: dict[str, list[PlannedSample]],
    figures: dict[str, str],
) -> tuple[dict[str, list[ShardRecord]], dict[str, list[dict[str, Any]]]]:
    """Finished shards per split (the contiguous prefix with records, each still valid)
    and the trailing skips of splits already complete. Refuses to resume over other
    options.

    A recorded shard is reused only while what it was made from is unchanged (its rows'
    fields and its figures' identities: `input_digests`) and its file is the one recorded
    (size and mtime/inode locally, size and ETag on object stores, from one listing). The
    first one that is not, and every later one of its split, is deleted and rewritten.
    The full sha256 is not recomputed (130 x 1 GB shards on S3 would be read again on
    every rerun): `tools/inspect_shards.py` checks it against the manifest."""
    retry = options.retry_policy()
    progress_root = options.progress_folder(out_root)
    # One options.json for every part of an output: parts made with other options, or a
    # part run over a whole run's output (or the reverse), are refused here.
    options_path = storage.join(out_root, PROGRESS_DIR, "options.json")
    wanted = options.fingerprint()
    if exists(out_fs, options_path, retry):
        found = read_json(out_fs, options_path, retry)
        if found != wanted:
            changed = sorted(
                k for k in wanted.keys() | found.keys() if found.get(k) != wanted.get(k)
            )
            raise ValueError(
                f"--output {storage.redact_url(options.output)} holds shards made with other "
                f"options ({', '.join(changed)}); rerun with the same options to resume, or "
                "choose an empty --output"
            )
    else:
        write_json(out_fs, options_path, wanted, retry)
    listed = {path.rsplit("/", 1)[-1] for path in list_folder(out_fs, progress_root, retry)}
    part = re.escape(options.shard_stem("")[len(options.prefix) + 1 :])
    record_name = re.compile(
        rf"^{re.escape(options.prefix)}-(?P<split>[A-Za-z0-9_-]+){part}-\d{{6}}\.tar\.json$"
    )
    recorded_splits = {m["split"] for name in listed if (m := record_name.match(name))}
    records: dict[str, list[ShardRecord]] = {}
    for split in sorted(recorded_splits | samples_by_split.keys()):
        records[split] = []
        stem = options.shard_stem(split)
        while (name := shard_name(stem, len(records[split]))) + ".json" in listed:
            path = storage.join(progress_root, name + ".json")
            records[split].append(ShardRecord(**read_json(out_fs, path, retry)))
    wanted_files = [
        name for rs in records.values() for r in rs for name in (r.name, index_name(r.name))
    ]
    stored = retried(
        out_fs,
        retry,
        "list",
        out_root,
        lambda: identities.file_identities(out_fs, out_root, wanted_files),
    )
    done: dict[str, list[ShardRecord]] = {}
    tails: dict[str, list[dict[str, Any]]] = {}
    for split, split_records in records.items():
        samples = samples_by_split.get(split, [])
        num_valid, reason = _first_stale(split_records, samples, figures=figures, stored=stored)
        tail_path = storage.join(progress_root, f"{split}.complete.json")
        tail = None
        if f"{split}.complete.json" in listed:
            tail = read_json(out_fs, tail_path, retry)
        if num_valid < len(split_records):
            print(
                f"make_shards: {split_records[num_valid].name}: {reason}; rewriting it and "
                f"the {len(split_records) - num_valid - 1} shard(s) after it",
                file=sys.stderr,
            )
            discard_shards(out_fs, out_root, options, split=split, first=num_valid, retry=retry)
        elif tail is not None and not _tail_matches(tail, split_records, samples, figures):
            delete(out_fs, tail_path, retry)
        elif tail is not None:
            tails[split] = tail["skipped"]
        done[split] = split_records[:num_valid]
    return done, tails


def _first_stale(
    records: list[ShardRecord],
    samples: list[PlannedSample],
    *,
    figures: dict[str, str],
    stored: dict[str, str],
) -> tuple[int, str]:
    """(index of the first record that cannot be reused, why); len(records) if none."""
    for i, record in enumerate(records):
        rows_sha256, figures_sha256 = input_digests(
            samples, figures, start=record.start, end=record.end
        )
        if record.rows_sha256 != rows_sha256:
            reason = (
                "its input rows changed since it was written (a caption or another field, "
                "or rows added, removed or reordered)"
            )
        elif record.figures_sha256 != figures_sha256:
            reason = "one of its figures changed since it was written (size, mtime, ETag or CRC)"
        elif (problem := stored_problem(record, stored)) is not None:
            reason = problem
        else:
            continue
        return i, reason
    return len(records), ""


def stored_problem(record: ShardRecord, stored: dict[str, str]) -> str | None:
    """What is wrong with `record`'s shard in the output (`stored`: identities from one
    listing, identities.file_identities): missing, changed since it was recorded, or
    without its index; None when it is as recorded. Resume and --merge both ask."""
    if record.name not in stored:
        return "the recorded shard is missing"
    if stored[record.name] != record.stored:
        return (
            f"the shard changed since it was recorded ({record.stored} then, "
            f"{stored[record.name]} now)"
        )
    if index_name(record.name) not in stored:
        return f"its index {index_name(record.name)} is missing"
    return None


def _tail_matches(
    tail: dict[str, Any],
    records: list[ShardRecord],
    samples: list[PlannedSample],
    figures: dict[str, str],
) -> bool:
    """Whether a split's complete.json (rows skipped after its last shard) still holds."""
    start = records[-1].end if records else 0
    digests = input_digests(samples, figures, start=start, end=len(samples))
    return tail.get("start") == start and tail.get("sha256") == list(digests)


def discard_shards(
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    options: ShardOptions,
    *,
    split: str,
    first: int,
    retry: storage.RetryPolicy,
) -> None:
    """Delete `split`'s shards from index `first` on, with their indexes and records, and
    what lists them (`listing_paths`, the split's complete.json). Listings and records go
    first: a crash in between leaves unrecorded files, which the rerun rewrites, never a
    record or manifest naming a shard that is gone."""
    progress_root = options.progress_folder(out_root)
    stem = re.escape(options.shard_stem(split))
    file_name = re.compile(rf"^{stem}-(?P<index>\d{{6}})\.(tar|idx)(\.json)?$")

    def doomed(folder: str) -> list[str]:
        return sorted(
            path
            for path in list_folder(out_fs, folder, retry)
            if (m := file_name.match(path.rsplit("/", 1)[-1])) and int(m["index"]) >= first
        )

    tail = storage.join(progress_root, f"{split}.complete.json")
    delete_present(out_fs, [*listing_paths(out_root, options), tail], retry)
    for path in [*doomed(progress_root), *doomed(out_root)]:  # listed: they exist
        delete(out_fs, path, retry)


def listing_paths(out_root: str, options: ShardOptions) -> list[str]:
    """What lists shards: the output's manifest.json and sizes.json (a part's shards are
    listed there too once merged), and a part's summary."""
    paths = merged_listing_paths(out_root)
    if options.is_part:
        paths.append(storage.join(options.progress_folder(out_root), PART_SUMMARY))
    return paths

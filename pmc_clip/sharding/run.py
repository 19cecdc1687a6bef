"""make_shards: PMC-OA rows (JSONL/CSV) + figures -> webdataset `.tar` shards and a manifest.

    python tools/make_shards.py --input pmc_oa.jsonl --images images.zip --output shards/

Stages, in order (one module each, in pmc_clip/sharding/):
  1. rows        -- JSONL or CSV, every row numbered (0-based record index);
  2. plan        -- check that the first rows have the image and caption columns (else a
                    start-up error), check caption and image path, derive a
                    webdataset-safe key, pick the split by a stable hash of the article
                    id, shuffle with --seed;
  3. workers     -- worker processes read and fully decode every figure (resize if asked;
                    what is read and refused: pmc_clip/sharding/figures.py);
  4. writer      -- the main process packs samples in plan order into shards; a shard
                    closes at --shard-size samples or before --max-shard-bytes;
  5. format      -- sizes.json (OpenCLIP's format), manifest.json, skipped.jsonl.

Every row ends in exactly one shard or in skipped.jsonl with a reason. A rerun after a
crash resumes after the last recorded shard (progress.py).

One run per --output (lock.py): a second stops at start-up naming the first; taking the
lock is also the start-up check that --output can be written. Exit codes (cli.py): 2 for
the command line and start-up checks, 1 for a failure while running (a full disk,
storage), 130 for Ctrl-C; after 1 or 130 the same command resumes, and staged files of
the run are removed (those of a run killed with -9: by the next run).

Object storage: every upload, progress record and check on `--output` is retried with
exponential backoff (`--upload-max-attempts`, `--upload-backoff-seconds`), so a 503 or a
dropped connection costs a retry, not the run. When every attempt fails, the run stops
with an error naming the object (exit code 1); rerunning the same command resumes.
"""

from __future__ import annotations

import sys
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import fsspec
from tqdm import tqdm

from pmc_clip import storage
from pmc_clip.sharding import identities
from pmc_clip.sharding.figures import FigureReader
from pmc_clip.sharding.format import (
    PART_SUMMARY,
    Manifest,
    PartSummary,
    ShardRecord,
    build_manifest,
    write_listings,
)
from pmc_clip.sharding.lock import OutputLock
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.plan import PlannedSample, plan
from pmc_clip.sharding.progress import input_digests, listing_paths, load_progress
from pmc_clip.sharding.rows import Skip, read_rows
from pmc_clip.sharding.store import (
    STORE_TIMEOUT_SECONDS,
    delete_present,
    exists,
    read_json,
    retried,
    write_json,
)
from pmc_clip.sharding.writer import write_split


def make_shards(options: ShardOptions) -> dict[str, Any]:
    """Run every stage; return the manifest. Safe to rerun after a crash. One run at a
    time per --output (lock.py)."""
    options.validate()
    started = time.monotonic()
    retry = options.retry_policy()
    out_fs, out_root = storage.url_to_fs_for_retries(options.output, STORE_TIMEOUT_SECONDS)
    if retried(out_fs, retry, "check", out_root, lambda: bool(out_fs.isfile(out_root))):
        raise ValueError(f"--output {storage.redact_url(options.output)} is a file, not a folder")
    with OutputLock(out_fs, options.progress_folder(out_root), options.output, retry) as lock:
        # Only now, as the one run on this output (or part): clear what killed runs left;
        # a part clears only its own files (the other parts may be writing beside it).
        if storage.is_local(out_fs):
            stem = options.shard_stem("*") if options.is_part else ""
            storage.remove_stale_staging_files(out_fs, out_root, stem)
        else:
            storage.remove_orphaned_uploads()
        return _make_shards_locked(options, out_fs, out_root, lock, started)


def _make_shards_locked(
    options: ShardOptions,
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    lock: OutputLock,
    started: float,
) -> dict[str, Any]:
    retry = options.retry_policy()
    planned = plan(_input_rows(options), options)
    samples_by_split = planned.samples_by_split
    _check_image_root(options, samples_by_split)
    split_names = sorted(samples_by_split)
    figures = _figure_identities(options, samples_by_split)
    done, tails = load_progress(
        out_fs, out_root, options, samples_by_split=samples_by_split, figures=figures
    )
    num_total = sum(len(s) for s in samples_by_split.values())
    records: dict[str, list[ShardRecord]] = {}
    skips = [s.to_json() for s in planned.skips]
    with tqdm(total=num_total, unit="img", desc="make_shards", disable=None) as progress:
        for split in split_names:
            samples = samples_by_split[split]
            if split in tails:
                records[split] = done[split]
                progress.update(len(samples))
            else:
                records[split], tail = write_split(
                    samples,
                    split=split,
                    figures=figures,
                    options=options,
                    out_fs=out_fs,
                    out_root=out_root,
                    done=done[split],
                    progress=progress,
                    lock=lock,
                )
                tails[split] = tail
                start = records[split][-1].end if records[split] else 0
                complete = {
                    "skipped": tail,
                    "start": start,
                    "sha256": list(input_digests(samples, figures, start=start, end=len(samples))),
                }
                write_json(
                    out_fs,
                    storage.join(options.progress_folder(out_root), f"{split}.complete.json"),
                    complete,
                    retry,
                )
            skips += [s for r in records[split] for s in r.skipped] + tails[split]
    skips.sort(key=lambda s: s["row"])
    manifest = build_manifest(options.fingerprint(), records, skips, planned.num_rows)
    counts = manifest.rows
    assert counts.read == counts.written + counts.skipped, counts
    if options.is_part:
        summary = PartSummary(
            manifest,
            part=options.part,
            num_parts=options.num_parts,
            input_rows=planned.num_input_rows,
            records=[r for split in sorted(records) for r in records[split]],
            skipped=skips,
        )
        _write_part_summary(out_fs, out_root, options, summary, retry)
    else:
        write_listings(out_fs, out_root, manifest, skips, retry)
    print_summary(manifest, time.monotonic() - started, num_total)
    return manifest.to_json()


def _input_rows(options: ShardOptions) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    """read_rows, with a missing --input as a start-up error and the store's failures
    as StorageError (errors of the code consuming the rows pass through untouched)."""
    try:
        yield from read_rows(options.input, csv_separator=options.csv_separator)
    except FileNotFoundError:
        raise ValueError(f"--input {storage.redact_url(options.input)} does not exist") from None
    except ValueError:
        raise
    except Exception as e:  # the store's own errors (botocore's are not OSErrors)
        raise storage.StorageError(
            f"cannot read --input {storage.redact_url(options.input)}: "
            f"{storage.describe_error(e, options.input)}"
        ) from None


def _write_part_summary(
    fs: fsspec.AbstractFileSystem,
    out_root: str,
    options: ShardOptions,
    summary: PartSummary,
    retry: storage.RetryPolicy,
) -> None:
    """Write a finished part's summary (what `make_shards --merge` reads). A part whose
    summary changes (a rerun over changed input) first removes the merged manifest.json
    and sizes.json: they list the part as it was. Rerunning a finished, unchanged part
    leaves them alone."""
    path = storage.join(options.progress_folder(out_root), PART_SUMMARY)
    document = summary.to_json()
    if exists(fs, path, retry) and read_json(fs, path, retry) == document:
        return
    delete_present(fs, listing_paths(out_root, options), retry)
    write_json(fs, path, document, retry)


def _figure_identities(
    options: ShardOptions, samples_by_split: dict[str, list[PlannedSample]]
) -> dict[str, str]:
    """The identity of every planned figure (identities.file_identities: one listing of
    --images), which resume checks compare (`input_digests`)."""
    wanted = {s.image for samples in samples_by_split.values() for s in samples}
    with storage.redacting_errors("list --images", options.images):
        fs, root = storage.url_to_fs(options.images)
        return identities.file_identities(fs, root, wanted)


def _check_image_root(
    options: ShardOptions, samples_by_split: dict[str, list[PlannedSample]]
) -> None:
    """Fail fast on a wrong --images (the commonest mistake: images.zip holds a folder),
    instead of skipping 1.6M rows one by one as missing. A zip that cannot be opened
    (truncated: its directory sits at the end) is refused here too, as the command line's
    error (exit 2): no rerun helps until the file is fetched again."""
    probe = [s for samples in samples_by_split.values() for s in samples[:10]][:20]
    if not probe:
        return
    try:
        reader = FigureReader(options.images, options.figure)
    except FileNotFoundError:
        raise ValueError(f"--images {storage.redact_url(options.images)} does not exist") from None
    except zipfile.BadZipFile as e:
        raise ValueError(
            f"--images {storage.redact_url(options.images)} cannot be opened as a zip archive "
            f"({e}); a truncated or partly downloaded zip lacks the directory at its end: "
            "fetch it again"
        ) from None
    if not any(reader.exists(s.image) for s in probe):
        raise ValueError(
            f"none of the first {len(probe)} images (e.g. {probe[0].image!r}) exist under "
            f"--images {storage.redact_url(options.images)}; if they sit in a folder inside "
            "a zip, name it: --images 'zip://FOLDER::images.zip'"
        )


def print_summary(manifest: Manifest, seconds: float, num_images: int | None) -> None:
    """The counts, to stderr; `num_images` (figures loaded) gives the rate."""
    rows = manifest.rows
    rate = "" if num_images is None else f" ({num_images / max(seconds, 1e-9):.1f} images/s)"
    print(
        f"rows read {rows.read}, written {rows.written}, skipped {rows.skipped}"
        f" in {seconds:.1f} s{rate}",
        file=sys.stderr,
    )
    for reason, count in rows.skipped_by_reason.items():
        print(f"  skipped {count:>8} {reason}", file=sys.stderr)
    for reason, count in rows.converted_by_reason.items():
        print(f"  converted {count:>6} {reason} (written)", file=sys.stderr)
    for split, info in manifest.splits.items():
        print(
            f"  {split:>8}: {info.samples} samples in {info.shards} shards "
            f"({info.bytes / 1e6:.1f} MB) {info.pattern}",
            file=sys.stderr,
        )

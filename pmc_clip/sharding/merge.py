"""`make_shards --merge`: the manifest of an output written in parts (`--num-parts K --part I`).

    python tools/make_shards.py --merge --output s3://bucket/pmc-oa

Each part run leaves its summary (`_progress/part-IIIII/summary.json`: its shard records,
its skipped rows, its row counts). The merge checks every part before it writes anything:
  * all K parts have finished (else it names the missing ones: rerun or resubmit them);
  * every part was made with the same options (`_progress/options.json`), from an input of
    the same number of rows, and its own counts add up (read = written + skipped);
  * the parts' rows add up to the input's: no row counted twice (a skipped row in two
    parts) or lost;
  * every recorded shard and its index are in the output, as they were written (size and
    mtime/inode, or ETag: one listing, as a resuming run checks them).
Then it writes the output's sizes.json, skipped.jsonl and manifest.json exactly as a
single run does, the manifest's per-split `pattern` naming every part's shards. Nothing is
read back from the shards (`tools/inspect_shards.py` verifies their bytes and samples).
Exit codes as make_shards: 2 when a check fails (nothing written; but a merged manifest.json
and sizes.json from before, which list a shard found missing or changed, are removed), 1
when storage fails.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import fsspec

from pmc_clip import storage
from pmc_clip.sharding import identities, store
from pmc_clip.sharding.format import (
    PART_SUMMARY,
    PROGRESS_DIR,
    PartSummary,
    build_manifest,
    index_name,
    merged_listing_paths,
    part_folder,
    write_listings,
)
from pmc_clip.sharding.lock import OutputLock
from pmc_clip.sharding.progress import stored_problem
from pmc_clip.sharding.run import print_summary

# How many missing parts the error names before it only counts them.
_MISSING_PARTS_SHOWN = 20


def merge_parts(output: str, retry: storage.RetryPolicy) -> dict[str, Any]:
    """Check every part of `output` and write its listings; return the manifest."""
    storage.refuse_url_credentials("--output", output, written=True)
    started = time.monotonic()
    fs, root = storage.url_to_fs_for_retries(output, store.STORE_TIMEOUT_SECONDS)
    progress_root = storage.join(root, PROGRESS_DIR)
    where = storage.redact_url(output)
    options_path = storage.join(progress_root, "options.json")
    if not store.exists(fs, options_path, retry):
        raise ValueError(f"--output {where} holds no make_shards output (no {options_path})")
    fingerprint = store.read_json(fs, options_path, retry)
    num_parts = int(fingerprint.get("num_parts", 1))
    if num_parts < 2:
        raise ValueError(
            f"--output {where} was written by one run, not in parts: its manifest.json is "
            "already the whole output (nothing to merge)"
        )
    # One merge at a time; the parts hold their own locks (they may still be resubmitted).
    with OutputLock(fs, progress_root, output, retry):
        summaries = _read_summaries(fs, root, where, num_parts, retry)
        _check_summaries(summaries, fingerprint, where)
        records = {
            split: [r for s in summaries for r in s.records if r.split == split]
            for split in sorted({r.split for s in summaries for r in s.records})
        }
        problem = _stored_problem(fs, root, summaries, retry)
        if problem is not None:
            # A merged manifest from before lists the shard as it was: never leave one
            # naming a shard that is gone or changed.
            if store.delete_present(fs, merged_listing_paths(root), retry):
                problem += "; removed the merged manifest.json and sizes.json, which list it"
            raise ValueError(problem)
        skips = sorted((skip for s in summaries for skip in s.skipped), key=lambda s: s["row"])
        num_input_rows = summaries[0].input_rows
        manifest = dataclasses.replace(
            build_manifest(fingerprint, records, skips, num_input_rows), parts=num_parts
        )
        counts = manifest.rows
        assert counts.read == counts.written + counts.skipped, counts
        write_listings(fs, root, manifest, skips, retry)
    print_summary(manifest, time.monotonic() - started, None)
    return manifest.to_json()


def _read_summaries(
    fs: fsspec.AbstractFileSystem,
    root: str,
    where: str,
    num_parts: int,
    retry: storage.RetryPolicy,
) -> list[PartSummary]:
    summaries, missing = [], []
    for part in range(num_parts):
        path = storage.join(part_folder(root, part), PART_SUMMARY)
        if store.exists(fs, path, retry):
            summaries.append(PartSummary.from_json(store.read_json(fs, path, retry)))
        else:
            missing.append(part)
    if missing:
        shown = ",".join(str(p) for p in missing[:_MISSING_PARTS_SHOWN])
        more = (
            f" and {len(missing) - _MISSING_PARTS_SHOWN} more"
            if len(missing) > _MISSING_PARTS_SHOWN
            else ""
        )
        raise ValueError(
            f"--output {where}: {len(missing)} of {num_parts} parts have not finished "
            f"(--part {shown}{more}); run them again (the same command resumes each, e.g. "
            f"sbatch --array={shown} launch/make_shards_array.sh), then merge"
        )
    return summaries


def _check_summaries(summaries: list[PartSummary], fingerprint: dict[str, Any], where: str) -> None:
    """Every part of one output, made with one set of options, from one input."""
    input_rows = {s.input_rows for s in summaries}
    if len(input_rows) != 1:
        by_part = ", ".join(f"part {s.part}: {s.input_rows}" for s in summaries)
        raise ValueError(
            f"--output {where}: the parts read inputs of different lengths ({by_part}): the "
            "input changed between parts; rerun every part on the final input, then merge"
        )
    for part, summary in enumerate(summaries):
        if summary.part != part or summary.manifest.options != fingerprint:
            raise ValueError(
                f"--output {where}: part {part}'s summary was made with other options than "
                "_progress/options.json; rerun that part with the same options"
            )
        rows = summary.manifest.rows
        assert rows.read == rows.written + rows.skipped, (part, rows)
    num_rows = sum(s.manifest.rows.read for s in summaries)
    if num_rows != input_rows.pop():
        raise ValueError(
            f"--output {where}: the parts hold {num_rows} rows, the input "
            f"{summaries[0].input_rows}; rerun every part on the final input, then merge"
        )
    skipped_rows = [skip["row"] for s in summaries for skip in s.skipped]
    assert len(set(skipped_rows)) == len(skipped_rows), "a skipped row in two parts"


def _stored_problem(
    fs: fsspec.AbstractFileSystem,
    root: str,
    summaries: list[PartSummary],
    retry: storage.RetryPolicy,
) -> str | None:
    """Whether each recorded shard and its index are in the output as written (one
    listing, checked as a resuming part checks them); else what is wrong with the first
    that is not, and the part to rerun."""
    names = [name for s in summaries for r in s.records for name in (r.name, index_name(r.name))]
    stored = store.retried(
        fs, retry, "list", root, lambda: identities.file_identities(fs, root, names)
    )
    for summary in summaries:
        for record in summary.records:
            if (problem := stored_problem(record, stored)) is not None:
                url = storage.redact_url(store.where_of(fs, storage.join(root, record.name)))
                return (
                    f"{url}: {problem}: rerun --part {summary.part} (it rewrites that "
                    "shard), then merge"
                )
    return None

"""make_shards' command line: its flags (those of `ShardOptions`' fields, declared there
with `pmc_clip.flags.option`, and the few the CLI adds), `main` and its exit codes.

    python tools/make_shards.py --input pmc_oa.jsonl --images images.zip --output shards/
    python tools/make_shards.py --merge --output s3://bucket/pmc-oa   # after every part
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from pmc_clip import metrics
from pmc_clip.flags import add_options, given_options
from pmc_clip.sharding.figures import FigureOptions
from pmc_clip.sharding.format import PROGRESS_DIR
from pmc_clip.sharding.merge import merge_parts
from pmc_clip.sharding.options import ShardOptions, parse_split_fractions
from pmc_clip.sharding.run import make_shards
from pmc_clip.sharding.store import upload_retry_policy


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards",
        description="PMC-OA JSONL/CSV + figures -> webdataset shards with a manifest.",
    )
    p.add_argument("--input", help="pmc_oa.jsonl or a CSV (local or any URL); required")
    p.add_argument(
        "--images",
        help="image root: folder, fsspec URL, images.zip, or zip://FOLDER::images.zip; required",
    )
    p.add_argument("--output", required=True, help="output folder or URL (e.g. s3://b/pmc-oa)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="after every part has finished: check them and write the output's sizes.json, "
        "manifest.json and skipped.jsonl (needs only --output)",
    )
    # The library's default is 0 (in this process); the command's, every usable core.
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes (default: every core this process may use, e.g. its SLURM allocation)",
    )
    add_options(p, ShardOptions)
    add_options(p, FigureOptions)
    return p


def options_from_args(args: argparse.Namespace) -> ShardOptions:
    if args.input is None or args.images is None:
        raise ValueError("--input and --images are required (all but --merge)")
    given = given_options(args, ShardOptions)
    if "split_fractions" in given:
        given["split_fractions"] = parse_split_fractions(given["split_fractions"])
    return ShardOptions(
        input=args.input,
        images=args.images,
        output=args.output,
        figure=FigureOptions(**given_options(args, FigureOptions)),
        workers=len(os.sched_getaffinity(0)) if args.workers is None else args.workers,
        **given,
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM cancelling a job or reaching its --time, `kill`), taken like Ctrl-C:
    the pool stops, staged files are removed and the lock is released (on S3 a lock left
    behind would hold a resubmitted part off for its 10-minute expiry)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done; 2 a command-line or start-up error (nothing written); 1 a
    failure while running (storage, a full disk); 130 Ctrl-C; 143 SIGTERM. After 1, 130
    or 143, the same command resumes after the last recorded shard."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    resume = f"finished shards are recorded in {PROGRESS_DIR}/: rerun the same command to resume"
    metrics.install_secret_filter(argv)
    try:
        args = build_parser().parse_args(argv)
        if args.merge:
            given = given_options(args, ShardOptions)
            retry = upload_retry_policy(
                given.get("upload_max_attempts", ShardOptions.upload_max_attempts),
                given.get("upload_backoff_seconds", ShardOptions.upload_backoff_seconds),
            )
            retry.validate("--upload-max-attempts")
            manifest = merge_parts(args.output, retry)
        else:
            manifest = make_shards(options_from_args(args))
    except ValueError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # StorageError, and local write errors (disk full, read-only)
        print(f"make_shards: error: {e}; {resume}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"make_shards: terminated (SIGTERM); {resume}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"make_shards: interrupted; {resume}", file=sys.stderr)
        return 130
    print(json.dumps({"rows": manifest["rows"], "splits": manifest["splits"]}, indent=1))
    return 0

"""make_shards: PMC-OA rows (JSONL/CSV) + figures -> webdataset `.tar` shards and a manifest.

    python tools/make_shards.py --input pmc_oa.jsonl --images images.zip --output shards/

Stages, in order:
  1. read rows   -- JSONL or CSV, every row numbered (0-based record index);
  2. plan        -- check that the first rows have the image and caption columns (else a
                    start-up error), check caption and image path, derive a
                    webdataset-safe key, pick the split by a stable hash of the article
                    id, shuffle with --seed;
  3. load        -- worker processes read and fully decode every figure (resize if asked;
                    what is read and refused: pmc_clip/figures.py);
  4. write       -- the main process packs samples in plan order into shards; a shard
                    closes at --shard-size samples or before --max-shard-bytes;
  5. manifest    -- sizes.json (OpenCLIP's format), manifest.json, skipped.jsonl.

Every row ends in exactly one shard or in skipped.jsonl with a reason.

Each shard `X.tar` gets its sample index `X.idx` (pmc_clip/shard_index.py) beside it,
published just before the shard, so a shard never exists without its index.

Resume: each finished shard gets a record in `<output>/_progress/` *after* the shard
itself is in place (renamed, or uploaded) and, locally, synced to disk with its folder, so
a power cut cannot leave a recorded but short shard. Shard boundaries depend only on the
input and the options, so a rerun after a crash continues after the last recorded shard
and yields the same bytes as an uninterrupted run. A shard without its record is simply
rewritten. A record is trusted only while the shard's input is unchanged (its rows and
its figures' size and mtime/ETag/CRC, from one listing of --images) and its file is the
one recorded (size and mtime, or ETag): else that shard and every later one of its split
are deleted and rewritten, with a line saying why (see _load_progress). Other options
than the recorded ones are refused.

One run per --output (pmc_clip/output_lock.py): a second stops at start-up naming the
first; taking the lock is also the start-up check that --output can be written. Exit
codes: 2 for the command line and start-up checks, 1 for a failure while running (a full
disk, storage), 130 for Ctrl-C; after 1 or 130 the same command resumes, and staged files
of the run are removed (those of a run killed with -9: by the next run).

Object storage: every upload, progress record and check on `--output` is retried with
exponential backoff (`--upload-max-attempts`, `--upload-backoff-seconds`), so a 503 or a
dropped connection costs a retry, not the run. When every attempt fails, the run stops
with an error naming the object (exit code 1); rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import signal
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import fsspec
import numpy as np
from tqdm import tqdm

from pmc_clip import metrics, shard_index, storage
from pmc_clip.figures import Figure, FigureError, FigureOptions, FigureReader
from pmc_clip.output_lock import OutputLock

MANIFEST_VERSION = 1
PROGRESS_DIR = "_progress"
# A finished part's manifest, in its progress folder: what `make_shards --merge` reads.
PART_SUMMARY = "summary.json"
_T = TypeVar("_T")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NAME_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")
# Fixed tar header fields, so a shard's bytes depend only on its samples.
_TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
_TAR_USER = "pmc_clip"
_TAR_MODE = 0o444  # read-only members, as webdataset writes them
# Sizes the byte cap accounts for beyond payloads: a tar header per member, padding.
_TAR_BLOCK = 512
# How many rows one worker task carries: large enough to amortise the IPC round trip,
# small enough that the in-flight window stays a few MB per worker.
_ROWS_PER_TASK = 16
_TASKS_IN_FLIGHT_PER_WORKER = 4
_ORPHAN_CHECK_SECONDS = 0.5
# Connect/read timeout of one object-store request on --output (a stall becomes a retry).
STORE_TIMEOUT_SECONDS = 120.0
_UPLOAD_BACKOFF_MAX_SECONDS = 60.0
# How many rows _check_key_columns looks at (a few bad ones among them are fine), and how
# many of the column names found its message lists.
_KEY_CHECK_ROWS = 1000
_KEY_CHECK_NAMES_SHOWN = 12
# The csv module refuses fields above 128 KiB; a long caption is a row to skip with a
# reason (caption_too_long), not a crash.
_CSV_FIELD_LIMIT = 2**31 - 1
# Part numbers are written with 5 digits (`part00042`).
_MAX_PARTS = 100_000


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ShardOptions:
    input: str
    images: str
    output: str
    prefix: str = "pmc-oa"
    img_key: str = "image"
    caption_key: str = "caption"
    csv_separator: str = ","
    split: str | None = None
    split_column: str = "split"
    article_column: str = "pmcid"
    split_fractions: tuple[tuple[str, float], ...] = (("train", 0.8), ("valid", 0.1), ("test", 0.1))
    shard_size: int = 10_000
    max_shard_bytes: int = 1 << 30
    shuffle: bool = False
    seed: int = 0
    max_caption_chars: int = 100_000
    figure: FigureOptions = field(default_factory=FigureOptions)
    workers: int = 0
    strict: bool = False
    upload_max_attempts: int = 8
    upload_backoff_seconds: float = 1.0
    # Scale-out: the input's articles are dealt to `num_parts` parts (`part_for`); this run
    # writes part `part`'s shards (`PREFIX-SPLIT-partIIIII-NNNNNN.tar`) and its summary,
    # and `make_shards --merge` (pmc_clip/shard_merge.py) writes the global manifest.
    num_parts: int = 1
    part: int = 0

    @property
    def is_part(self) -> bool:
        return self.num_parts > 1

    def shard_stem(self, split: str) -> str:
        """Shard names without the index: `PREFIX-SPLIT`, or `PREFIX-SPLIT-partIIIII` for a
        part, so parts writing into one folder never collide."""
        return f"{self.prefix}-{split}" + (f"-part{self.part:05d}" if self.is_part else "")

    def progress_folder(self, out_root: str) -> str:
        """Where this run's progress records and lock live: one folder per part, so parts
        run side by side, each resuming on its own."""
        folder = storage.join(out_root, PROGRESS_DIR)
        return storage.join(folder, f"part-{self.part:05d}") if self.is_part else folder

    def retry_policy(self) -> storage.RetryPolicy:
        return upload_retry_policy(self.upload_max_attempts, self.upload_backoff_seconds)

    def validate(self) -> None:
        storage.refuse_url_credentials("--input", self.input)
        storage.refuse_url_credentials("--images", self.images)
        storage.refuse_url_credentials("--output", self.output, written=True)
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1 sample, got {self.shard_size}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"--max-shard-bytes must be >= 1, got {self.max_shard_bytes}")
        if not 1 <= self.num_parts <= _MAX_PARTS:
            raise ValueError(f"--num-parts must be in 1..{_MAX_PARTS}, got {self.num_parts}")
        if not 0 <= self.part < self.num_parts:
            raise ValueError(
                f"--part must be in 0..{self.num_parts - 1} (--num-parts {self.num_parts}), "
                f"got {self.part}"
            )
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 = in this process), got {self.workers}")
        if not _NAME_SAFE.match(self.prefix):
            raise ValueError(f"--prefix may use only letters, digits, '_' and '-': {self.prefix!r}")
        names = [name for name, _ in self.split_fractions]
        for name in [*names, *([self.split] if self.split else [])]:
            if not _NAME_SAFE.match(name):
                raise ValueError(f"split name {name!r}: use only letters, digits, '_' and '-'")
        if len(set(names)) != len(names):
            raise ValueError(f"--split-fractions names a split twice: {names}")
        fractions = [f for _, f in self.split_fractions]
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"--split-fractions must be >= 0 and sum to 1, got {fractions}")
        quality = self.figure.jpeg_quality
        if not 1 <= quality <= 95:
            raise ValueError(f"--jpeg-quality must be in 1..95, got {quality}")
        if self.figure.resize_max_side is not None and self.figure.resize_max_side < 1:
            raise ValueError("--resize-max-side must be >= 1 pixel")
        if self.max_caption_chars < 1:
            raise ValueError("--max-caption-chars must be >= 1")
        self.retry_policy().validate("--upload-max-attempts")

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide the output bytes, redacted, for resume checks and the
        manifest. Worker count, strictness and retries do not change a finished shard; every
        part of one output shares these (the part number only picks its rows)."""
        out = dataclasses.asdict(self)
        for name in ("workers", "strict", "upload_max_attempts", "upload_backoff_seconds", "part"):
            out.pop(name)
        for name in ("input", "images", "output"):
            out[name] = storage.redact_url(out[name])
        out["split_fractions"] = [list(pair) for pair in self.split_fractions]
        return out


def upload_retry_policy(max_attempts: int, backoff_seconds: float) -> storage.RetryPolicy:
    """How calls on an object-store --output are retried (a local --output is not)."""
    return storage.RetryPolicy(
        max_attempts, backoff_seconds, max(_UPLOAD_BACKOFF_MAX_SECONDS, backoff_seconds)
    )


def parse_split_fractions(text: str) -> tuple[tuple[str, float], ...]:
    """'train=0.8,valid=0.1,test=0.1' -> (('train', 0.8), ...)."""
    pairs = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((name.strip(), float(value)))
        except ValueError:
            raise ValueError(
                f"--split-fractions: expected NAME=FRACTION[,NAME=FRACTION...], got {text!r}"
            ) from None
    return tuple(pairs)


# --------------------------------------------------------------------------- 1. rows


@dataclass(frozen=True)
class Skip:
    row: int
    reason: str
    detail: str
    image: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "image": self.image, "reason": self.reason, "detail": self.detail}


def read_rows(url: str, csv_separator: str) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    """Yield (row number, record) for JSONL or CSV (chosen by extension), or a Skip for a
    record that cannot be parsed. Text is decoded with surrogateescape so one bad byte
    costs one row (flagged later), not the whole file; a leading UTF-8 BOM (Excel writes
    one) is dropped, not read as part of the first column name or JSON line."""
    lower = urlsplit(url).path.lower()  # a presigned URL's ?query is not the extension
    if lower.endswith((".jsonl", ".json")):
        yield from _read_jsonl(url)
    elif lower.endswith((".csv", ".tsv")):
        yield from _read_csv(url, csv_separator)
    else:
        raise ValueError(f"--input {storage.redact_url(url)}: expected a .jsonl or .csv file")


def _read_jsonl(url: str) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    with fsspec.open(url, "rt", encoding="utf-8-sig", errors="surrogateescape") as f:
        row = 0
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines are not records
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield row, Skip(row, "bad_record", f"line {line_number}: invalid JSON: {e}")
            else:
                if isinstance(record, dict):
                    yield row, record
                else:
                    yield row, Skip(row, "bad_record", f"line {line_number}: not a JSON object")
            row += 1


def _read_csv(url: str, separator: str) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    """Strict quoting: a stray quote (`"a"b`) costs its row (bad_record); a quoted field
    never closed would swallow every later line into one caption, so it stops the run."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with fsspec.open(url, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=separator, strict=True)
        header = next(reader, None)
        if header is None:
            return
        row = 0
        while True:
            first_line = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                if "unexpected end of data" in str(e):
                    raise ValueError(
                        f"--input {storage.redact_url(url)}: line {first_line}: a quoted field "
                        "is never closed, so every later line would be read as part of it; "
                        'fix the quote (a quote inside a field is written twice: "")'
                    ) from None
                yield row, Skip(row, "bad_record", f"line {first_line}: {e}")
            else:
                if not fields:
                    continue  # a blank line is not a record (as DictReader has it)
                if len(fields) != len(header):
                    detail = (
                        f"line {first_line}: {len(fields)} fields, the header has {len(header)}"
                    )
                    yield row, Skip(row, "bad_record", detail)
                else:
                    yield row, dict(zip(header, fields, strict=True))
            row += 1


# --------------------------------------------------------------------------- 2. plan


@dataclass(frozen=True)
class PlannedSample:
    row: int
    key: str
    image: str
    caption: str
    split: str
    article_id: str
    extra: dict[str, Any]


def safe_relative_path(path: str) -> str | None:
    """The normalised relative path, or None if it is absolute or climbs out of the root."""
    if "\\" in path or "\x00" in path:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or not parts or ".." in parts or ":" in parts[0]:
        return None
    return "/".join(parts)


def make_key(rel_path: str) -> str:
    """webdataset splits a member name at its first dot and folders are not keys: keep
    letters, digits, '_' and '-' (folders become '__'); drop the extension."""
    stem = rel_path.rsplit(".", 1)[0] if "." in rel_path.rsplit("/", 1)[-1] else rel_path
    return _KEY_UNSAFE.sub("_", stem.replace("/", "__"))


def article_id_for(rel_path: str, record: dict[str, Any], article_column: str) -> str:
    """The article a figure belongs to: the pmcid column when present, else the figure
    name's prefix (PMC-OA names figures PMC<id>_<figure>_<subfigure>.jpg)."""
    value = record.get(article_column)
    if isinstance(value, (str, int)) and str(value).strip():
        return str(value).strip()
    name = rel_path.rsplit("/", 1)[-1]
    return name.split("_", 1)[0].split(".", 1)[0]


def split_for(article_id: str, fractions: Sequence[tuple[str, float]]) -> str:
    """Stable across runs, machines and Python versions (sha256, not hash())."""
    digest = hashlib.sha256(article_id.encode("utf-8", "surrogateescape")).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in fractions:
        cumulative += fraction
        if point < cumulative:
            return name
    return fractions[-1][0]


@dataclass(frozen=True)
class Plan:
    """This run's rows: its samples per split (in shard order) and its skipped rows."""

    samples_by_split: dict[str, list[PlannedSample]]
    skips: list[Skip]
    num_rows: int  # rows of this run (of its part): samples + skips
    num_input_rows: int  # rows in the whole input (every part reads all of it)


def part_for(article_id: str, num_parts: int) -> int:
    """The part an article's rows go to: a stable hash (sha256, as `split_for`), salted so
    parts are independent of splits (every part holds train, valid and test rows)."""
    digest = hashlib.sha256(b"part\0" + article_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % num_parts


def plan(rows: Iterable[tuple[int, dict[str, Any] | Skip]], options: ShardOptions) -> Plan:
    """Row-level checks and split assignment, over every row of the input (a duplicate key
    is found across parts too), keeping this run's rows: a part keeps the samples of its
    articles (`part_for`) and the skipped rows whose number it is modulo --num-parts.
    Rows stream through: a part holds its own rows and every key (~150 bytes per row)."""
    splits: dict[str, list[PlannedSample]] = collections.defaultdict(list)
    skips: list[Skip] = []
    seen_keys: dict[str, int] = {}
    num_rows = num_input_rows = 0
    rows = iter(rows)
    head = list(itertools.islice(rows, _KEY_CHECK_ROWS))
    _check_key_columns(head, options)
    for row, record in itertools.chain(head, rows):
        num_input_rows += 1
        checked = _plan_row(row, record, options, seen_keys)
        if isinstance(checked, Skip):
            if options.strict:
                raise ValueError(_describe_skip(checked))
            if row % options.num_parts == options.part:
                skips.append(checked)
                num_rows += 1
        else:
            seen_keys[checked.key] = row
            if (
                not options.is_part
                or part_for(checked.article_id, options.num_parts) == options.part
            ):
                splits[checked.split].append(checked)
                num_rows += 1
    if options.shuffle:
        for name in splits:
            # PCG64 with a fixed seed gives the same permutation on every numpy version.
            order = np.random.default_rng([options.seed, _stable_int(name)]).permutation(
                len(splits[name])
            )
            splits[name] = [splits[name][i] for i in order]
    return Plan(dict(splits), skips, num_rows, num_input_rows)


def _check_key_columns(
    head: list[tuple[int, dict[str, Any] | Skip]], options: ShardOptions
) -> None:
    """Start-up check of the input's first rows: some record must have the image column
    and some the caption column. A few rows without them are skipped rows; none at all
    means a wrong --csv-img-key/--csv-caption-key/--csv-separator or the wrong file,
    which would otherwise skip every row and end in "0 written"."""
    if not head:
        return  # an empty input: nothing to write, and nothing misread
    records = [record for _, record in head if not isinstance(record, Skip)]
    flags = {options.img_key: "--csv-img-key", options.caption_key: "--csv-caption-key"}
    missing = [
        f"{name!r} ({flag})"
        for name, flag in flags.items()
        if not any(name in record for record in records)
    ]
    if not missing:
        return
    where = f"--input {storage.redact_url(options.input)}"
    first_rows = f"the first {len(head)} rows" if len(head) > 1 else "the one row"
    is_csv = urlsplit(options.input).path.lower().endswith((".csv", ".tsv"))
    hint = f"; is {options.csv_separator!r} its separator (--csv-separator)?" if is_csv else ""
    if not records:
        first = next(record for _, record in head if isinstance(record, Skip))
        raise ValueError(
            f"{where}: cannot read {first_rows} (row {first.row}: {first.detail}){hint}"
        )
    found = sorted({name for record in records for name in record})
    shown = ", ".join(repr(name[:40]) for name in found[:_KEY_CHECK_NAMES_SHOWN])
    if len(found) > _KEY_CHECK_NAMES_SHOWN:
        shown += f" and {len(found) - _KEY_CHECK_NAMES_SHOWN} more"
    raise ValueError(
        f"{where}: no column {' or '.join(missing)} in {first_rows}; "
        f"it has {shown}{hint if len(found) == 1 else ''}"
    )


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def _plan_row(
    row: int, record: dict[str, Any] | Skip, options: ShardOptions, seen_keys: dict[str, int]
) -> PlannedSample | Skip:
    if isinstance(record, Skip):
        return record
    image = record.get(options.img_key)
    if not isinstance(image, str) or not image.strip():
        return Skip(row, "missing_image_path", f"column {options.img_key!r} is empty or absent")
    rel_path = safe_relative_path(image.strip())
    if rel_path is None:
        return Skip(row, "path_escapes_root", "absolute path or '..' in the image path", image)
    if _has_surrogates(rel_path):
        return Skip(row, "bad_record", "image path is not valid UTF-8", None)
    caption = record.get(options.caption_key)
    if not isinstance(caption, str):
        kind = "absent" if caption is None else type(caption).__name__
        return Skip(row, "caption_not_text", f"caption is {kind}", rel_path)
    caption = caption.strip()
    if not caption:
        return Skip(row, "empty_caption", "caption is empty", rel_path)
    if _has_surrogates(caption):
        return Skip(row, "caption_not_utf8", "caption has bytes that are not UTF-8", rel_path)
    if len(caption) > options.max_caption_chars:
        detail = f"{len(caption)} characters > --max-caption-chars"
        return Skip(row, "caption_too_long", detail, rel_path)
    key = make_key(rel_path)
    if key in seen_keys:
        return Skip(
            row, "duplicate_key", f"key {key!r} already used by row {seen_keys[key]}", image
        )
    article_id = article_id_for(rel_path, record, options.article_column)
    if options.split is not None:
        split = options.split
    elif options.split_column in record:
        split = str(record[options.split_column]).strip()
        if not _NAME_SAFE.match(split):
            return Skip(row, "bad_split", f"split {split!r} is not a plain name", rel_path)
    else:
        split = split_for(article_id, options.split_fractions)
    used = {options.img_key, options.caption_key, options.split_column}
    extra = {
        name: value
        for name, value in record.items()
        if name not in used and not (isinstance(value, str) and _has_surrogates(value))
    }
    return PlannedSample(row, key, rel_path, caption, split, article_id, extra)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _describe_skip(skip: Skip) -> str:
    where = f"row {skip.row}" + (f" ({skip.image})" if skip.image else "")
    return f"{where}: {skip.reason}: {skip.detail} (--strict stops at the first bad row)"


# --------------------------------------------------------------------------- 3. load

_worker_reader: FigureReader | None = None
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _init_worker(images_url: str, figure_options: FigureOptions, parent_pid: int) -> None:
    # The filesystem is created here, inside the worker, never inherited from the parent.
    # Ctrl-C reaches the whole process group, and SLURM's SIGTERM every process of the
    # job: the main process stops the pool, and a worker taking either as well would only
    # print a traceback of its own, or die and break the pool. (Both were blocked since
    # the worker started: _WorkerSpawnContext.)
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    global _worker_reader
    _worker_reader = FigureReader(images_url, figure_options)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


class _StopSignalsBlockedProcess(SpawnProcess):
    """A spawned worker born with SIGINT and SIGTERM blocked (a signal mask survives exec)
    until `_init_worker` ignores them: one during its start-up, a second or more of
    imports, would otherwise end it with a traceback (or silently, breaking the pool)."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _WorkerSpawnContext(SpawnContext):
    Process = _StopSignalsBlockedProcess


def _exit_when_orphaned(parent_pid: int) -> None:
    """A parent killed with -9 cannot stop its pool, and the workers would block forever
    on a queue whose write end they themselves hold: leave once the parent is gone."""
    while os.getppid() == parent_pid:
        time.sleep(_ORPHAN_CHECK_SECONDS)
    os._exit(1)


def _load_batch(rel_paths: list[str]) -> list[Figure | FigureError]:
    assert _worker_reader is not None, "worker not initialised"
    return [_worker_reader.read(path) for path in rel_paths]


def load_figures(
    samples: Sequence[PlannedSample], options: ShardOptions
) -> Iterator[Figure | FigureError]:
    """Figures for `samples`, in order. Workers run ahead by a bounded window, so memory
    stays O(workers) however long the split is."""
    if options.workers == 0:
        global _worker_reader
        _worker_reader = FigureReader(options.images, options.figure)
        for sample in samples:
            yield from _load_batch([sample.image])
        return
    context = _WorkerSpawnContext()
    with ProcessPoolExecutor(
        options.workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(options.images, options.figure, os.getpid()),
    ) as pool:
        pending: collections.deque[Future[list[Figure | FigureError]]] = collections.deque()
        batches = (
            [s.image for s in samples[i : i + _ROWS_PER_TASK]]
            for i in range(0, len(samples), _ROWS_PER_TASK)
        )
        for batch in batches:
            pending.append(pool.submit(_load_batch, batch))
            if len(pending) >= options.workers * _TASKS_IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# --------------------------------------------------------------------------- 4. write


@dataclass
class ShardRecord:
    """What _progress/ and the manifest keep about one finished shard."""

    name: str
    split: str
    index: int
    count: int
    bytes: int
    sha256: str
    start: int  # first plan position covered (samples and skips)
    end: int  # one past the last plan position covered
    skipped: list[dict[str, Any]]
    converted: dict[str, int] = field(default_factory=dict)  # samples per conversion reason
    # What the shard was made from (`input_digests` of its plan positions), and the
    # stored file's identity (storage.file_identities) once published: a rerun reuses
    # the shard only while all three still hold.
    rows_sha256: str = ""
    figures_sha256: str = ""
    stored: str = ""


def input_digests(
    samples: Sequence[PlannedSample], figures: dict[str, str], start: int, end: int
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


def shard_name(stem: str, index: int) -> str:
    """`stem` is `ShardOptions.shard_stem(split)`."""
    return f"{stem}-{index:06d}.tar"


def sample_members(sample: PlannedSample, figure: Figure) -> dict[str, bytes | str]:
    metadata = {
        **sample.extra,
        "key": sample.key,
        "source_path": sample.image,
        "row": sample.row,
        "split": sample.split,
        "article_id": sample.article_id,
        "width": figure.width,
        "height": figure.height,
        "original_width": figure.original_width,
        "original_height": figure.original_height,
        "original_format": figure.original_format,
        "original_mode": figure.original_mode,
        "reencoded": figure.reencoded,
        "conversion": figure.conversion,
    }
    return {
        "__key__": sample.key,
        figure.ext: figure.data,
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def write_sample(tar: tarfile.TarFile, members: dict[str, bytes | str]) -> None:
    """One sample as webdataset.TarWriter writes it, byte for byte: members `KEY.EXT`
    sorted by extension, fixed owner, mode and mtime. Written with tarfile because
    importing webdataset imports torch: ~2.5 s of CPU in the main process of every run
    (and of each of 600 SLURM parts) for a dozen lines of tar headers."""
    key = members["__key__"]
    assert isinstance(key, str)
    for ext in sorted(members):
        if ext == "__key__":
            continue
        value = members[ext]
        data = value.encode("utf-8") if isinstance(value, str) else value
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), _TAR_MTIME, _TAR_MODE
        info.uname = info.gname = _TAR_USER
        tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: dict[str, bytes | str]) -> int:
    payload = [len(v) for k, v in members.items() if k != "__key__"]
    return sum(_TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK for n in payload)


class ShardWriterState:
    """Packs samples into the current shard and closes it on the count or byte cap."""

    def __init__(
        self,
        out_fs: fsspec.AbstractFileSystem,
        out_root: str,
        options: ShardOptions,
        split: str,
        index: int,
        start: int,
        digests: Callable[[int, int], tuple[str, str]],
    ) -> None:
        self.fs, self.root, self.options, self.split = out_fs, out_root, options, split
        self.index, self.start, self.digests = index, start, digests
        # The open shard: samples stream into a staged tar file as they come, so memory
        # holds one sample, not one shard (up to --max-shard-bytes).
        self._staged: str | None = None
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self.num_samples = 0
        self.num_bytes = 0
        self.skipped: list[dict[str, Any]] = []
        self.converted: collections.Counter[str] = collections.Counter()
        self.finished: list[ShardRecord] = []
        # Publishing (rename, or upload to object storage) runs beside the packing of the
        # next shard; one at a time keeps records in order and local disk use bounded.
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        self._publishing: Future[None] | None = None

    def add(
        self, position: int, members: dict[str, bytes | str], conversion: str | None = None
    ) -> None:
        size = _tar_bytes(members)
        if self.num_samples and self.num_bytes + size > self.options.max_shard_bytes:
            self.close(end=position)
        with self._writing():
            if self._tar is None:
                self._staged = storage.staging_path(self.fs, self._dest())
                self._file = open(self._staged, "wb")  # noqa: SIM115 -- closed in close()
                self._tar = tarfile.open(fileobj=self._file, mode="w|")  # noqa: SIM115
            write_sample(self._tar, members)
        if conversion is not None:
            self.converted[conversion] += 1
        self.num_samples += 1
        self.num_bytes += size
        if self.num_samples == self.options.shard_size:
            self.close(end=position + 1)

    def _dest(self) -> str:
        return storage.join(self.root, shard_name(self.options.shard_stem(self.split), self.index))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A write of the open shard (disk full, a read-only folder...): a StorageError
        naming the shard; the staged file is removed by `shutdown`."""
        with storage.redacting_errors("write", where_of(self.fs, self._dest())):
            yield

    def close(self, end: int) -> None:
        assert self._tar is not None and self._file is not None and self._staged is not None
        with self._writing():
            self._tar.close()
            self._file.close()
            num_bytes, sha256 = storage.file_digest(self._staged)
        staged, dest = self._staged, self._dest()
        rows_sha256, figures_sha256 = self.digests(self.start, end)
        record = ShardRecord(
            os.path.basename(dest),
            self.split,
            self.index,
            self.num_samples,
            num_bytes,
            sha256,
            self.start,
            end,
            self.skipped,
            dict(sorted(self.converted.items())),
            rows_sha256,
            figures_sha256,
        )
        self.wait()
        self._publishing = self._publisher.submit(self._publish, staged, dest, record)
        self.finished.append(record)
        self.index, self.start = self.index + 1, end
        self._staged, self._file, self._tar = None, None, None
        self.num_samples, self.num_bytes, self.skipped = 0, 0, []
        self.converted = collections.Counter()

    def _publish(self, staged: str, dest: str, record: ShardRecord) -> None:
        retry = self.options.retry_policy()
        url = where_of(self.fs, dest)
        try:
            with open(staged, "rb") as f:
                index = shard_index.build_index(f, record.bytes)
            # The index goes first: a crash between the two leaves an index without its
            # shard (the rerun rewrites both, byte for byte), never a shard without it.
            with storage.redacting_errors("write", shard_index.index_url(url)):
                shard_index.write_index(self.fs, shard_index.index_url(dest), index, retry)
            with storage.redacting_errors("publish", url):
                storage.publish(self.fs, staged, dest, retry)
        finally:
            if os.path.exists(staged):  # publish consumes it; an error before it did not
                os.unlink(staged)
        stored = retried(
            self.fs, retry, "check", dest, lambda: storage.object_identity(self.fs, dest)
        )
        record.stored = stored or ""  # "" (not a file?) matches no listing: rewritten
        # Only now, with the shard in place, is it recorded as done.
        progress_path = storage.join(self.options.progress_folder(self.root), record.name + ".json")
        _write_json(self.fs, progress_path, dataclasses.asdict(record), retry)

    def wait(self) -> None:
        """Block until the last shard is published; re-raise its error if it failed."""
        if self._publishing is not None:
            self._publishing.result()
            self._publishing = None

    def shutdown(self) -> None:
        """Drop a shard left open by an error or Ctrl-C (it was never recorded), then wait
        for publishing."""
        if self._staged is not None:
            for stream in (self._tar, self._file):  # a full disk may fail their flushes too
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            os.unlink(self._staged)
            self._staged, self._file, self._tar = None, None, None
        self._publisher.shutdown(wait=True)


def _write_json(
    fs: fsspec.AbstractFileSystem, path: str, obj: Any, retry: storage.RetryPolicy
) -> None:
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False)
    with storage.redacting_errors("write", where_of(fs, path)):
        storage.write_bytes_atomic(fs, path, text.encode("utf-8"), retry)


def read_json(fs: fsspec.AbstractFileSystem, path: str, retry: storage.RetryPolicy) -> Any:
    return json.loads(retried(fs, retry, "read", path, lambda: storage.read_bytes(fs, path)))


def exists(fs: fsspec.AbstractFileSystem, path: str, retry: storage.RetryPolicy) -> bool:
    return retried(fs, retry, "check", path, lambda: bool(fs.exists(path)))


def retried(
    fs: fsspec.AbstractFileSystem,
    retry: storage.RetryPolicy,
    what: str,
    path: str,
    call: Callable[[], _T],
) -> _T:
    """`call` on --output, retried when it is an object store (local calls run once)."""
    if storage.is_local(fs):
        return call()
    return storage.retry_call(what, fs.unstrip_protocol(path), retry, call)


def where_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """`path` as errors name it: a local path as it is, else its URL."""
    return path if storage.is_local(fs) else fs.unstrip_protocol(path)


def write_split(
    split: str,
    samples: list[PlannedSample],
    figures: dict[str, str],
    options: ShardOptions,
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    done: list[ShardRecord],
    progress: tqdm,
    lock: OutputLock,
) -> tuple[list[ShardRecord], list[dict[str, Any]]]:
    """Write one split from where `done` (its finished shards, in order) left off.
    `figures` holds the identity of every figure (`input_digests`). Returns (all shard
    records, rows skipped after the last shard)."""
    start = done[-1].end if done else 0
    progress.update(start)
    writer = ShardWriterState(
        out_fs,
        out_root,
        options,
        split,
        len(done),
        start,
        lambda first, end: input_digests(samples, figures, first, end),
    )
    try:
        return _fill_shards(writer, samples, start, options, progress, done, lock)
    finally:
        writer.shutdown()


def _fill_shards(
    writer: ShardWriterState,
    samples: list[PlannedSample],
    start: int,
    options: ShardOptions,
    progress: tqdm,
    done: list[ShardRecord],
    lock: OutputLock,
) -> tuple[list[ShardRecord], list[dict[str, Any]]]:
    figures = load_figures(samples[start:], options)
    for position, (sample, figure) in enumerate(
        zip(samples[start:], figures, strict=True), start=start
    ):
        lock.check()
        if isinstance(figure, FigureError):
            skip = Skip(sample.row, figure.reason, figure.detail, sample.image)
            if options.strict:
                raise ValueError(_describe_skip(skip))
            writer.skipped.append(skip.to_json())
        else:
            writer.add(position, sample_members(sample, figure), figure.conversion)
        progress.update(1)
    if writer.num_samples:
        writer.close(end=len(samples))
    writer.wait()
    return done + writer.finished, writer.skipped


# --------------------------------------------------------------------------- 5. manifest


def _load_progress(
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    options: ShardOptions,
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
        _write_json(out_fs, options_path, wanted, retry)
    listed = {path.rsplit("/", 1)[-1] for path in _list(out_fs, progress_root, retry)}
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
        lambda: storage.file_identities(out_fs, out_root, wanted_files),
    )
    done: dict[str, list[ShardRecord]] = {}
    tails: dict[str, list[dict[str, Any]]] = {}
    for split, split_records in records.items():
        samples = samples_by_split.get(split, [])
        num_valid, reason = _first_stale(split_records, samples, figures, stored)
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
            _discard_shards(out_fs, out_root, options, split, num_valid, retry)
        elif tail is not None and not _tail_matches(tail, split_records, samples, figures):
            delete(out_fs, tail_path, retry)
        elif tail is not None:
            tails[split] = tail["skipped"]
        done[split] = split_records[:num_valid]
    return done, tails


def index_name(shard: str) -> str:
    return shard_index.index_url(shard).rsplit("/", 1)[-1]


def _first_stale(
    records: list[ShardRecord],
    samples: list[PlannedSample],
    figures: dict[str, str],
    stored: dict[str, str],
) -> tuple[int, str]:
    """(index of the first record that cannot be reused, why); len(records) if none."""
    for i, record in enumerate(records):
        rows_sha256, figures_sha256 = input_digests(samples, figures, record.start, record.end)
        if record.rows_sha256 != rows_sha256:
            reason = (
                "its input rows changed since it was written (a caption or another field, "
                "or rows added, removed or reordered)"
            )
        elif record.figures_sha256 != figures_sha256:
            reason = "one of its figures changed since it was written (size, mtime, ETag or CRC)"
        elif record.name not in stored:
            reason = "the recorded shard is missing"
        elif stored[record.name] != record.stored:
            reason = (
                f"the shard changed since it was recorded ({record.stored} then, "
                f"{stored[record.name]} now)"
            )
        elif index_name(record.name) not in stored:
            reason = f"its index {index_name(record.name)} is missing"
        else:
            continue
        return i, reason
    return len(records), ""


def _tail_matches(
    tail: dict[str, Any],
    records: list[ShardRecord],
    samples: list[PlannedSample],
    figures: dict[str, str],
) -> bool:
    """Whether a split's complete.json (rows skipped after its last shard) still holds."""
    start = records[-1].end if records else 0
    digests = input_digests(samples, figures, start, len(samples))
    return tail.get("start") == start and tail.get("sha256") == list(digests)


def _discard_shards(
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    options: ShardOptions,
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
            for path in _list(out_fs, folder, retry)
            if (m := file_name.match(path.rsplit("/", 1)[-1])) and int(m["index"]) >= first
        )

    tail = storage.join(progress_root, f"{split}.complete.json")
    for path in [*listing_paths(out_root, options), tail]:
        if exists(out_fs, path, retry):
            delete(out_fs, path, retry)
    for path in [*doomed(progress_root), *doomed(out_root)]:  # listed: they exist
        delete(out_fs, path, retry)


def listing_paths(out_root: str, options: ShardOptions) -> list[str]:
    """What lists shards: the output's manifest.json and sizes.json (a part's shards are
    listed there too once merged), and a part's summary."""
    paths = [storage.join(out_root, name) for name in ("manifest.json", "sizes.json")]
    if options.is_part:
        paths.append(storage.join(options.progress_folder(out_root), PART_SUMMARY))
    return paths


def _list(fs: fsspec.AbstractFileSystem, folder: str, retry: storage.RetryPolicy) -> list[str]:
    """The paths directly in `folder` (none if it does not exist)."""
    if not exists(fs, folder, retry):
        return []
    paths = retried(fs, retry, "list", folder, lambda: fs.ls(folder, detail=False))
    return [str(path) for path in paths]


def delete(fs: fsspec.AbstractFileSystem, path: str, retry: storage.RetryPolicy) -> None:
    retried(fs, retry, "delete", path, lambda: fs.rm_file(path))


def build_manifest(
    fingerprint: dict[str, Any],
    records: dict[str, list[ShardRecord]],
    skips: list[dict[str, Any]],
    num_rows: int,
) -> dict[str, Any]:
    """The manifest of `records` (per split, in order); `fingerprint` is
    `ShardOptions.fingerprint()`, shared by every part of one output."""
    shards = [r for split in sorted(records) for r in records[split]]
    num_written = sum(r.count for r in shards)
    by_reason = collections.Counter(s["reason"] for s in skips)
    converted: collections.Counter[str] = collections.Counter()
    for record in shards:
        converted.update(record.converted)
    return {
        "format_version": MANIFEST_VERSION,
        "options": fingerprint,
        "shards": [
            {
                "name": r.name,
                "split": r.split,
                "count": r.count,
                "bytes": r.bytes,
                "sha256": r.sha256,
            }
            for r in shards
        ],
        "splits": {
            split: {
                "samples": sum(r.count for r in rs),
                "shards": len(rs),
                "bytes": sum(r.bytes for r in rs),
                "pattern": brace_pattern(f"{fingerprint['prefix']}-{split}-", rs),
            }
            for split, rs in sorted(records.items())
        },
        "rows": {
            "read": num_rows,
            "written": num_written,
            "skipped": len(skips),
            "skipped_by_reason": dict(sorted(by_reason.items())),
            "converted": sum(converted.values()),
            "converted_by_reason": dict(sorted(converted.items())),
        },
    }


def brace_pattern(base: str, records: Sequence[ShardRecord]) -> str:
    """One pattern for a split's shards, as --train-data takes it: `BASE{000000..000131}.tar`,
    or for parts `BASE{part00000-{000000..000041},part00001-{000000..000043}}.tar` (each
    part's shards are numbered from 0; braceexpand nests)."""
    counts: dict[str, int] = {}  # stem after `base` -> shards, in order
    for record in records:
        stem = record.name[len(base) :].removesuffix(".tar")[:-7]  # drop "-NNNNNN"
        assert record.name.startswith(base) and record.index == counts.get(stem, 0), record
        counts[stem] = record.index + 1
    ranges = [f"{stem}{'-' if stem else ''}{{{0:06d}..{n - 1:06d}}}" for stem, n in counts.items()]
    if not ranges:
        return ""
    return f"{base}{ranges[0] if len(ranges) == 1 else '{' + ','.join(ranges) + '}'}.tar"


def make_shards(options: ShardOptions) -> dict[str, Any]:
    """Run every stage; return the manifest. Safe to rerun after a crash. One run at a
    time per --output (output_lock)."""
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
    done, tails = _load_progress(out_fs, out_root, options, samples_by_split, figures)
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
                    split, samples, figures, options, out_fs, out_root, done[split], progress, lock
                )
                tails[split] = tail
                start = records[split][-1].end if records[split] else 0
                complete = {
                    "skipped": tail,
                    "start": start,
                    "sha256": list(input_digests(samples, figures, start, len(samples))),
                }
                _write_json(
                    out_fs,
                    storage.join(options.progress_folder(out_root), f"{split}.complete.json"),
                    complete,
                    retry,
                )
            skips += [s for r in records[split] for s in r.skipped] + tails[split]
    skips.sort(key=lambda s: s["row"])
    manifest = build_manifest(options.fingerprint(), records, skips, planned.num_rows)
    counts = manifest["rows"]
    assert counts["read"] == counts["written"] + counts["skipped"], counts
    if options.is_part:
        summary = part_summary(options, manifest, records, skips, planned.num_input_rows)
        _write_part_summary(out_fs, out_root, options, summary, retry)
    else:
        write_listings(out_fs, out_root, manifest, skips, retry)
    print_summary(manifest, time.monotonic() - started, num_total)
    return manifest


def _input_rows(options: ShardOptions) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    """read_rows, with a missing --input as a start-up error and the store's failures
    as StorageError (errors of the code consuming the rows pass through untouched)."""
    try:
        yield from read_rows(options.input, options.csv_separator)
    except FileNotFoundError:
        raise ValueError(f"--input {storage.redact_url(options.input)} does not exist") from None
    except ValueError:
        raise
    except Exception as e:  # the store's own errors (botocore's are not OSErrors)
        raise storage.StorageError(
            f"cannot read --input {storage.redact_url(options.input)}: "
            f"{storage.describe_error(e, options.input)}"
        ) from None


def write_listings(
    fs: fsspec.AbstractFileSystem,
    out_root: str,
    manifest: dict[str, Any],
    skips: list[dict[str, Any]],
    retry: storage.RetryPolicy,
) -> None:
    """The output's sizes.json (OpenCLIP's format), skipped.jsonl, then manifest.json: the
    manifest last, so one that exists describes the files beside it."""
    sizes = {r["name"]: r["count"] for r in manifest["shards"]}
    _write_json(fs, storage.join(out_root, "sizes.json"), sizes, retry)
    skipped_text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skips)
    skipped_path = storage.join(out_root, "skipped.jsonl")
    with storage.redacting_errors("write", where_of(fs, skipped_path)):
        storage.write_bytes_atomic(fs, skipped_path, skipped_text.encode("utf-8"), retry)
    _write_json(fs, storage.join(out_root, "manifest.json"), manifest, retry)


def part_summary(
    options: ShardOptions,
    manifest: dict[str, Any],
    records: dict[str, list[ShardRecord]],
    skips: list[dict[str, Any]],
    num_input_rows: int,
) -> dict[str, Any]:
    """What `make_shards --merge` needs of a finished part: its manifest, plus its shard
    records (with the stored files' identities, checked against a listing at merge),
    its skipped rows and the row count of the whole input (every part must agree)."""
    return {
        **manifest,
        "part": options.part,
        "num_parts": options.num_parts,
        "input_rows": num_input_rows,
        "records": [dataclasses.asdict(r) for split in sorted(records) for r in records[split]],
        "skipped": skips,
    }


def _write_part_summary(
    fs: fsspec.AbstractFileSystem,
    out_root: str,
    options: ShardOptions,
    summary: dict[str, Any],
    retry: storage.RetryPolicy,
) -> None:
    """A part whose summary changes (a rerun over changed input) first removes the merged
    manifest.json and sizes.json: they list the part as it was. Rerunning a finished,
    unchanged part leaves them alone."""
    path = storage.join(options.progress_folder(out_root), PART_SUMMARY)
    if exists(fs, path, retry) and read_json(fs, path, retry) == summary:
        return
    for listing in listing_paths(out_root, options):
        if exists(fs, listing, retry):
            delete(fs, listing, retry)
    _write_json(fs, path, summary, retry)


def _figure_identities(
    options: ShardOptions, samples_by_split: dict[str, list[PlannedSample]]
) -> dict[str, str]:
    """The identity of every planned figure (storage.file_identities: one listing of
    --images), which resume checks compare (`input_digests`)."""
    wanted = {s.image for samples in samples_by_split.values() for s in samples}
    with storage.redacting_errors("list --images", options.images):
        fs, root = storage.url_to_fs(options.images)
        return storage.file_identities(fs, root, wanted)


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


def print_summary(manifest: dict[str, Any], seconds: float, num_images: int | None) -> None:
    """The counts, to stderr; `num_images` (figures loaded) gives the rate."""
    rows = manifest["rows"]
    rate = "" if num_images is None else f" ({num_images / max(seconds, 1e-9):.1f} images/s)"
    print(
        f"rows read {rows['read']}, written {rows['written']}, skipped {rows['skipped']}"
        f" in {seconds:.1f} s{rate}",
        file=sys.stderr,
    )
    for reason, count in rows["skipped_by_reason"].items():
        print(f"  skipped {count:>8} {reason}", file=sys.stderr)
    for reason, count in rows["converted_by_reason"].items():
        print(f"  converted {count:>6} {reason} (written)", file=sys.stderr)
    for split, info in manifest["splits"].items():
        print(
            f"  {split:>8}: {info['samples']} samples in {info['shards']} shards "
            f"({info['bytes'] / 1e6:.1f} MB) {info['pattern']}",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- CLI


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
    p.add_argument("--prefix", default="pmc-oa", help="shard names: PREFIX-SPLIT-NNNNNN.tar")
    p.add_argument("--csv-img-key", default="image")
    p.add_argument("--csv-caption-key", default="caption")
    p.add_argument("--csv-separator", default=",")
    p.add_argument("--split", default=None, help="put every row in this split")
    p.add_argument("--split-column", default="split", help="used when the input has it")
    p.add_argument("--article-column", default="pmcid")
    p.add_argument("--split-fractions", default="train=0.8,valid=0.1,test=0.1")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    p.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes (default: every core this process may use, e.g. its SLURM allocation)",
    )
    p.add_argument(
        "--num-parts",
        type=int,
        default=ShardOptions.num_parts,
        help="split the work into this many parts, by article, one run each (a SLURM array: "
        "launch/make_shards_array.sh); then --merge",
    )
    p.add_argument(
        "--part",
        type=int,
        default=ShardOptions.part,
        help="which part this run writes, 0..NUM_PARTS-1 (resumable per part)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="after every part has finished: check them and write the output's sizes.json, "
        "manifest.json and skipped.jsonl (needs only --output)",
    )
    p.add_argument("--shuffle", action="store_true", help="shuffle rows within each split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize-max-side", type=int, default=None)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--max-image-pixels", type=int, default=FigureOptions.max_image_pixels)
    p.add_argument("--max-image-bytes", type=int, default=FigureOptions.max_image_bytes)
    p.add_argument("--max-caption-chars", type=int, default=100_000)
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument(
        "--upload-max-attempts",
        type=int,
        default=ShardOptions.upload_max_attempts,
        help="tries of each call on an object-store --output before the run stops",
    )
    p.add_argument(
        "--upload-backoff-seconds",
        type=float,
        default=ShardOptions.upload_backoff_seconds,
        help="first wait between tries; doubles each time (jittered, at most 60 s)",
    )
    return p


def options_from_args(args: argparse.Namespace) -> ShardOptions:
    if args.input is None or args.images is None:
        raise ValueError("--input and --images are required (all but --merge)")
    return ShardOptions(
        input=args.input,
        images=args.images,
        output=args.output,
        prefix=args.prefix,
        img_key=args.csv_img_key,
        caption_key=args.csv_caption_key,
        csv_separator=args.csv_separator,
        split=args.split,
        split_column=args.split_column,
        article_column=args.article_column,
        split_fractions=parse_split_fractions(args.split_fractions),
        shard_size=args.shard_size,
        max_shard_bytes=args.max_shard_bytes,
        shuffle=args.shuffle,
        seed=args.seed,
        max_caption_chars=args.max_caption_chars,
        figure=FigureOptions(
            resize_max_side=args.resize_max_side,
            jpeg_quality=args.jpeg_quality,
            max_image_pixels=args.max_image_pixels,
            max_image_bytes=args.max_image_bytes,
        ),
        workers=len(os.sched_getaffinity(0)) if args.workers is None else args.workers,
        strict=args.strict,
        upload_max_attempts=args.upload_max_attempts,
        upload_backoff_seconds=args.upload_backoff_seconds,
        num_parts=args.num_parts,
        part=args.part,
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
            from pmc_clip.shard_merge import merge_parts  # it builds on this module

            retry = upload_retry_policy(args.upload_max_attempts, args.upload_backoff_seconds)
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


if __name__ == "__main__":
    sys.exit(main())

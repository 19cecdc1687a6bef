"""Stage 2, plan: row checks (caption, image path), the webdataset-safe key, the split
(a stable hash of the article id), the part of a run in parts, and the shuffle: what
each shard will hold, before any figure is read."""

from __future__ import annotations

import collections
import hashlib
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pmc_clip import storage
from pmc_clip.sharding.options import NAME_SAFE, ShardOptions
from pmc_clip.sharding.rows import Skip

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# How many rows _check_key_columns looks at (a few bad ones among them are fine), and how
# many of the column names found its message lists.
_KEY_CHECK_ROWS = 1000
_KEY_CHECK_NAMES_SHOWN = 12


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


def article_id_for(rel_path: str, record: dict[str, Any], *, article_column: str) -> str:
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
                raise ValueError(describe_skip(checked))
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
    article_id = article_id_for(rel_path, record, article_column=options.article_column)
    if options.split is not None:
        split = options.split
    elif options.split_column in record:
        split = str(record[options.split_column]).strip()
        if not NAME_SAFE.match(split):
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


def describe_skip(skip: Skip) -> str:
    where = f"row {skip.row}" + (f" ({skip.image})" if skip.image else "")
    return f"{where}: {skip.reason}: {skip.detail} (--strict stops at the first bad row)"

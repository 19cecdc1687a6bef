"""Stage 1, rows: the input's records (JSONL or CSV), every row numbered (0-based record
index); a record that cannot be parsed is a `Skip` with its reason, not an error."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec

from pmc_clip import storage

# The csv module refuses fields above 128 KiB; a long caption is a row to skip with a
# reason (caption_too_long), not a crash.
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Skip:
    row: int
    reason: str
    detail: str
    image: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "image": self.image, "reason": self.reason, "detail": self.detail}


def read_rows(url: str, *, csv_separator: str) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
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

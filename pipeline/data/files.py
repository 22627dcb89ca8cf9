"""Reading labelled-text files (CSV, TSV, JSONL, JSON) into records that remember their line.

Decoding is explicit: the bytes are decoded with `data.encoding` (default utf-8; a UTF-8 byte-order
mark is dropped, so the first column is `text`, not `\\ufefftext`); bytes that do not decode stop with
the file, byte offset, line and the option to set. The text is then parsed by the standard library's
readers: `csv` (strict quoting) for CSV/TSV, `json` for JSON and JSON Lines. Not pandas: for checking
every row it cannot tell a short row from an empty last field (both read as "" or both as NaN) and it
silently drops the extra fields when every row has one more than the header; `csv` gives each
record's field count and physical line (`line_num`), `json` the line and column of a syntax error.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class Records:
    """The rows of one file and where each one starts."""

    origin: str  # "data.train_path: train.csv": the head of every message about this file
    unit: str  # "line" (CSV, TSV, JSONL) or "item" (a JSON array's element, counted from 1)
    rows: list[dict]  # CSV: header -> field, only rows with exactly the header's field count
    locs: list[int]  # per row: its first line (or item number)
    columns: list[str]  # CSV: the header; JSON: every key, in order of first appearance
    problems: list[tuple[int, str]]  # (line or item, message) of records that could not be read

    def where(self, i: int) -> str:
        return f"{self.origin} {self.unit} {self.locs[i]}"


def read_records(path_str: str, key: str, encoding: str, problems: list[str]) -> Records | None:
    """Read one file; append every problem found to `problems` (None when nothing could be read).

    Problems with the file as a whole go to `problems`; records that cannot be read go to
    `Records.problems` with their line, for the caller to merge with its row checks in line order.

    Args:
        path_str: the path as configured (messages show it as the user wrote it).
        key: its config key, e.g. "data.train_path".
        encoding: `data.encoding`, a known codec (see `encoding_problem`).
    """
    path = Path(path_str).expanduser()
    origin = f"{key}: {path_str}"
    if not path.is_file():
        problems.append(f"{key}: file not found: {path_str}")
        return None
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        problems.append(f"{key}: unsupported file type {suffix!r}; valid: {', '.join(SUFFIXES)}")
        return None
    text = _decode(path.read_bytes(), encoding, origin, problems)
    if text is None:
        return None
    if not text.strip():
        problems.append(f"{origin}: the file is empty")
        return None
    if suffix in (".csv", ".tsv"):
        records = _read_csv(text, "\t" if suffix == ".tsv" else ",", origin)
    elif suffix == ".json" and text.lstrip().startswith("["):
        records = _read_json_array(text, origin, problems)
    else:  # .jsonl, and .json holding one object per line
        records = _read_json_lines(text, origin)
    if records is not None and not records.rows and not records.problems:
        problems.append(f"{origin}: no rows")
    return records


def encoding_problem(encoding: str) -> str | None:
    """Why `data.encoding` names no codec Python knows, or None."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        return f"data.encoding: unknown encoding {encoding!r} (e.g. utf-8, latin-1, cp1252, utf-16)"
    return None


def _decode(raw: bytes, encoding: str, origin: str, problems: list[str]) -> str | None:
    codec = codecs.lookup(encoding).name
    skipped = 0
    if codec in ("utf-8", "utf-8-sig"):
        # A BOM is an encoding mark, not data: drop it (Excel writes one), count it in byte offsets.
        codec, skipped = "utf-8", len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skipped:].decode(codec)
    except UnicodeDecodeError as exc:
        offset = skipped + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        problems.append(
            f"{origin}: not valid {encoding} at byte offset {offset} (line {line}, byte 0x{raw[offset]:02x}); "
            "set data.encoding to the file's encoding, e.g. data.encoding=latin-1"
        )
        return None


def _read_csv(text: str, delimiter: str, origin: str) -> Records:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows, locs, bad = [], [], []
    start = 1  # first line of the record being read: a quoted field may span lines
    try:
        for fields in reader:
            if not fields:  # a blank line
                start = reader.line_num + 1
                continue
            if header is None:
                header = fields
                for name in sorted({c for c in header if header.count(c) > 1}):
                    bad.append((start, f"{origin} line {start}: column {name!r} appears more than once in the header"))
            elif len(fields) != len(header):
                n = len(fields)
                missing = f" (missing: {', '.join(header[n:])})" if n < len(header) else ""
                bad.append((start, f"{origin} line {start}: {n} field{'s' if n != 1 else ''}, the header has {len(header)}{missing}"))
            else:
                rows.append(dict(zip(header, fields)))
                locs.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:  # strict mode: a stray quote, an unterminated quoted field
        bad.append((start, f"{origin} line {start}: malformed CSV ({exc}); the rest of the file was not read"))
    return Records(origin, "line", rows, locs, header or [], bad)


def _read_json_lines(text: str, origin: str) -> Records:
    rows, locs, columns, bad = [], [], {}, []
    # Split on "\n" only: str.splitlines() would also split inside strings at U+2028 and friends.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append((n, f"{origin} line {n}, column {exc.colno}: invalid JSON ({exc.msg})"))
            continue
        if not isinstance(row, dict):
            bad.append((n, f"{origin} line {n}: expected a JSON object, got {type(row).__name__}"))
            continue
        rows.append(row)
        locs.append(n)
        columns.update(dict.fromkeys(row))
    return Records(origin, "line", rows, locs, list(columns), bad)


def _read_json_array(text: str, origin: str, problems: list[str]) -> Records | None:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(f"{origin} line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})")
        return None
    if not isinstance(items, list):
        problems.append(f"{origin}: expected a JSON array of objects or one object per line")
        return None
    rows, locs, columns, bad = [], [], {}, []
    for n, row in enumerate(items, start=1):
        if not isinstance(row, dict):
            bad.append((n, f"{origin} item {n}: expected a JSON object, got {type(row).__name__}"))
            continue
        rows.append(row)
        locs.append(n)
        columns.update(dict.fromkeys(row))
    return Records(origin, "item", rows, locs, list(columns), bad)

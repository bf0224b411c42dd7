"""Reading users' CSV files and writing CSV results safely.

Reading: UTF-8 (with or without BOM), UTF-16 (by its BOM), else cp1252; NUL bytes dropped;
embedded newlines kept (the csv module handles quoted fields); size, row and field limits
checked; header names matched case-insensitively.
Writing: cells that a spreadsheet would run as a formula (= + - @, tab, CR, also after
leading spaces or line breaks, and their full-width forms such as U+FF1D) are neutralised.
"""

import csv
import io
import os
import tempfile
from pathlib import Path

from .errors import InputError

MAX_BYTES = 5 * 1024 * 1024
MAX_ROWS = 1000
MAX_FIELD = 100_000
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# spreadsheets also read full-width signs (＝ ＋ － ＠) as formula starts
FULL_WIDTH = str.maketrans("\uff1d\uff0b\uff0d\uff20", "=+-@")


def decode_bytes(raw: bytes) -> tuple:
    """(text, encoding name) for a user's text file."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        # an odd byte count (a cut file) must not fail the whole read
        return raw.decode("utf-16", errors="replace"), "UTF-16"
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8", errors="replace"), "UTF-8 with BOM"
    try:
        return raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace"), "cp1252"


def read_csv(path, columns: list, max_rows: int = MAX_ROWS) -> tuple:
    """(rows as dicts with exactly `columns`, notices). Column names match case-insensitively;
    with no header row naming them, the first len(columns) columns are taken in order."""
    path = Path(path)
    if path.stat().st_size > MAX_BYTES:
        raise InputError(f"{path.name} is {path.stat().st_size:,} bytes; the limit is {MAX_BYTES:,}.")
    text, encoding = decode_bytes(path.read_bytes())
    text = text.replace("\x00", "")
    notices = [] if encoding.startswith("UTF-8") else [f"Read {path.name} as {encoding}."]
    csv.field_size_limit(MAX_FIELD)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    try:
        table = [row for row in csv.reader(io.StringIO(text), dialect) if any(c.strip() for c in row)]
    except csv.Error as exc:
        raise InputError(f"{path.name} is not a readable CSV file: {exc}") from None
    if not table:
        raise InputError(f"{path.name} has no rows.")
    header = [h.strip().lower() for h in table[0]]
    if all(c in header for c in columns):
        index = [header.index(c) for c in columns]
        body = table[1:]
    else:
        if len(table[0]) < len(columns):
            raise InputError(f"{path.name} needs the column(s) {', '.join(columns)}.")
        index = list(range(len(columns)))
        body = table
        notices.append(f"No header naming {', '.join(columns)}: used the first "
                       f"{len(columns)} column(s).")
    if len(body) > max_rows:
        notices.append(f"{len(body)} rows; only the first {max_rows} were used.")
        body = body[:max_rows]
    rows = [{c: (row[i] if i < len(row) else "") for c, i in zip(columns, index)} for row in body]
    return rows, notices


def neutralise(value) -> str:
    """A cell a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    start = text.lstrip(" \n\u00a0\u3000").translate(FULL_WIDTH)
    return "'" + text if text.startswith(FORMULA_START) or start.startswith(FORMULA_START) \
        else text


def write_csv(rows: list, columns: list, name: str = "results.csv", folder=None) -> str:
    """Write rows (dicts) to `folder` (default: a fresh temp folder); returns the file path."""
    folder = folder or tempfile.mkdtemp(prefix="mmcore-out-")
    path = os.path.join(folder, name)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([neutralise(row.get(c, "")) for c in columns])
    return path

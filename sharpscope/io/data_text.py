"""Text files, ``.jsonl`` (one JSON object per line) and ``.csv`` (a header row), as rows of
fields for :func:`~sharpscope.io.text_tables.text_table`."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path
from typing import Any

from sharpscope.errors import InputError
from sharpscope.io.data_sources import Source, single_split
from sharpscope.io.text_tables import Records, text_table
from sharpscope.io.tokenizer import TextSpec

TEXT_SUFFIXES = (".jsonl", ".csv")


def text_source(path: Path, name: str, spec: TextSpec) -> Source:
    """A ``.jsonl`` or ``.csv`` file of text, tokenized by ``spec`` when a split is opened."""
    read = _read_jsonl if path.suffix.lower() == ".jsonl" else _read_csv
    rows, lines = read(path, name)
    fields = tuple(dict.fromkeys(key for row in rows for key in row))

    def column(field: str, idx: list[int] | None) -> list[Any]:
        picked = rows if idx is None else [rows[i] for i in idx]
        return [row.get(field) for row in picked]

    records = Records(name, len(rows), fields, column, lambda i: f"line {lines[i]}")
    hint = ", or pass the other split as its own file"
    return single_split(name, partial(text_table, records, spec), hint)


def _read_jsonl(path: Path, name: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The objects of the non-blank lines, and their line numbers."""
    rows, lines = [], []
    for number, line in enumerate(_text(path, name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(
                f"{name} line {number} is not valid JSON ({exc}); write one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise InputError(
                f"{name} line {number} holds a {type(row).__name__}, not an object; write one "
                'JSON object per line, like {"text": "...", "label": 0}'
            )
        rows.append(row)
        lines.append(number)
    if not rows:
        raise InputError(f"{name} is empty; write one JSON object per line")
    return rows, lines


def _read_csv(path: Path, name: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows under the header, as dicts, and the line each ends on (the header is line 1)."""
    reader = csv.DictReader(_text(path, name).splitlines())
    rows, lines = [], []
    try:
        for row in reader:
            if None in row:
                raise InputError(
                    f"{name} line {reader.line_num} has more cells than the header names; "
                    "quote cells that hold commas"
                )
            rows.append(dict(row))
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise InputError(f"{name} line {reader.line_num} is not valid CSV ({exc})") from None
    if not rows:
        what = "is empty" if reader.fieldnames is None else "has a header but no rows"
        raise InputError(f"{name} {what}; write a header row of field names, then the rows")
    return rows, lines


def _text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None

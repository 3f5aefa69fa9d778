"""A run's metric log: ``metrics.jsonl`` (the record), ``metrics.csv`` (the same rows for
spreadsheets) and, when ``tensorboard`` is installed, TensorBoard event files.

Rows are appended and flushed one by one. A resumed run first drops the rows after its
checkpoint's step (they are recomputed), so no row is duplicated or lost.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sharpscope.io.atomic import write_text_atomic
from sharpscope.io.json_values import json_safe

JSONL = "metrics.jsonl"
CSV = "metrics.csv"
TENSORBOARD = "tensorboard"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a line cut short by a killed process is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class MetricsLog:
    """Appends rows of ``fields`` to the logs in ``folder``.

    ``resume_step`` None starts new logs; otherwise the rows up to that step are kept and the
    rest dropped (in both files, rewritten atomically from ``metrics.jsonl``) before appending.
    """

    def __init__(self, folder: Path, fields: Sequence[str], resume_step: int | None) -> None:
        self.folder = folder
        self.fields = tuple(fields)
        kept = [] if resume_step is None else read_rows(folder / JSONL)
        self.rows = [r for r in kept if resume_step is not None and r["step"] <= resume_step]
        write_text_atomic(folder / JSONL, "".join(self._json_line(r) for r in self.rows))
        write_text_atomic(
            folder / CSV, self._csv_lines([self.fields, *map(self._values, self.rows)])
        )
        self._jsonl = (folder / JSONL).open("a", encoding="utf-8")
        self._csv = (folder / CSV).open("a", encoding="utf-8", newline="")
        self._board = _tensorboard(folder / TENSORBOARD, resume_step)

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one row (missing fields are empty) to every log and flush it."""
        clean = {f: json_safe(row.get(f)) for f in self.fields}
        self.rows.append(clean)
        self._jsonl.write(self._json_line(clean))
        self._jsonl.flush()
        self._csv.write(self._csv_lines([self._values(clean)]))
        self._csv.flush()
        if self._board is not None:
            for name, value in clean.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(name, value, clean["step"])
            self._board.flush()

    def close(self) -> None:
        """Close the files."""
        self._jsonl.close()
        self._csv.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json_line(self, row: Mapping[str, Any]) -> str:
        return json.dumps({f: row.get(f) for f in self.fields}, allow_nan=False) + "\n"

    def _values(self, row: Mapping[str, Any]) -> list[Any]:
        return ["" if row.get(f) is None else row[f] for f in self.fields]

    @staticmethod
    def _csv_lines(rows: Sequence[Sequence[Any]]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue()


def _tensorboard(folder: Path, resume_step: int | None) -> Any:
    """A TensorBoard ``SummaryWriter`` when the ``tensorboard`` package is installed, else None;
    on resume, events after ``resume_step`` are purged."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(str(folder), purge_step=purge)

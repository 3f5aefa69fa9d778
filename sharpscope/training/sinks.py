"""Where a :class:`~sharpscope.training.tracking.SharpnessTracker` sends its rows: a list, an
append-only ``metrics.jsonl``, TensorBoard, or any callable."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sharpscope.io.json_values import json_safe

Row = Mapping[str, Any]
Sink = Callable[[Row], object]


class JsonlLog:
    """Appends each row as one JSON line to ``path`` (created with its folder if missing).

    Rows already in the file are kept. Each line goes out in one ``write`` and is flushed, so a
    killed process leaves at most a cut-short last line, which
    :func:`~sharpscope.training.metrics.read_rows` skips; a file that ends in such a line gets a
    line break first, so the next row starts on a line of its own.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if self._file.tell() > 0 and not _ends_with_newline(self.path):
            self._file.write("\n")

    def __call__(self, row: Row) -> None:
        self._file.write(json.dumps(json_safe(dict(row)), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class TensorBoardLog:
    """Adds each row's numbers to TensorBoard as scalars at the row's ``step``, under ``prefix``.

    ``target`` is a log folder (a ``SummaryWriter`` is made there; torch.utils.tensorboard is
    imported only then, and needs the ``tensorboard`` package) or an existing writer.
    """

    def __init__(self, target: str | os.PathLike[str] | Any, prefix: str = "sharpness/") -> None:
        if isinstance(target, (str, os.PathLike)):
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard

            target = SummaryWriter(str(target))
        self.writer = target
        self.prefix = prefix

    def __call__(self, row: Row) -> None:
        for name, value in scalars(row, self.prefix).items():
            self.writer.add_scalar(name, value, row.get("step"))
        self.writer.flush()

    def close(self) -> None:
        """Close the writer."""
        self.writer.close()


def scalars(row: Row, prefix: str = "") -> dict[str, float]:
    """The entries of ``row`` but its step that are finite numbers (bools as 0 or 1), as floats
    named ``prefix`` + key: what trainers' loggers take; None (not measured) and strings are left
    out."""
    return {
        prefix + k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
    }


def as_sinks(log: object) -> list[Sink]:
    """``log`` as a list of sinks: None gives none; a list collects rows; a path ending in
    ``.jsonl`` is a :class:`JsonlLog`; an object with ``add_scalar`` (a TensorBoard writer) a
    :class:`TensorBoardLog`; a callable is called with each row; a tuple is several of these."""
    if log is None:
        return []
    if isinstance(log, tuple):
        return [sink for item in log for sink in as_sinks(item)]
    if isinstance(log, list):
        return [log.append]
    if isinstance(log, (str, os.PathLike)):
        if Path(log).suffix != ".jsonl":
            raise ValueError(f"`log` {log!s}: a file log must be a .jsonl file")
        return [JsonlLog(log)]
    if hasattr(log, "add_scalar"):
        return [TensorBoardLog(log)]
    if callable(log):
        return [log]
    raise ValueError(
        f"`log` must be a list, a .jsonl path, a TensorBoard writer or a callable, got "
        f"{type(log).__name__}"
    )


def close_all(sinks: Sequence[Sink]) -> None:
    """Close the sinks that have a ``close`` (files and writers)."""
    for sink in sinks:
        if isinstance(sink, (JsonlLog, TensorBoardLog)):
            sink.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"

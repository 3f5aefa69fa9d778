"""The CI gate's files: telling a report from a checkpoint, and writing the baseline report."""

from __future__ import annotations

import re
from pathlib import Path

from sharpscope.errors import InputError
from sharpscope.io.atomic import write_text_atomic
from sharpscope.report.document import Report, read_report

_REPORT_HEAD = re.compile(rb'\s*\{\s*["}]')
"""How a JSON report starts; no checkpoint format does (a safetensors header length can be 0x7b)."""


def is_report_file(path: Path) -> bool:
    """Whether ``path`` is meant as a JSON report: a ``.json`` name, or JSON object content."""
    if path.suffix.lower() == ".json":
        return True
    try:
        with path.open("rb") as file:
            return bool(_REPORT_HEAD.match(file.read(256)))
    except OSError:
        return False  # the checkpoint loader says what is wrong with it


def check_baseline_target(path: Path) -> None:
    """Refuse to make ``path`` the baseline when it holds something other than a report."""
    if path.exists():
        try:
            read_report(path)
        except InputError as exc:
            raise InputError(f"refusing to overwrite {path} with the baseline: {exc}") from None


def write_baseline(path: Path, report: Report) -> None:
    """Write ``report`` to ``path`` atomically (see :func:`check_baseline_target`)."""
    check_baseline_target(path)
    write_text_atomic(path, report.dumps())

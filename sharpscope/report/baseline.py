"""The CI gate's files: telling a report from a checkpoint, and reading and writing the baseline."""

from __future__ import annotations

import re
from pathlib import Path

from sharpscope.errors import InputError
from sharpscope.io.atomic import check_can_create, write_text_atomic
from sharpscope.report.document import Report, read_report
from sharpscope.report.schema import NotAReport

_REPORT_HEAD = re.compile(rb'\s*\{\s*["}]')
"""How a JSON report starts; no checkpoint format does (a safetensors header length can be 0x7b)."""

REMAKE = "make a new baseline with `update_baseline`"
"""How to replace a baseline that is a report but cannot be compared with."""


def is_report_file(path: Path) -> bool:
    """Whether ``path`` is meant as a JSON report: a ``.json`` name, or JSON object content."""
    if path.suffix.lower() == ".json":
        return True
    try:
        with path.open("rb") as file:
            return bool(_REPORT_HEAD.match(file.read(256)))
    except OSError:
        return False  # the checkpoint loader says what is wrong with it


def read_baseline(path: Path) -> Report:
    """The baseline report at ``path``; an :class:`InputError` that says how `update_baseline`
    makes a new one when it cannot be read."""
    try:
        return read_report(path, REMAKE)
    except NotAReport as exc:
        if not path.exists():
            raise InputError(f"{exc}; make the baseline with `update_baseline`") from None
        raise InputError(
            f"{exc}; `update_baseline` makes a new baseline, but never overwrites a file that is "
            "not a sharpscope report: remove this one first, or give another `baseline`"
        ) from None


def check_baseline_target(path: Path) -> None:
    """Refuse to make ``path`` the baseline when it holds something other than a sharpscope
    report (a report of another schema version, or a broken one, is replaced), or that cannot be
    written."""
    check_can_create(path, "`baseline`")
    if path.exists():
        try:
            read_report(path)
        except NotAReport as exc:
            raise InputError(f"refusing to overwrite {path} with the baseline: {exc}") from None
        except InputError:
            return  # a sharpscope report this version cannot compare with: the one to replace


def write_baseline(path: Path, report: Report) -> None:
    """Write ``report`` to ``path`` atomically (see :func:`check_baseline_target`)."""
    check_baseline_target(path)
    write_text_atomic(path, report.dumps())

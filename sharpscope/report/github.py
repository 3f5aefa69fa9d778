"""GitHub Actions output: workflow-command annotations and the Markdown step summary.

A flagged check becomes an ``::error`` annotation, one that passed only within its uncertainty a
``::warning``; the summary (a Markdown table of every check) is appended to the file that
``$GITHUB_STEP_SUMMARY`` names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from sharpscope.analysis.gate import Check
from sharpscope.io.atomic import write_text_atomic
from sharpscope.report.checks_table import (
    RESULT,
    limit_cell,
    metric_cell,
    value_cell,
    verdict_line,
)

LEVEL = {"fail": "error", "noise": "warning"}
ICON = {"pass": "✅", "noise": "⚠️", "fail": "❌"}


def publish(
    checks: list[Check], source: str, environ: Mapping[str, str], emit: Callable[[str], None]
) -> None:
    """In a GitHub Actions step (``GITHUB_ACTIONS=true``): ``emit`` the annotations and append the
    summary to ``$GITHUB_STEP_SUMMARY`` (when set). Elsewhere: nothing."""
    if environ.get("GITHUB_ACTIONS") != "true":
        return
    for line in annotations(checks):
        emit(line)
    if environ.get("GITHUB_STEP_SUMMARY"):
        append_step_summary(environ["GITHUB_STEP_SUMMARY"], step_summary(checks, source))


def annotations(checks: list[Check]) -> list[str]:
    """``::error title=...::message`` per flagged check, ``::warning`` per check within noise."""
    return [
        f"::{LEVEL[c.status]} title={_property(f'sharpscope check: {c.name}')}::{_data(c.message)}"
        for c in checks
        if c.status in LEVEL
    ]


def step_summary(checks: list[Check], source: str) -> str:
    """A Markdown section: the verdict, the gated source, and a table of the checks."""
    rows = [
        f"| {_cell(metric_cell(c))} | {_cell(value_cell(c))} | {_cell(limit_cell(c))} "
        f"| {ICON[c.status]} {RESULT[c.status]} |"
        for c in checks
    ]
    table = ["| metric | value ± uncertainty | limit | result |", "| --- | --- | ---: | --- |"]
    return "\n".join(
        [f"### sharpscope check: {verdict_line(checks)}", "", f"`{source}`", "", *table, *rows, ""]
    )


def append_step_summary(path: str | os.PathLike[str], markdown: str) -> None:
    """Append ``markdown`` to the summary file (rewritten atomically, earlier steps' text kept)."""
    target = Path(path)
    before = target.read_text(encoding="utf-8") if target.exists() else ""
    write_text_atomic(target, before + ("\n" if before else "") + markdown)


def _data(text: str) -> str:
    """Escape a workflow command's message (as the actions toolkit does)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _property(text: str) -> str:
    """Escape a workflow command's property value."""
    return _data(text).replace(":", "%3A").replace(",", "%2C")


def _cell(text: str) -> str:
    """A Markdown table cell: a ``|`` in the text would end it."""
    return text.replace("|", "\\|")

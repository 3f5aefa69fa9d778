"""The report's JSON Schema (``schema.json``, docs/report.md), and checking documents with it."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema

from sharpscope.errors import InputError

SCHEMA_VERSION = 2
REANALYZE = "re-create it with this version's `sharpscope analyze`"
"""What to do with a report of another schema version, or one the schema refuses."""


class NotAReport(InputError):
    """The file is not a sharpscope report at all: unreadable, not JSON, or no schema_version."""


def report_schema() -> dict[str, Any]:
    """The JSON Schema of the report (``sharpscope/report/schema.json``; see docs/report.md)."""
    return json.loads(resources.files("sharpscope.report").joinpath("schema.json").read_text())


def schema_problem(document: Any) -> str | None:
    """Where ``document`` first breaks the report schema, in one line, or None if it is valid."""
    validator = jsonschema.Draft202012Validator(report_schema())
    error = next(iter(sorted(validator.iter_errors(document), key=lambda e: list(e.path))), None)
    if error is None:
        return None
    where = ".".join(str(part) for part in error.path) or "the document"
    message = " ".join(error.message.split())
    return f"{where}: {message[:200]}"


def is_report(document: Any) -> bool:
    """Whether ``document`` is meant as a sharpscope report (of any version): an object with a
    ``schema_version``."""
    return isinstance(document, dict) and "schema_version" in document


def check_report(document: Any, source: str, remake: str = REANALYZE) -> None:
    """Raise an :class:`InputError` naming ``source`` unless ``document`` is a report of this
    schema version that the schema accepts (:class:`NotAReport` when it is no report at all);
    ``remake`` says how to replace a report that is one but cannot be used."""
    if not is_report(document):
        raise NotAReport(f"{source} is not a sharpscope report (it has no schema_version)")
    if document["schema_version"] != SCHEMA_VERSION:
        raise InputError(
            f"{source} has schema_version {document['schema_version']!r}, and this sharpscope "
            f"reads version {SCHEMA_VERSION}: {remake}"
        )
    problem = schema_problem(document)
    if problem is not None:
        raise InputError(f"{source} is not a valid sharpscope report: {problem}; {remake}")

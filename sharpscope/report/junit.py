"""The gate's checks as JUnit XML: one testcase per check, a ``<failure>`` for each flagged one.

The layout is the common one of Jenkins' ``junit-10.xsd`` (read by GitLab, Jenkins and the
GitHub test-report actions): ``testsuites > testsuite > testcase > failure | system-out``.
"""

from __future__ import annotations

import datetime
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from sharpscope.analysis.gate import Check
from sharpscope.errors import InputError
from sharpscope.io.atomic import check_can_create, write_text_atomic

SUITE = "sharpscope check"
MAX_BYTES = 64 << 20
"""A previous JUnit file larger than this is not one sharpscope wrote (it is not read)."""


def junit_xml(checks: list[Check], properties: dict[str, str], seconds: float = 0.0) -> str:
    """The XML document; ``properties`` (e.g. the gated source) go into the suite's properties."""
    counts = {
        "tests": str(len(checks)),
        "failures": str(sum(not c.passed for c in checks)),
        "errors": "0",
    }
    root = ET.Element("testsuites", name=SUITE, time=f"{seconds:.3f}", **counts)
    suite = ET.SubElement(
        root,
        "testsuite",
        name=SUITE,
        skipped="0",
        time=f"{seconds:.3f}",
        timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        **counts,
    )
    listed = ET.SubElement(suite, "properties")
    for name, value in properties.items():
        ET.SubElement(listed, "property", name=name, value=value)
    for check in checks:
        case = ET.SubElement(
            suite, "testcase", name=check.name, classname=f"sharpscope.{check.metric}", time="0"
        )
        if check.passed:
            ET.SubElement(case, "system-out").text = check.message
        else:
            failure = ET.SubElement(case, "failure", message=check.message, type=check.kind)
            failure.text = check.message
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(
    path: str | os.PathLike[str],
    checks: list[Check],
    properties: dict[str, str],
    seconds: float = 0.0,
) -> None:
    """Write :func:`junit_xml` to ``path`` atomically (see :func:`check_junit_target`)."""
    check_junit_target(path)
    write_text_atomic(path, junit_xml(checks, properties, seconds))


def check_junit_target(path: str | os.PathLike[str]) -> None:
    """Refuse ``path`` unless it can be written and is new or JUnit XML that sharpscope wrote
    (root ``testsuites`` named :data:`SUITE`), so that no other file is overwritten."""
    target = Path(path)
    check_can_create(target, "`junit`")
    if not target.exists() and not target.is_symlink():
        return
    problem = _not_ours(target)
    if problem:
        raise InputError(
            f"refusing to overwrite `junit` {target}: {problem}, not JUnit XML that sharpscope "
            "wrote; remove it first or give another path"
        )


def _not_ours(path: Path) -> str:
    """Why ``path`` is not a JUnit file of sharpscope's, or "" when it is one."""
    if path.is_symlink() or not path.is_file():
        return "it is a link or not a regular file"
    if path.stat().st_size > MAX_BYTES:
        return "it is larger than a sharpscope JUnit file"
    try:
        root = ET.fromstring(path.read_bytes())
    except (OSError, ET.ParseError):
        return "it is not XML"
    if root.tag != "testsuites" or root.get("name") != SUITE:
        return f"its root is <{root.tag}>, not <testsuites name={SUITE!r}>"
    return ""

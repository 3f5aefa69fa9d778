"""The gate's checks as JUnit XML: one testcase per check, a ``<failure>`` for each flagged one.

The layout is the common one of Jenkins' ``junit-10.xsd`` (read by GitLab, Jenkins and the
GitHub test-report actions): ``testsuites > testsuite > testcase > failure | system-out``.
"""

from __future__ import annotations

import datetime
import os
import xml.etree.ElementTree as ET

from sharpscope.analysis.gate import Check
from sharpscope.io.atomic import write_text_atomic

SUITE = "sharpscope check"


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
    """Write :func:`junit_xml` to ``path`` atomically."""
    write_text_atomic(path, junit_xml(checks, properties, seconds))

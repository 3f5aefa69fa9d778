"""The machine-readable result of a gate run: verdict, checks, figures and what was gated."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from sharpscope.analysis.gate import Check, figures
from sharpscope.report.document import Report


def check_result(
    checks: list[Check],
    report: Report,
    sigmas: float,
    source: Path,
    baseline: Path | None,
    config: Path | None,
) -> dict[str, Any]:
    """The verdict, every check, the report's figures at ``sigmas``, the files involved and the
    report's checkpoint, model and data, as JSON values."""
    inputs = report.inputs
    sections = {"checkpoint": inputs.checkpoint, "model": inputs.model, "data": inputs.data}
    return {
        "verdict": "fail" if any(not c.passed for c in checks) else "pass",
        "checks": [c.to_dict() for c in checks],
        "figures": {k: asdict(e) for k, e in figures(report.gate_input(), sigmas).items()},
        "sigmas": sigmas,
        "source": str(source),
        "baseline": None if baseline is None else str(baseline),
        "config": None if config is None else str(config),
        "report": {k: None if s is None else s.to_json() for k, s in sections.items()},
    }

"""Fixtures that several CLI test files share, each built once per test run, in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_cli import analyze_report, make_checkpoint


@pytest.fixture(scope="session")
def tiny_analysis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The tiny checkpoint and its ``analyze --json`` report with ``tiny_cli.FAST`` (read it, never
    edit it: copy it first)."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("tiny-analysis"))
    return checkpoint, analyze_report(checkpoint)

"""The command-line entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import sharpscope
from sharpscope.cli.app import app


def test_version_flag():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"sharpscope {sharpscope.__version__}"


@pytest.mark.integration
def test_python_dash_m_runs_the_same_app():
    out = subprocess.run(
        [sys.executable, "-m", "sharpscope", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.strip() == f"sharpscope {sharpscope.__version__}"


def test_unknown_option_is_a_usage_error():
    result = CliRunner().invoke(app, ["--no-such-flag"])
    assert result.exit_code == 2
    assert "No such option" in result.output

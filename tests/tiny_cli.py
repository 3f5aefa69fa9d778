"""The tiny command-line runs that many test folders share: a checkpoint, analysis options that
keep a run well under a second, its report, and the one-line refusal every bad input gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner, Result

from sharpscope.cli.app import app
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.models import ModelSpec, build_model

FAST = ["--data", "digits", "--samples", "64", "--top-k", "2", "--quiet"]
"""Analysis options that keep a run on the tiny model well under a second."""


def make_checkpoint(folder: Path) -> Path:
    """An untrained MLP with one hidden layer of 16, saved with its model spec."""
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": (16,)})
    path = folder / "tiny.safetensors"
    save_checkpoint(path, build_model(spec), spec)
    return path


def analyze_report(checkpoint: Path) -> dict[str, Any]:
    """``sharpscope analyze --json`` of the checkpoint on a 64-sample digits subset."""
    result = CliRunner().invoke(app, ["analyze", str(checkpoint), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refused(exit_code: int, stderr: str, *words: str) -> None:
    """Exit 2 with exactly one ``error:`` line on stderr that says each of ``words`` (of an
    in-process run or a subprocess alike)."""
    lines = stderr.strip().splitlines()
    assert exit_code == 2, (exit_code, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def one_error_line(result: Result, *words: str) -> None:
    """:func:`refused` for a CliRunner result."""
    refused(result.exit_code, result.stderr, *words)

"""Outputs and option clashes are refused before any work, with one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_check import FAST, check, make_checkpoint, one_error_line
from typer.testing import CliRunner

import sharpscope.cli.analyze as analyze_module
from sharpscope.cli.app import app
from sharpscope.io.architectures import mlp


@pytest.fixture
def no_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any analysis fail the test: the refusal must come before it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the analysis ran before the bad output was refused")

    monkeypatch.setattr(analyze_module, "analyze", refuse)


def analyze(*args: object) -> object:
    return CliRunner().invoke(app, ["analyze", *map(str, args)])


def test_out_under_a_regular_file(tmp_path, no_analysis):
    (tmp_path / "file").write_text("mine")
    result = analyze(make_checkpoint(tmp_path), *FAST, "--out", tmp_path / "file" / "report")
    one_error_line(result, "--out", "is a file, so nothing can be written under it")
    assert (tmp_path / "file").read_text() == "mine"


def test_out_that_is_a_file(tmp_path, no_analysis):
    (tmp_path / "file").write_text("mine")
    result = analyze(make_checkpoint(tmp_path), *FAST, "--out", tmp_path / "file")
    one_error_line(result, "--out", "is a file, not a folder")


def test_junit_that_is_a_folder_is_refused_before_the_analysis(tmp_path, no_analysis):
    result = check(make_checkpoint(tmp_path), *FAST, "--max-eigenvalue", 9, "--junit", tmp_path)
    one_error_line(result, "--junit", "is a folder; give a file path")
    assert result.stdout == ""  # no table was printed before the refusal


def test_junit_under_a_regular_file(tmp_path, no_analysis):
    (tmp_path / "file").touch()
    target = tmp_path / "file" / "checks.xml"
    result = check(make_checkpoint(tmp_path), *FAST, "--max-eigenvalue", 9, "--junit", target)
    one_error_line(result, "--junit", "is a file, so nothing can be written under it")


def test_torchscript_with_forward_over_reverse(tmp_path):
    model = mlp(hidden=(16,)).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    result = analyze(path, *FAST, "--backend", "forward-over-reverse")
    one_error_line(result, "--backend forward-over-reverse", "TorchScript", "double-backward")


def test_a_wrong_flag_is_one_usage_error():
    result = analyze("x.pt", "--data", "digits", "--top-kk", "3")
    assert result.exit_code == 2 and "--top-kk" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_option_per_message(tmp_path):
    for option, value, words in [
        ("--top-k", "0", ["--top-k must be at least 1, got 0"]),
        ("--rho", "-0.05", ["--rho must be positive, got -0.05"]),
        ("--alpha", "-1", ["--alpha must not be negative, got -1"]),
        ("--max-iter", "0", ["--max-iter must be at least 1, got 0"]),
    ]:
        result = analyze(Path("absent.pt"), "--data", "digits", option, value)
        one_error_line(result, *words)
        others = {"--top-k", "--rho", "--alpha", "--max-iter"} - {option}
        assert not any(other in result.stderr for other in others), result.stderr

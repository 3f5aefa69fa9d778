"""Misuse of the command line (items 12 and 13 of the attack probe): every usage error is one
``error:`` line and exit 2, and no number that is nan or infinite is taken for a setting."""

from __future__ import annotations

import pytest
import torch
from tiny_cli import FAST, make_checkpoint, refused

from security.attack import Snapshot, cli, run_sharpscope
from sharpscope.optim import SAM, EigenSAM


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["analyze", "x.pt", "--data", "digits", "--top-kk", "3"],
         ["No such option: --top-kk", "--top-k", "see sharpscope analyze --help"]),
        (["frobnicate"], ["No such command 'frobnicate'", "see sharpscope --help"]),
        (["check"], ["Missing argument", "see sharpscope check --help"]),
        (["analyze", "x.pt", "--top-k", "three"], ["'--top-k'", "integer"]),
        (["--bogus"], ["No such option: --bogus"]),
    ],
)  # fmt: skip
def test_a_usage_error_is_one_line(args, words):
    result = cli(*args)
    refused(result.exit_code, result.stderr, *words)
    assert "╭" not in result.stderr and "Usage:" not in result.stderr


@pytest.mark.integration
def test_a_usage_error_is_one_line_in_a_real_process(no_network):
    done = run_sharpscope("finetune", "x.pt", "--optimiser", "sam", guard=no_network)
    refused(done.returncode, done.stderr, "No such option: --optimiser", "--optimizer")


def test_help_and_bare_command_keep_their_exit_codes():
    assert cli("--help").exit_code == 0 and "Usage" in cli("--help").stdout
    assert cli("analyze", "--help").exit_code == 0
    bare = cli()
    assert bare.exit_code == 2 and "Usage" in bare.output  # Click's no-args help, unchanged


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("analyze", "--rho", "inf"),
        ("analyze", "--tol", "nan"),
        ("analyze", "--alpha", "-inf"),
        ("check", "--max-eigenvalue", "nan"),
        ("check", "--min-alignment", "inf"),
        ("landscape", "--span", "inf"),
        ("finetune", "--lr", "nan"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, command, option, value):
    checkpoint = make_checkpoint(tmp_path)
    snap = Snapshot(tmp_path)
    extra = {
        "analyze": FAST,
        "check": FAST,
        "landscape": ["--data", "digits", "--quiet"],
        "finetune": ["--data", "digits", "--steps", "1", "--out", tmp_path / "run", "--quiet"],
    }[command]
    result = cli(command, checkpoint, *extra, option, value)
    refused(result.exit_code, result.stderr, f"{option} must be a finite number, got {value}")
    snap.assert_unchanged()  # refused before anything was written (no run folder)


def test_a_report_gated_on_nan_is_bad_input_not_a_flagged_model(tmp_path):
    checkpoint = make_checkpoint(tmp_path)
    report = tmp_path / "report.json"
    assert cli("analyze", checkpoint, *FAST, "--out", tmp_path / "out").exit_code == 0
    (tmp_path / "out" / "report.json").rename(report)
    result = cli("check", report, "--max-eigenvalue", "nan")
    refused(result.exit_code, result.stderr, "--max-eigenvalue must be a finite number")


def test_a_config_file_with_nan_is_refused(tmp_path, monkeypatch):
    checkpoint = make_checkpoint(tmp_path)
    (tmp_path / "sharpscope.toml").write_text("max-eigenvalue = nan\n")
    monkeypatch.chdir(tmp_path)
    result = cli("check", checkpoint, *FAST)
    refused(result.exit_code, result.stderr, "max-eigenvalue", "finite")


@pytest.mark.parametrize("optimizer", [SAM, EigenSAM])
def test_sam_refuses_an_infinite_radius(optimizer):
    model = torch.nn.Linear(2, 1)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    extra = (
        {"model": model, "loss_fn": torch.nn.functional.mse_loss} if optimizer is EigenSAM else {}
    )
    with pytest.raises(ValueError, match="rho must be non-negative and finite, got inf"):
        optimizer(base, rho=float("inf"), **extra)

"""A default analysis is visible while it runs and keeps what it finished: progress for every
stage (bars on a terminal, one line per stage elsewhere), and on Ctrl-C or SIGTERM a report of
the finished stages, marked partial, before exit 130 or 143."""

from __future__ import annotations

import io
import json
import re
import signal

import jsonschema
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from sharpscope.analysis import analyze as pipeline
from sharpscope.cli.app import app
from sharpscope.cli.common import ProgressBars
from sharpscope.io.architectures import mlp
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.models import ModelSpec
from sharpscope.report.schema import report_schema

FAST = ["--data", "digits", "--samples", "64", "--batch-size", "32", "--top-k", "2"]
RUNNER = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mlp.safetensors"
    save_checkpoint(path, mlp(hidden=(16,)).eval(), ModelSpec("mlp", {"hidden": (16,)}))
    return path


@pytest.fixture(autouse=True)
def _plain(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def analyze(checkpoint, *extra: object):
    return RUNNER.invoke(app, ["analyze", str(checkpoint), *FAST, *map(str, extra)])


# --- progress ------------------------------------------------------------------------------------


def test_without_a_terminal_each_task_is_one_line_when_it_ends():
    file = io.StringIO()
    console = Console(width=80, file=file, force_terminal=False)
    with ProgressBars(True, console=console) as bars:
        bars("top-k and λ_min", 10, 200)
        bars("top-k and λ_min", 40, 200)
        assert file.getvalue() == ""  # no bar drawn
        bars("spread", 1, 8)
        assert re.fullmatch(r"top-k and λ_min: 40/200 in \d+\.\d s\n", file.getvalue())
        bars("spread", 8, 8)
        bars.finish()
        lines = file.getvalue().splitlines()
    assert len(lines) == 2 and re.fullmatch(r"spread: 8/8 in \d+\.\d s", lines[1])
    assert "\x1b" not in file.getvalue()


def test_the_cli_prints_a_line_per_stage_spread_included(checkpoint):
    result = analyze(checkpoint, "--json")  # CliRunner's stderr is not a terminal
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)
    stages = re.findall(r"^(.+): [\d,]+/[\d,]+ in \d+\.\d s$", result.stderr, re.M)
    assert stages == [
        "loss and gradient",
        "top-k and λ_min",
        "trace",
        "alignment",
        "critical sharpness",
        "spread",
    ]
    assert re.search(r"^spread: 8/8 in \d+\.\d s$", result.stderr, re.M)


# --- interrupts ----------------------------------------------------------------------------------


def interrupt_in(monkeypatch: pytest.MonkeyPatch, name: str, how) -> None:
    """Make the pipeline's ``name`` stage raise (Ctrl-C) or signal (``how``) when it starts."""

    def stop(*args, **kwargs):
        how()

    monkeypatch.setattr(pipeline, name, stop)


def untimed(section: dict) -> dict:
    return {key: value for key, value in section.items() if key != "seconds"}


def ctrl_c() -> None:
    raise KeyboardInterrupt


def sigterm() -> None:
    signal.raise_signal(signal.SIGTERM)


@pytest.mark.parametrize(("how", "code"), [(ctrl_c, 130), (sigterm, 143)])
def test_an_interrupt_writes_the_finished_stages_marked_partial(
    checkpoint, tmp_path, monkeypatch, how, code
):
    complete = json.loads(analyze(checkpoint, "--json", "--quiet").stdout)
    interrupt_in(monkeypatch, "_sampling", how)
    out = tmp_path / "out"
    result = analyze(checkpoint, "--json", "--quiet", "--out", out)
    assert result.exit_code == code, result.stderr
    printed = json.loads(result.stdout)
    saved = json.loads((out / "report.json").read_text())
    jsonschema.validate(saved, report_schema())
    for doc in (printed, saved):
        assert doc["partial"] == {
            "interrupted": "sampling",
            "finished": [
                "gradient",
                "plan",
                "eigenvalues",
                "product-error",
                "trace",
                "alignment",
                "critical_sharpness",
            ],
        }
        for figure in ("eigenvalues", "lambda_min", "trace"):
            assert untimed(doc["results"][figure]) == untimed(complete["results"][figure])
    assert "partial" not in complete
    assert "interrupted during sampling" in result.stderr
    assert "product-error, trace, alignment, critical_sharpness" in result.stderr
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_an_interrupt_before_the_eigenvalues_writes_nothing(checkpoint, tmp_path, monkeypatch):
    interrupt_in(monkeypatch, "_planned", ctrl_c)
    out = tmp_path / "out"
    result = analyze(checkpoint, "--json", "--quiet", "--out", out)
    assert result.exit_code == 130
    assert result.stdout == "" and not out.exists()
    assert "interrupted during plan: no results yet" in result.stderr

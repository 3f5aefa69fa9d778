"""What ``--help`` shows: examples, exit codes, plain placeholders, lines that fit 80 columns."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sharpscope.cli.app import COMMANDS, app

COMMANDS_WITH_EXAMPLES = ("analyze", "check", "finetune", "landscape", "demo")


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain_and_fits_80_columns(command):
    text = _help(*([command] if command else []))
    for placeholder in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list[", "{"):
        assert placeholder not in text, (command, placeholder)
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize("command", COMMANDS_WITH_EXAMPLES)
def test_each_command_shows_examples_of_itself(command):
    text = _help(command)
    assert "Examples" in text and f"sharpscope {command}" in text.split("Examples", 1)[1]


def test_the_command_list_has_one_line_per_command_and_the_exit_codes():
    text = _help()
    for name, sub in COMMANDS.items():
        assert any(name in line and sub.summary in line for line in text.splitlines()), name
    assert "130 interrupted (Ctrl-C)" in text.replace("\n", " ").replace("  ", " ")


def test_an_optional_argument_is_bracketed_in_the_usage_line():
    assert "[OPTIONS] [CHECKPOINT]" in _help("finetune")
    assert "[OPTIONS] CHECKPOINT" in _help("analyze")


def test_square_brackets_in_help_text_are_shown_not_read_as_markup():
    text = "".join(_help("analyze").replace("│", "").split())
    assert "(needssharpscope[hf])" in text

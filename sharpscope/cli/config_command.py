"""``sharpscope config``: every setting of a command, its config-file key, default and meaning
(the settings ``--help`` leaves out included). Torch-free."""

from __future__ import annotations

import textwrap
from typing import Annotated, Any

import typer

from sharpscope.cli.common import errors_as_exit, stdout
from sharpscope.cli.declarations import COMMANDS
from sharpscope.errors import check_choice
from sharpscope.settings import Declaration

WIDTH = 100


def config_command(
    command: Annotated[
        str,
        typer.Argument(
            help=f"The command whose settings to list: {', '.join(COMMANDS)}.",
            metavar="COMMAND",
            show_default=False,
        ),
    ],
) -> None:
    """List every setting of COMMAND: its key in a config file and for --set, its default and
    meaning, and its flag (the flags --help leaves out still work).

    A config file is the nearest sharpscope.toml (a [COMMAND] table) or pyproject.toml (a
    [tool.sharpscope.COMMAND] table), found from the current folder up to the repository root, or
    the file --config names; check also reads the top-level keys. The command line (a flag or
    --set KEY=VALUE) wins over the file, the file over the default; a setting given both as its
    flag and by --set is refused.

    Examples:

        sharpscope config analyze

        sharpscope analyze net.pt --data val.npz --set shards=0 --set method=power
    """
    with errors_as_exit(False):
        check_choice("command", command, COMMANDS)
        stdout.print(listing(command), markup=False, highlight=False, soft_wrap=True)


def listing(command: str) -> str:
    """The text ``sharpscope config COMMAND`` prints."""
    items = list(COMMANDS[command].declarations().values())
    lines = [
        f"sharpscope {command}: every setting, as a key of [{command}] in sharpscope.toml",
        f"([tool.sharpscope.{command}] in pyproject.toml) or of --set KEY=VALUE.",
        "",
    ]
    for item in items:
        if item.option.in_file:
            lines += _entry(item, _key_line(item))
    lines += ["", "Only on the command line (choices made every time):", ""]
    for item in items:
        if not item.option.in_file:
            lines += _entry(item, item.option.message_flag)
    return "\n".join(lines)


def _entry(item: Declaration, head: str) -> list[str]:
    option = item.option
    flags = option.message_flag + (f", {option.short}" if option.short else "")
    shown = "" if option.common else "; hidden from --help"
    text = f"{option.help.replace(chr(92), '')} ({flags}{shown})"
    body = textwrap.wrap(
        text,
        WIDTH,
        initial_indent="    ",
        subsequent_indent="    ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return [f"  {head}", *body]


def _key_line(item: Declaration) -> str:
    """``key = default`` as a config file writes it; ``key`` alone when it has none."""
    value = item.shown_default
    if value is None:
        return f"{item.option.key}  (not set by default)"
    return f"{item.option.key} = {_toml(value)}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    return f'"{value}"'

"""Library parameter names -> the command-line options that set them, for error messages.

Library errors name parameters in backticks (:class:`sharpscope.errors.InputError`); the CLI
boundary shows them as options with :func:`as_flags`. The names come from the settings each
command declares (:data:`sharpscope.cli.declarations.COMMANDS`).
"""

from __future__ import annotations

import re

from sharpscope.cli.declarations import COMMANDS
from sharpscope.settings import declared


def flag_names() -> dict[str, str]:
    """Parameter name (as the library spells it) -> option (as the user types it), for every
    setting a command declares."""
    names: dict[str, str] = {}
    for command in COMMANDS.values():
        for part in command.parts:
            for item in declared(part.settings):
                if item.option.cli or not item.option.flag.startswith("-"):  # or an argument
                    names.setdefault(item.name, item.option.message_flag)
    return names


FLAGS: dict[str, str] = flag_names()
""":func:`flag_names` as the commands declare them."""

_NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def as_flags(message: str) -> str:
    """``message`` with each backticked parameter name shown as its option (a name without an
    option keeps its backticks)."""
    flags = flag_names()
    return _NAME.sub(lambda m: flags.get(m[1], m[0]), message)

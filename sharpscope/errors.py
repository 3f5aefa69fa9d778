"""The one exception type for bad user input, and the checks of a choice and of a number by
name."""

import dataclasses
import math
from collections.abc import Iterable
from typing import Any


class InputError(Exception):
    """Bad input from the user (a file, a spec, a setting): the CLI prints the message as one
    line on stderr and exits with code 2. The message names the problem and the fix.

    Library code names a setting by its Python parameter name in backticks (`` `k` must be at
    least 1, got 0``); the CLI shows each such name as the command-line option that sets it
    (``--top-k``, see :mod:`sharpscope.cli.flags`), so the library never speaks in flags.
    """


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    """Raise an :class:`InputError` naming the parameter ``name`` unless ``value`` is one of
    ``choices``."""
    options = list(choices)
    if value not in options:
        raise InputError(f"unknown `{name}` {value!r}; choose one of {', '.join(options)}")


def check_finite(name: str, value: float | None) -> None:
    """Raise an :class:`InputError` naming the parameter ``name`` when ``value`` is nan or ±inf
    (``None``, a setting left out, passes)."""
    if value is not None and not math.isfinite(value):
        raise InputError(f"`{name}` must be a finite number, got {value}")


def check_finite_fields(settings: Any) -> None:
    """:func:`check_finite` on every float field of the dataclass ``settings``."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, float):
            check_finite(field.name, value)

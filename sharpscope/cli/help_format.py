"""How the commands show their options in ``--help``: flags without a type, values with a plain
placeholder (INTEGER, FLOAT, TEXT, PATH), arguments by name in the usage line. Typer 0.29 shows
``<bool>``, ``<list[str]>`` and ``{CHECKPOINT}`` instead."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from typer.core import TyperCommand, TyperGroup

_PLACEHOLDERS = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _placeholder(param: Any) -> str | None:
    """The value's placeholder: none for a flag, else its type's name (of the items, for an
    option that may be repeated)."""
    if getattr(param, "is_flag", False):
        return None
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    return _PLACEHOLDERS.get(annotation, "TEXT")


def _usage_name(argument: Any) -> str:
    """``NAME`` for a required argument, ``[NAME]`` for an optional one."""
    name = argument.display_name_raw.upper()
    return name if argument.required else f"[{name}]"


def _plain(params: list[Any]) -> list[Any]:
    """``params`` shown plainly (the display hooks of Typer's own parameter classes)."""
    for param in params:
        param.display_type_rich = lambda ctx, param=param: _placeholder(param)
        if param.param_type_name == "argument":
            param._usage_display_name = lambda param=param: _usage_name(param)
    return params


class PlainCommand(TyperCommand):
    """A Typer command whose help shows its options plainly."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))


class PlainGroup(TyperGroup):
    """A Typer group whose help shows its options plainly."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))

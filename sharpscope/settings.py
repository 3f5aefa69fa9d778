"""Settings declared once: :func:`setting` gives a dataclass field its default together with its
help text, its command-line flag, its help panel and how a config file writes it. The command
line (:mod:`sharpscope.cli.generate`), the config files, the flag names of error messages and the
report's settings are all generated from these declarations; validation stays in each settings
class's ``__post_init__``. Torch-free.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Example:
    ...     top_k: int = setting(5, help="How many eigenpairs.", short="-k", common=True)
    >>> [(d.name, d.default, d.option.flag, d.option.key) for d in declared(Example)]
    [('top_k', 5, '--top-k', 'top-k')]
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharpscope.errors import InputError

_KEY = "sharpscope"
"""The metadata key of a field's :class:`Option`."""
_SENTENCE = re.compile(r"(?<=\.)\s+(?=[A-Z])")
"""Where a help text's first sentence ends."""
_UNSET: Any = object()
"""``fallback`` when a setting has none besides its default."""

KINDS: tuple[str, ...] = ("integer", "number", "text", "flag", "texts", "path", "data", "fraction")
"""How a config file (or ``--set``) writes a value: see :mod:`sharpscope.cli.config_file`."""


@dataclass(frozen=True)
class Option:
    """How a setting appears to the user. A field declared with :func:`setting` carries one."""

    help: str
    flag: str = ""
    """The long flag (``--top-k``); also the config key, without its dashes."""
    short: str | None = None
    common: bool = False
    """Shown in ``--help``; the other (expert) settings are listed by ``sharpscope config``."""
    panel: str = "Settings"
    metavar: str | None = None
    kind: str = ""
    """How a config file writes it (:data:`KINDS`); empty: from the field's type."""
    negatable: bool = False
    """A flag with a ``--no-`` form (``--trace/--no-trace``)."""
    in_file: bool = True
    """Whether a config file or ``--set`` may set it (not for opt-ins such as ``trust_code``)."""
    cli: bool = True
    """Whether the command line sets it at all (an argument, or a library-only setting)."""
    code: bool = False
    """Whether its value may name a user's function (refused from a config file found by search
    unless code is trusted)."""
    minimum: float | None = None
    fallback: Any = _UNSET
    """For a setting whose default is None meaning "not given": the value taken then (shown as
    the default in help)."""

    def __post_init__(self) -> None:
        if self.kind and self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")

    @property
    def key(self) -> str:
        """The config-file and ``--set`` key: the flag without its dashes."""
        return self.flag.removeprefix("--")

    @property
    def brief(self) -> str:
        """The help's first sentence (what ``--help`` shows)."""
        return _SENTENCE.split(self.help, maxsplit=1)[0]

    @property
    def message_flag(self) -> str:
        """The flag as an error message names it."""
        if self.negatable:
            return f"{self.flag}/--no-{self.key}"
        return self.flag


def setting(default: Any, **option: Any) -> Any:
    """A dataclass field whose default is ``default``, declared with how the user sets it:
    ``option`` holds the fields of :class:`Option` (``help`` at least; ``flag`` defaults to ``--``
    and the field's name with dashes, filled in by :func:`declared`). A ``default`` of
    ``dataclasses.MISSING`` makes a field without a default, which needs a ``fallback``: the value
    a caller who leaves it out gets (see :func:`optional_settings`)."""
    if default is dataclasses.MISSING and "fallback" not in option:
        raise ValueError("a setting without a default needs a fallback")
    return dataclasses.field(default=default, metadata={_KEY: Option(**option)})


def like(owner: type, name: str, default: Any = None, **changes: Any) -> Any:
    """A field declared as ``owner``'s ``name`` (its help, flag and panel), with ``default``
    (None: not given; ``dataclasses.MISSING``: none) and ``owner``'s default as its fallback;
    ``changes`` replace parts of it."""
    return _like(find(owner, name), default, **changes)


def _like(found: Declaration, default: Any, **changes: Any) -> Any:
    option = dataclasses.replace(found.option, fallback=found.shown_default, **changes)
    return dataclasses.field(default=default, metadata={_KEY: option})


def optional_settings(full: type) -> Any:
    """Class decorator: the class becomes a frozen, keyword-only dataclass with the declared
    settings of ``full``, each None when not given and with ``full``'s default as its fallback (as
    :func:`like` declares them), and ``full`` as its attribute ``full``.

    Example:
        >>> @dataclass(frozen=True)
        ... class Full:
        ...     top_k: int = setting(5, help="How many eigenpairs.")
        >>> @optional_settings(Full)
        ... class Given:
        ...     pass
        >>> Given().top_k, fallbacks(Given), Given.full is Full
        (None, {'top_k': 5}, True)
    """

    def make(cls: type) -> type:
        annotations = inspect.get_annotations(cls)
        for item in declared(full):
            annotations[item.name] = item.hint | None
            setattr(cls, item.name, _like(item, None))
        cls.__annotations__ = annotations
        cls.full = full  # type: ignore[attr-defined]
        return dataclass(frozen=True, kw_only=True)(cls)

    return make


@dataclass(frozen=True)
class Declaration:
    """One declared setting of a settings class: its field's name, type, default and option."""

    name: str
    hint: Any
    default: Any
    option: Option

    @property
    def plain(self) -> Any:
        """The value's type without ``| None`` (``Literal`` names as ``str``, sequences of
        strings as ``list[str]``)."""
        args = [a for a in typing.get_args(self.hint) if a is not type(None)]
        hint = self.hint
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]
        if typing.get_origin(hint) is typing.Literal:
            return str
        if typing.get_origin(hint) in (list, tuple, Sequence):
            return list[str]
        return hint

    @property
    def optional(self) -> bool:
        """Whether None is a value (not given, or off)."""
        return type(None) in typing.get_args(self.hint)

    @property
    def kind(self) -> str:
        """How a config file writes it (:data:`KINDS`)."""
        if self.option.kind:
            return self.option.kind
        by_type = {int: "integer", float: "number", str: "text", bool: "flag", Path: "path"}
        return by_type.get(self.plain, "texts")

    @property
    def shown_default(self) -> Any:
        """The default a user sees: the fallback of a setting that is None when not given."""
        fallback = self.option.fallback
        return self.default if fallback is _UNSET else fallback


def declared(cls: type) -> list[Declaration]:
    """The declared settings of the dataclass ``cls`` (fields made by :func:`setting`), in order."""
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        option = item.metadata.get(_KEY)
        if option is None:
            continue
        if not option.flag:
            option = dataclasses.replace(option, flag="--" + item.name.replace("_", "-"))
        found.append(Declaration(item.name, hints[item.name], item.default, option))
    return found


def find(cls: type, name: str) -> Declaration:
    """The declaration of ``cls``'s setting ``name``."""
    (found,) = (d for d in declared(cls) if d.name == name)
    return found


def fallbacks(cls: type) -> dict[str, Any]:
    """Each declared setting of ``cls`` -> the value it takes when not given."""
    return {d.name: d.shown_default for d in declared(cls)}


def as_dict(settings: Any) -> dict[str, Any]:
    """The declared settings of a settings object by name, as its report lists them (sequences
    as lists)."""
    values = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        values[item.name] = list(value) if isinstance(value, tuple) else value
    return values


def fraction(text: Any) -> float:
    """``10%`` or ``0.1`` (text or number) -> 0.1. A bare number above 1 is refused: ``10`` would
    mean +1000 %, and is almost always a percentage without its sign (``1000%`` means it)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(text)
    stripped = str(text).strip()
    percent = stripped.endswith("%")
    try:
        value = float(stripped.removesuffix("%"))
    except ValueError:
        raise InputError(
            f"`max_increase` takes a fraction (0.1) or a percentage (10%), got {text!r}"
        ) from None
    if not percent and value > 1:
        raise InputError(
            f"`max_increase` {text} would allow +{100 * value:g}% over the baseline: write "
            f"{value:g}% for {value:g} percent (or {100 * value:g}% if you mean it)"
        )
    return value / 100 if percent else value

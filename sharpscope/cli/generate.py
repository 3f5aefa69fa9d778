"""The command line generated from the declared settings (:mod:`sharpscope.cli.declarations`):
each command's options, the keys of its config-file table and of ``--set``, and the values it
runs with. Precedence: the command line (a flag or ``--set``) over the config file over the
declared default; a setting given both as its flag and by ``--set`` is refused."""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from sharpscope.cli.common import errors_as_exit
from sharpscope.cli.config_file import (
    Config,
    Settings,
    load_config,
    refuse_searched_code,
    settings_for,
)
from sharpscope.cli.declarations import COMMANDS, Command
from sharpscope.errors import InputError
from sharpscope.io.load_spec import LoadSpec
from sharpscope.settings import Declaration, declared, find, fraction

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_GIVEN = frozenset({"COMMANDLINE", "ENVIRONMENT", "PROMPT"})
"""Click's parameter sources that mean the user gave the option."""


def more_line(name: str) -> str:
    """The last line of ``name``'s help: where its other settings are listed."""
    return f"Every other setting: sharpscope config {name} (their flags still work)."


def annotation(item: Declaration, shown: bool = False) -> Any:
    """The ``Annotated[type, typer.Option(...)]`` of a declared setting: in ``--help``, the first
    sentence of its help (``sharpscope config`` shows all of it); an expert setting's option is
    hidden from ``--help`` unless ``shown``."""
    option = item.option
    flag = f"{option.flag}/--no-{option.key}" if option.negatable else option.flag
    names = [flag, *([option.short] if option.short else [])]
    kind = str if item.kind == "fraction" else item.plain
    default = item.shown_default
    info = typer.Option(
        *names,
        help=option.brief,
        rich_help_panel=option.panel,
        hidden=not (option.common or shown),
        show_default=_shown_default(default, item.default),
        metavar=option.metavar,
        min=option.minimum,
    )
    return Annotated[kind | None if item.optional or item.default is None else kind, info]


def _shown_default(default: Any, own: Any) -> bool | str:
    """Typer's ``show_default``: none for None or an off flag, the fallback of a setting that is
    None when not given."""
    if default is None or default is False:
        return False
    return True if default is own else str(default)


Checkpoint = Annotated[
    Path,
    typer.Argument(
        help=find(LoadSpec, "checkpoint").option.brief,
        show_default=False,
        metavar="CHECKPOINT",
    ),
]
"""The checkpoint argument of the commands that load one."""


def option_of(settings: type, name: str) -> Any:
    """The annotation of ``settings``'s declared ``name``, shown in help (for a command declared by
    hand)."""
    return annotation(find(settings, name), shown=True)


def keys(command: Command) -> Settings:
    """The config-file (and ``--set``) keys of ``command``."""
    return settings_for(command.declarations().values())


@dataclass(frozen=True)
class Values:
    """The values a command runs with, by parameter name, and the config file they came from."""

    command: Command
    values: dict[str, Any]
    config: Config

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def build(self, base: type, **extra: Any) -> Any:
        """The command's part of class ``base`` (or the class derived from it that the command
        declares) made from these values and ``extra``: checked as it is made."""
        part = self.command.part(base)
        names = {d.name for d in declared(part.settings)} - set(part.without) - set(extra)
        given = {n: self.values[n] for n in names if n in self.values}
        return part.settings(**given, **extra)


def resolve(ctx: Any, name: str, given: dict[str, Any]) -> Values:
    """The values of command ``name`` from the parsed command line ``given`` (``ctx``: Click's
    context, which says where each came from), ``--set`` and the config file."""
    command = COMMANDS[name]
    declarations = command.declarations()
    accepted = keys(command)
    config = load_config(accepted, given.get("config"), command=name)
    sets = parse_sets(given.get("overrides") or [], accepted, name)
    values: dict[str, Any] = {}
    from_file = []
    for param, item in declarations.items():
        source = ctx.get_parameter_source(param)
        on_line = getattr(source, "name", "") in _GIVEN
        if param in sets and on_line:
            raise InputError(
                f"`{param}` is given twice, as its flag and as --set {item.option.key}; give it "
                "once"
            )
        if param in sets:
            values[param] = _typed(item, sets[param])
        elif not on_line and param in config.options:
            values[param] = _typed(item, config.options[param])
            from_file.append(param)
        else:
            values[param] = _typed(item, given[param])
    if not values.get("trust_code", False):
        code = [p for p in from_file if declarations[p].option.code]
        refuse_searched_code(config, code)
    return Values(command, values, config)


def parse_sets(entries: Iterable[str], accepted: Settings, name: str) -> dict[str, Any]:
    """``--set KEY=VALUE`` entries -> parameter name -> value. A value is read as a TOML value
    (``3``, ``0.1``, ``true``, ``["a", "b"]``, ``"text"``), else taken as text; a list key takes a
    single text as its one item."""
    found: dict[str, Any] = {}
    for entry in entries:
        key, equals, text = entry.partition("=")
        key = key.strip()
        if not equals:
            raise InputError(f"--set takes KEY=VALUE, got {entry!r}")
        setting = accepted.get(key)
        if setting is None:
            close = difflib.get_close_matches(key, accepted, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "no close key"
            raise InputError(
                f"--set: unknown key {key!r} for {name}; {hint} (sharpscope config {name} lists "
                "them)"
            )
        if setting.param in found:
            raise InputError(f"--set {key} is given twice; give it once")
        value = _toml_value(text)
        if setting.items is not None and isinstance(value, str):
            value = [value]
        if not setting.accepts(value):
            raise InputError(f"--set {key}: must be {setting.what}, got {text!r}")
        found[setting.param] = value
    return found


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _typed(item: Declaration, value: Any) -> Any:
    """``value`` as the setting's type (a path, a list, a float); its minimum checked."""
    if value is None:
        return None
    if item.kind == "fraction":
        return fraction(value)
    if item.plain is Path:
        value = Path(value)
    elif item.plain is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif item.kind == "texts":
        value = list(value)
    minimum = item.option.minimum
    if minimum is not None and value < minimum:
        raise InputError(f"`{item.name}` must be at least {minimum:g}, got {value}")
    return value


class DeclaredCommand:
    """A command function whose options are its declared settings: Typer reads its signature
    (the function's own parameters, then an option per setting) when the command is built, and
    the function gets the resolved :class:`Values` as ``settings``."""

    def __init__(self, name: str, function: Callable[..., Any]) -> None:
        self.name = name
        self.function = function
        self.__doc__ = function.__doc__
        self.__annotations__: dict[str, Any] = {}
        own = inspect.signature(function, eval_str=True).parameters.values()
        self._own = [p for p in own if p.name != "settings"]

    @property
    def epilog(self) -> str:
        """The last line of the command's help."""
        return more_line(self.name)

    @property
    def __signature__(self) -> inspect.Signature:  # read by Typer (inspect.signature)
        declared_here = COMMANDS[self.name].declarations().values()
        generated = [
            inspect.Parameter(
                d.name, inspect.Parameter.KEYWORD_ONLY, default=d.default, annotation=annotation(d)
            )
            for d in declared_here
        ]
        context = inspect.Parameter(
            _CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )
        return inspect.Signature([*self._own, *generated, context])

    def __call__(self, **given: Any) -> Any:
        own = {p.name: given.pop(p.name) for p in self._own}
        ctx = given.pop(_CONTEXT)
        with errors_as_exit(bool(given.get("debug"))):
            settings = resolve(ctx, self.name, given)
        return self.function(**own, settings=settings)


_CONTEXT = "sharpscope_context"
"""The parameter by which Typer passes a declared command its Click context."""


def declared_command(name: str) -> Callable[[Callable[..., Any]], DeclaredCommand]:
    """Decorator: the function becomes command ``name``, with the options its declarations make.

    Example:
        >>> declared_command("analyze")(lambda checkpoint, settings: None).name
        'analyze'
    """
    return lambda function: DeclaredCommand(name, function)

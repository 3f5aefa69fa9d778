"""Settings from ``[tool.sharpscope]`` in pyproject.toml, or from a sharpscope.toml.

The file is found from the current folder upwards, up to the repository root (the folder that
holds ``.git``) or the user's home, never above (outside both, only the current folder is
searched); in each folder a ``sharpscope.toml`` comes before a ``pyproject.toml`` with a
``[tool.sharpscope]`` table. Each command reads its own table, ``[analyze]`` in sharpscope.toml
(``[tool.sharpscope.analyze]`` in pyproject.toml), whose keys are its long option names without
the dashes (``top-k = 3``); ``check`` also reads the top-level keys (its table wins). The command
line overrides them.

A file found by search was not chosen by the user, so the code specs in it (settings declared
with ``code``, of the ``pkg.module:function`` or ``file.py:function`` form) are refused unless it
is chosen with ``--config`` or code is trusted (:func:`refuse_searched_code`).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sharpscope.cli.declarations import COMMANDS
from sharpscope.errors import InputError
from sharpscope.io.user_code import is_object_spec
from sharpscope.settings import Declaration

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FILE_NAMES = ("sharpscope.toml", "pyproject.toml")
TABLE = "tool.sharpscope"


@dataclass(frozen=True)
class Setting:
    """What a config key accepts, and how a path in it is read."""

    types: tuple[type, ...]
    what: str
    """What the value must be, for the error message."""
    items: type | None = None
    """For arrays: the type of every item."""
    relative: Literal["no", "always", "if-present"] = "no"
    """Whether a relative path is taken from the config file's folder (``if-present``: only when
    something of that name exists there; otherwise the value is a name such as ``digits``)."""
    param: str = ""
    """The command's parameter the key sets (``max_eigenvalue`` for ``max-eigenvalue``)."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (as TOML parsed it) has an accepted type."""
        if isinstance(value, bool) and bool not in self.types:
            return False
        if not isinstance(value, self.types):
            return False
        return self.items is None or all(isinstance(item, self.items) for item in value)

    def resolve(self, value: Any, folder: Path) -> Any:
        """The value as the option takes it, relative paths taken from ``folder``."""
        beside = folder / str(value)
        if self.relative == "always" or (self.relative == "if-present" and beside.exists()):
            return str(beside)
        return value


KINDS: dict[str, Setting] = {
    "number": Setting((int, float), "a number"),
    "integer": Setting((int,), "an integer"),
    "text": Setting((str,), "a string"),
    "flag": Setting((bool,), "true or false"),
    "texts": Setting((list,), "an array of strings", items=str),
    "path": Setting((str,), "a path (relative to the config file's folder)", relative="always"),
    "data": Setting(
        (str,), "a data spec (a name, a path or pkg.module:function)", relative="if-present"
    ),
    "fraction": Setting((int, float, str), 'a fraction (0.1) or a percentage ("10%")'),
}
"""How a config file writes each kind of setting (:data:`sharpscope.settings.KINDS`)."""

TOP_LEVEL = "check"
"""The command that also reads the top-level keys (the only one that had a config file before
the per-command tables)."""


def settings_for(declarations: Iterable[Declaration]) -> dict[str, Setting]:
    """Config key -> setting, for every declaration a config file may set."""
    return {
        d.option.key: replace(KINDS[d.kind], param=d.name)
        for d in declarations
        if d.option.in_file and d.option.cli
    }


_TOML_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


@dataclass(frozen=True)
class Config:
    """Option defaults from a config file: parameter name (``max_eigenvalue``) -> value."""

    path: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    searched: bool = False
    """Whether the file was found by search rather than given (``--config``)."""


Settings = Mapping[str, Setting]
"""Config key -> what it accepts and the parameter it sets (:func:`settings_for`)."""


def load_config(
    settings: Settings,
    path: Path | None = None,
    start: Path | None = None,
    command: str = TOP_LEVEL,
) -> Config:
    """``command``'s settings in the config at ``path``, else in the one :func:`find_config`
    finds from ``start`` (default: the current folder); an empty :class:`Config` when there is
    none."""
    if path is not None:
        return read_config(path, settings, command)
    found = find_config(start or Path.cwd())
    if found is None:
        return Config()
    return replace(read_config(found, settings, command), searched=True)


def find_config(start: Path) -> Path | None:
    """The nearest config file in ``start`` or a folder above it (see the module docstring)."""
    for folder in _searched(start.resolve()):
        for name in FILE_NAMES:
            candidate = folder / name
            if candidate.is_file() and (name != "pyproject.toml" or _sharpscope_table(candidate)):
                return candidate
    return None


def _searched(start: Path) -> list[Path]:
    """``start`` and the folders above it up to the repository root or the user's home; only
    ``start`` when it is under neither (a shared folder such as the system's temporary one)."""
    home = _home()
    climbed = []
    for folder in (start, *start.parents):
        climbed.append(folder)
        if (folder / ".git").exists() or folder == home:
            return climbed
    return [start]


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError, OSError):  # no home folder known
        return None


def refuse_searched_code(config: Config, taken: Iterable[str]) -> None:
    """Refuse the code specs among the settings ``taken`` from a config file found by search (not
    given on the command line; those that may name code): whoever can write a file in a parent
    folder chose them."""
    if not config.searched:
        return
    named = [
        f"{param.replace('_', '-')} = {config.options[param]!r}"
        for param in taken
        if is_object_spec(str(config.options.get(param, "")))
    ]
    if named:
        raise InputError(
            f"{config.path}, found by searching up from the current folder, names code to run "
            f"({', '.join(named)}); code runs only from a config file you choose: pass "
            f"`config` {config.path} to choose it, or `trust_code`"
        )


def read_config(path: Path, settings: Settings, command: str = TOP_LEVEL) -> Config:
    """The options a config file sets for ``command`` (its table, and for :data:`TOP_LEVEL` the
    top-level keys too); every problem is an :class:`InputError` naming the file and the key."""
    table = _sharpscope_table(path) if path.name == "pyproject.toml" else _read_toml(path)
    if table is None:
        raise InputError(f"{path} has no {TABLE} table; add one, or pass a sharpscope.toml")
    where = f"{path} ({TABLE})" if path.name == "pyproject.toml" else str(path)
    tables = {k for k, v in table.items() if isinstance(v, dict)}
    for name in tables - set(COMMANDS):
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean [{close[0]}]?" if close else f"tables: {', '.join(COMMANDS)}"
        raise InputError(f"{where}: unknown table [{name}]; {hint}")
    top = {k: v for k, v in table.items() if k not in tables}
    own = table.get(command, {})
    if not isinstance(own, dict):
        raise InputError(f"{where}: {command!r} must be a table, got {_toml_type(own)}")
    sources = [(where, top)] if command == TOP_LEVEL else []
    sources.append((f"{where} [{command}]", own))
    options = {}
    for place, keys in sources:
        for key, value in keys.items():
            setting = _setting(place, settings, key)
            options[setting.param] = _value(place, path.parent, key, setting, value)
    return Config(path, options)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise InputError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path} is not valid TOML: {exc}") from None


def _sharpscope_table(path: Path) -> dict[str, Any] | None:
    """pyproject.toml's ``[tool.sharpscope]`` table, None when it has none."""
    tool = _read_toml(path).get("tool")
    table = tool.get("sharpscope") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise InputError(f"{path}: {TABLE} must be a table, got {_toml_type(table)}")
    return table


def _setting(where: str, settings: Settings, key: str) -> Setting:
    setting = settings.get(key)
    if setting is None:
        close = difflib.get_close_matches(key, settings, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(settings)}"
        raise InputError(f"{where}: unknown key {key!r}; {hint}")
    return setting


def _value(where: str, folder: Path, key: str, setting: Setting, value: Any) -> Any:
    if not setting.accepts(value):
        raise InputError(
            f"{where}: {key!r} must be {setting.what}, got {_toml_type(value)} ({value!r})"
        )
    return setting.resolve(value, folder)


def _toml_type(value: Any) -> str:
    return _TOML_TYPES.get(type(value), type(value).__name__)

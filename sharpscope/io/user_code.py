"""Import a user's Python object named ``pkg.module:name`` or ``path/to/file.py:name``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from sharpscope.errors import InputError


def one_line(exc: BaseException) -> str:
    """``"TypeName: message"`` of an exception, squeezed onto one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_object_spec(spec: str) -> bool:
    """Whether ``spec`` reads as ``pkg.module:name`` or ``file.py:name`` (``name`` may be
    dotted)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not _dotted(attr):
        return False
    return target.endswith(".py") or _dotted(target)


def import_object(spec: str, option: str) -> Any:
    """The object ``spec`` names; ``option`` (the parameter, e.g. ``"`data`"``) names it in
    error messages."""
    target, _, attr = spec.rpartition(":")
    module = _load_file(target, option) if target.endswith(".py") else _import(target, option)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = ", ".join(_public_callables(module)) or "none"
            raise InputError(
                f"{option} {spec}: {target} has no {attr!r} (its public callables: {found}); "
                "fix the name after the colon"
            )
        obj = getattr(obj, part)
    return obj


def _dotted(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def _public_callables(module: ModuleType) -> list[str]:
    names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
    return sorted(names)[:10]


def _import(name: str, option: str) -> ModuleType:
    """Import a module by dotted name, with the working folder importable (as ``python -m`` has)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise InputError(
                f"{option}: cannot find module {name} ({one_line(exc)}); run from the folder "
                "that holds it, install it, or give a file path: path/to/file.py:function"
            ) from exc
        raise _import_failed(name, option, exc) from exc
    except Exception as exc:
        raise _import_failed(name, option, exc) from exc


def _load_file(target: str, option: str) -> ModuleType:
    """Run a ``.py`` file as a module (once per path); its folder is importable while it runs."""
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise InputError(
            f"{option}: no such Python file: {target}; check the path before the colon"
        )
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_sharpscope_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py path always has a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise _import_failed(target, option, exc) from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_failed(name: str, option: str, exc: Exception) -> InputError:
    return InputError(f"{option}: importing {name} failed ({one_line(exc)}); fix the error there")

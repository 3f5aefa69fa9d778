"""Model specs: which factory builds a model, with which keyword arguments.

A target is a built-in name (``mlp``, ``cnn``, ``resnet18``), ``pkg.module:factory`` or
``path/to/file.py:factory``; the factory is any callable returning an ``nn.Module`` (a class
works too). Every failure raises :class:`~sharpscope.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.architectures import BUILTIN_MODELS
from sharpscope.io.user_code import import_object, is_object_spec, one_line


def _tuples(value: Any) -> Any:
    """Lists become tuples, recursively, so that a spec equals itself after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: ``target`` (built-in name, ``pkg.module:factory`` or
    ``file.py:factory``) called with keyword arguments ``args`` (JSON values; lists as tuples)."""

    target: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise InputError(f"model target must be a non-empty string, got {self.target!r}")
        object.__setattr__(self, "args", _tuples(dict(self.args)))
        try:
            json.dumps(self.args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"model arguments {self.args!r} cannot be stored as JSON ({exc}); use numbers, "
                "strings, booleans, None, and lists or dicts of those"
            ) from exc

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        return f"{self.target}({args})"

    def to_json(self) -> str:
        """The spec as a compact JSON object ``{"target": ..., "args": {...}}``."""
        return json.dumps({"target": self.target, "args": self.args}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Parse :meth:`to_json`'s output."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise InputError(f"model spec is not valid JSON ({exc}): {str(text)[:80]!r}") from exc
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("target"), str)
            or not isinstance(data.get("args", {}), dict)
        ):
            raise InputError(
                'model spec JSON must be {"target": "<name or module:factory>", "args": {...}}, '
                f"got {str(text)[:80]!r}"
            )
        return cls(data["target"], data.get("args", {}))


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings: values are Python literals (``ast.literal_eval``), else the
    plain string, so ``hidden=(64,64)`` gives a tuple and ``activation=tanh`` the string."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise InputError(
                f"`model_args` {item!r} is not key=value with a Python name as key; "
                "write e.g. `model_args` hidden=(64,64)"
            )
        if key in args:
            raise InputError(f"`model_args` {key} is given twice; give each argument once")
        args[key] = _literal(text.strip())
    return args


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the model a spec describes: resolve its factory, call it with ``spec.args``."""
    factory = resolve_factory(spec.target)
    _check_arguments(spec, factory)
    try:
        model = factory(**spec.args)
    except Exception as exc:
        raise InputError(
            f"model factory {spec} failed ({one_line(exc)}); check the `model_args` values"
        ) from exc
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model factory {spec.target} returned a {type(model).__name__}, not a "
            "torch.nn.Module; it must return the model"
        )
    return model


def resolve_factory(target: str) -> Callable[..., Any]:
    """The callable a target names: a built-in, ``pkg.module:factory`` or ``file.py:factory``."""
    if ":" not in target:
        return _builtin(target)
    if not is_object_spec(target):
        raise InputError(
            f"`model` {target!r} must be a built-in name, pkg.module:factory or "
            "path/to/file.py:factory"
        )
    factory = import_object(target, "`model`")
    if not callable(factory):
        raise InputError(
            f"`model` {target}: {target.rpartition(':')[2]} is a {type(factory).__name__}, "
            "not a callable that returns a model"
        )
    return factory


def _builtin(name: str) -> Callable[..., Any]:
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    hint = " (a module or file needs :factory)" if "." in name or "/" in name else ""
    raise InputError(
        f"unknown built-in model {name!r}{hint}; choose one of {', '.join(BUILTIN_MODELS)}, "
        "or pass pkg.module:factory or path/to/file.py:factory"
    )


def _check_arguments(spec: ModelSpec, factory: Callable[..., Any]) -> None:
    """Bind ``spec.args`` to the factory's signature so that a bad argument is named up front."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**spec.args)
    except TypeError as exc:
        raise InputError(
            f"model factory {spec.target} does not accept the arguments "
            f"{', '.join(spec.args) or '(none)'}: {exc}; it takes {_describe(signature)}"
        ) from exc


def _describe(signature: inspect.Signature) -> str:
    params = [
        p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return f"({', '.join(params)})"

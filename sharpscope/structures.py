"""A batch's inputs of any structure: a tensor, a tuple or list of tensors, or a dict of named
tensors (``input_ids``, ``attention_mask``, ...). How a model is called on them, and the
per-sample operations every layer needs: counting, indexing, splitting and joining samples."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sharpscope.errors import InputError


def call_model(model: nn.Module, inputs: Any, params: Mapping[str, Tensor] | None = None) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or list, else
    ``model(inputs)``; at ``params`` (by name) instead of the model's own weights when given."""
    args, kwargs = _arguments(inputs)
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, dict(params), tuple(args), kwargs)


INPUT_STYLES: tuple[str, ...] = ("auto", "kwargs", "single")
"""How mapping inputs reach a model: ``kwargs`` (``model(**inputs)``), ``single``
(``model(inputs)``, one positional argument), or ``auto``: from the ``forward`` signature."""


def input_style(model: nn.Module, inputs: Any, style: str = "auto") -> str:
    """``kwargs`` or ``single`` for mapping ``inputs`` (``kwargs`` for any other inputs, which do
    not depend on it); ``auto`` reads ``model.forward``'s signature: the fields as keywords when
    they name its parameters (or it takes ``**kwargs`` and needs no positional argument), else
    the mapping as one argument when it needs exactly one, else an :class:`InputError`."""
    if style not in INPUT_STYLES:
        choices = ", ".join(INPUT_STYLES)
        raise InputError(f"unknown `input_style` {style!r}; choose one of {choices}")
    if style != "auto" or not isinstance(inputs, Mapping):
        return "kwargs" if style == "auto" else style
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a scripted or compiled forward: keep the keywords
        return "kwargs"
    kinds = inspect.Parameter
    named = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    required = [p for p in params if p.default is p.empty and p.kind not in _VARIADIC]
    positional = [p for p in params if p.kind in (*_POSITIONAL, kinds.VAR_POSITIONAL)]
    keys = {str(key) for key in inputs}
    needed = {p.name for p in required}
    if keys <= named and needed <= keys:
        return "kwargs"
    if any(p.kind == kinds.VAR_KEYWORD for p in params) and not needed:
        return "kwargs"
    if positional and len(required) <= 1 and all(p.kind in _POSITIONAL for p in required):
        return "single"
    shown = ", ".join(p.name for p in params)
    raise InputError(
        f"cannot tell how to pass the input fields {', '.join(sorted(keys))} to "
        f"{type(model).__name__}.forward({shown}): neither as its keyword arguments nor as one "
        "mapping argument; pass `input_style` kwargs or single"
    )


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def styled(batches: Sequence[tuple[Any, Any]], style: str) -> list[tuple[Any, Any]]:
    """``batches`` whose mapping inputs, with ``style`` single, are wrapped in a one-entry tuple,
    so that :func:`call_model` passes each mapping as one positional argument."""
    if style != "single":
        return list(batches)
    return [((x,), y) if isinstance(x, Mapping) else (x, y) for x, y in batches]


def _arguments(inputs: Any) -> tuple[Sequence[Any], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return inputs, {}
    return (inputs,), {}


def map_tensors(fn: Callable[[Tensor], Any], inputs: Any) -> Any:
    """``inputs`` with ``fn`` applied to every tensor in it, its structure kept."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return _remapped(inputs, {key: map_tensors(fn, value) for key, value in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(fn, value) for value in inputs)
    return inputs


def _remapped(mapping: Mapping[Any, Any], values: dict[Any, Any]) -> Mapping[Any, Any]:
    """``values`` in a mapping of ``mapping``'s type where it can be copied and written (a
    ``UserDict``, a tokenizer's ``BatchEncoding``), else as a dict."""
    if type(mapping) is dict or not isinstance(mapping, MutableMapping):
        return values
    try:
        out = copy.copy(mapping)
        for key, value in values.items():
            out[key] = value
    except Exception:
        return values
    return out


def leaves(inputs: Any, name: str = "inputs") -> list[tuple[str, Tensor]]:
    """Every tensor in ``inputs`` with its name: ``input_ids`` for a dict's field, ``inputs[1]``
    for a tuple's entry, ``inputs`` for a plain tensor."""
    if isinstance(inputs, Tensor):
        return [(name, inputs)]
    if isinstance(inputs, Mapping):
        return [
            pair
            for key, value in inputs.items()
            for pair in leaves(value, str(key) if name == "inputs" else f"{name}.{key}")
        ]
    if isinstance(inputs, (tuple, list)):
        return [pair for i, value in enumerate(inputs) for pair in leaves(value, f"{name}[{i}]")]
    return []


def sample_count(inputs: Any, where: str) -> int:
    """The number of samples every tensor in ``inputs`` holds along its first dimension; an
    :class:`InputError` naming the fields when they disagree, or when there is no tensor."""
    named = leaves(inputs)
    if not named:
        raise InputError(f"{where}: the inputs hold no tensor")
    for field, tensor in named:
        if tensor.ndim == 0:
            raise InputError(f"{where}: {field} is a single number; it needs one entry per sample")
    counts = {field: int(tensor.shape[0]) for field, tensor in named}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{field} {count}" for field, count in counts.items())
        raise InputError(
            f"{where}: the input fields hold different numbers of samples ({shown}); every "
            "field needs one entry per sample"
        )
    return next(iter(counts.values()))


def take(inputs: Any, index: Tensor) -> Any:
    """The samples ``index`` picks from every tensor in ``inputs``."""
    return map_tensors(lambda t: t[index], inputs)


def split(inputs: Any, size: int) -> list[Any]:
    """``inputs`` cut into consecutive chunks of ``size`` samples (the last may be smaller)."""
    total = sample_count(inputs, "inputs")
    return [take_range(inputs, start, start + size) for start in range(0, total, size)]


def take_range(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start`` to ``stop`` (exclusive) of every tensor in ``inputs``, as views."""
    return map_tensors(lambda t: t[start:stop], inputs)


def concat(parts: Sequence[Any]) -> Any:
    """Structures of one shape joined sample-wise: tensors concatenated along dimension 0."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        return _remapped(first, {key: concat([p[key] for p in parts]) for key in first})
    if isinstance(first, (tuple, list)):
        return type(first)(concat([p[i] for p in parts]) for i in range(len(first)))
    return first


def split_outputs(outputs: Any, samples: int, size: int) -> list[Any] | None:
    """A model's ``outputs`` on ``samples`` samples cut into chunks as :func:`split` cuts its
    inputs, each structure's type kept (a ``ModelOutput`` stays one); None when some tensor in
    them does not hold ``samples`` entries along its first dimension (a loss the model computed
    from the whole batch), or when they hold no tensor."""
    if not leaves(outputs):
        return None
    try:
        return [_cut(outputs, samples, a, a + size) for a in range(0, samples, size)]
    except _Unsplittable:
        return None


class _Unsplittable(Exception):
    """Outputs that do not hold one entry per sample everywhere."""


def _cut(outputs: Any, samples: int, start: int, stop: int) -> Any:
    if isinstance(outputs, Tensor):
        if outputs.ndim == 0 or outputs.shape[0] != samples:
            raise _Unsplittable
        return outputs[start:stop]
    if isinstance(outputs, Mapping):
        if not isinstance(outputs, MutableMapping):
            raise _Unsplittable
        cut = copy.copy(outputs)
        for key, value in outputs.items():
            cut[key] = _cut(value, samples, start, stop)
        return cut
    if isinstance(outputs, (tuple, list)):
        parts = [_cut(value, samples, start, stop) for value in outputs]
        return type(outputs)(*parts) if hasattr(outputs, "_fields") else type(outputs)(parts)
    return outputs

"""A batch's inputs of any structure: a tensor, a tuple or list of tensors, or a dict of named
tensors (``input_ids``, ``attention_mask``, ...). How a model is called on them, and the
per-sample operations every layer needs: counting, indexing, splitting and joining samples."""

from __future__ import annotations

import copy
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
        return {key: map_tensors(fn, value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(fn, value) for value in inputs)
    return inputs


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
        return {key: concat([p[key] for p in parts]) for key in first}
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

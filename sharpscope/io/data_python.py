"""Data from user code: ``pkg.module:function`` returning a Dataset, DataLoader or tensors."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate

from sharpscope.errors import InputError
from sharpscope.io.data_files import mapping_table
from sharpscope.io.data_sources import (
    Source,
    Table,
    single_split,
    tensor_table,
    to_inputs,
    to_tensor,
)
from sharpscope.io.user_code import import_object, one_line
from sharpscope.structures import concat

ASSUMED_SPLITS = ("train", "test")
CHUNK = 256


def python_source(spec: str) -> Source:
    """The function ``spec`` names; called with ``split=`` when it has a ``split`` parameter."""
    function = import_object(spec, "`data`")
    if not callable(function):
        raise InputError(
            f"`data` {spec} is a {type(function).__name__}, not a function; name a function "
            "returning a Dataset, a DataLoader or (inputs, targets)"
        )
    if _takes_split(function):
        return Source(spec, ASSUMED_SPLITS, lambda split: _call(spec, function, split=split))
    return single_split(
        spec, lambda: _call(spec, function), ", or give the function a split parameter"
    )


def _takes_split(function: Callable[..., Any]) -> bool:
    try:
        parameter = inspect.signature(function).parameters.get("split")
    except (TypeError, ValueError):  # builtins without a signature
        return False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return parameter is not None and parameter.kind in kinds


def _call(spec: str, function: Callable[..., Any], **kwargs: Any) -> Table:
    try:
        result = function(**kwargs)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"`data` {spec} raised {one_line(exc)}; fix the function") from exc
    return result_table(result, spec)


def result_table(result: Any, where: str) -> Table:
    """A table over what a data function returned."""
    if isinstance(result, DataLoader):
        return _loader_table(result, where)
    if isinstance(result, IterableDataset):
        return _loader_table(DataLoader(result, batch_size=CHUNK), where)
    if isinstance(result, tuple) and len(result) == 2:
        return tensor_table(*result, where, ("inputs", "targets"))
    if isinstance(result, Mapping):
        return mapping_table(result, where)
    if (
        hasattr(result, "__getitem__")
        and hasattr(result, "__len__")
        and not isinstance(result, (str, bytes))
    ):
        return _dataset_table(result, where)
    raise InputError(
        f"`data` {where} returned a {type(result).__name__}; return a Dataset, a DataLoader "
        "or an (inputs, targets) pair"
    )


def _dataset_table(dataset: Any, where: str) -> Table:
    """A map-style dataset: only the samples asked for are read."""

    def take(idx: Tensor) -> tuple[Any, Tensor]:
        items = [_item(dataset, i, where) for i in idx.tolist()]
        pairs = [
            _pair(_collate(items[i : i + CHUNK], where), where) for i in range(0, len(items), CHUNK)
        ]
        return _joined(pairs, where)

    return Table(len(dataset), take, _declared_classes(dataset))


def _loader_table(loader: DataLoader, where: str) -> Table:
    """A DataLoader (or iterable dataset), read once; a shuffling loader is seeded (0) to be
    deterministic."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            pairs = [_pair(batch, where) for batch in loader]
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"reading `data` {where} failed ({one_line(exc)}); fix the data"
            ) from exc
    if not pairs:
        return tensor_table(torch.empty(0), torch.empty(0), where, ("inputs", "targets"))
    inputs, targets = _joined(pairs, where)
    names = ("inputs", "targets")
    return tensor_table(inputs, targets, where, names, _declared_classes(loader.dataset))


def _joined(pairs: list[tuple[Any, Tensor]], where: str) -> tuple[Any, Tensor]:
    """Batches of (inputs, targets) joined sample-wise."""
    try:
        return concat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    except (RuntimeError, KeyError, IndexError) as exc:
        raise _unstackable(where, exc) from exc


def _item(dataset: Any, index: int, where: str) -> Any:
    try:
        return dataset[index]
    except Exception as exc:
        raise InputError(
            f"`data` {where}: item {index} raised {one_line(exc)}; fix the dataset"
        ) from exc


def _collate(items: list[Any], where: str) -> Any:
    try:
        return default_collate(items)
    except Exception as exc:
        raise _unstackable(where, exc) from exc


def _unstackable(where: str, exc: Exception) -> InputError:
    return InputError(
        f"cannot stack the samples of `data` {where} ({one_line(exc)}); items must be "
        "(input, label) pairs or dicts of fields, of tensors, arrays or numbers of one shape "
        "(pad sequences to one length; PIL images need transforms.ToTensor())"
    )


def _pair(batch: Any, where: str) -> tuple[Any, Tensor]:
    """(inputs, targets) of a collated batch: a pair (whose inputs may be a tuple or dict of
    tensors), or a mapping with known keys (Hugging Face fields among them)."""
    if isinstance(batch, Mapping):
        table = mapping_table(_numeric_fields(batch), where)
        return table.take(torch.arange(table.size))
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return to_inputs(batch[0], f"{where}: inputs"), to_tensor(batch[1], f"{where}: targets")
    raise InputError(
        f"`data` {where} yields {type(batch).__name__} items; each must be an (input, label) "
        "pair or a dict with input and label keys"
    )


def _numeric_fields(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A collated dict without its text fields (lists of strings, e.g. a dataset's ``text``)."""
    return {
        key: value
        for key, value in batch.items()
        if not (isinstance(value, (list, tuple)) and value and isinstance(value[0], str))
    }


def _declared_classes(dataset: Any) -> int | None:
    """``len(dataset.classes)`` where the dataset lists its classes (as torchvision's do)."""
    classes = getattr(dataset, "classes", None)
    return len(classes) if isinstance(classes, (list, tuple)) and classes else None

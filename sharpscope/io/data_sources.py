"""The pieces every data reader builds on: lazily read tables, sources with splits, conversions."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sharpscope.errors import InputError
from sharpscope.structures import concat, sample_count, take

ALL = "all"
"""The split name for all of a source's data: the whole of a single-split source, or every split."""

SPLIT_ORDER = ("train", "val", "valid", "validation", "test")


@dataclass(frozen=True)
class Table:
    """One split of a source, not read yet: its size and a reader for any subset of its samples."""

    size: int
    take: Callable[[Tensor], tuple[Any, Tensor]]
    """Sorted int64 sample indices -> (inputs, targets) of those samples; the inputs are a
    tensor, a tuple/list or a dict of tensors (:mod:`sharpscope.structures`)."""
    num_classes: int | None = None
    """The class count when the source declares one; else it is read off the labels."""


@dataclass(frozen=True)
class Source:
    """A data source: a name for reports, its named splits (none: a single split) and a reader."""

    name: str
    splits: tuple[str, ...]
    open: Callable[[str], Table]


def single_split(name: str, table: Callable[[], Table], hint: str) -> Source:
    """A source holding one split: ``train`` (the default) and ``all`` both give all of it."""

    def open_split(split: str) -> Table:
        if split in ("train", ALL):
            return table()
        raise InputError(
            f"{name} holds a single split, so it has no {split!r} split: "
            f"leave `split` at train (or all){hint}"
        )

    return Source(name, (), open_split)


def named_splits(name: str, tables: dict[str, Callable[[], Table]]) -> Source:
    """A source with named splits; ``all`` joins them in order."""
    names = tuple(sorted(tables, key=_split_rank))

    def open_split(split: str) -> Table:
        if split == ALL:
            return concat_tables(name, [tables[s]() for s in names])
        if split not in tables:
            raise InputError(
                f"{name} has no {split!r} split: pass `split` {', '.join(names)} or {ALL}"
            )
        return tables[split]()

    return Source(name, names, open_split)


def _split_rank(split: str) -> tuple[int, str]:
    """Sort key: train, then validation, then test, then any other split alphabetically."""
    rank = SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)
    return rank, split


def concat_tables(name: str, tables: Sequence[Table]) -> Table:
    """The tables one after another, as one table."""
    starts = np.cumsum([0, *(t.size for t in tables)]).tolist()

    def take(idx: Tensor) -> tuple[Any, Tensor]:
        parts = []
        for table, lo in zip(tables, starts, strict=False):
            mine = idx[(idx >= lo) & (idx < lo + table.size)] - lo
            if len(mine):
                parts.append(table.take(mine))
        try:
            return concat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        except (RuntimeError, KeyError, IndexError) as exc:
            raise InputError(
                f"{name}: its splits hold samples of different shapes, so they cannot be "
                "joined as split 'all'; pick one split with `split`"
            ) from exc

    counts = [t.num_classes for t in tables]
    num_classes = None if None in counts else max(counts, default=None)
    return Table(starts[-1], take, num_classes)


def to_tensor(value: Any, what: str) -> Tensor:
    """A numeric tensor from a tensor, array, list or number; ``what`` names it in errors."""
    if isinstance(value, Tensor):
        if value.is_complex():
            raise _not_numeric(what, str(value.dtype))
        return value.detach().cpu()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise _not_numeric(what, type(value).__name__) from exc
    if array.dtype.kind not in "biuf":
        raise _not_numeric(what, str(array.dtype))
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(array))


def _not_numeric(what: str, kind: str) -> InputError:
    return InputError(
        f"{what} holds non-numeric data ({kind}); save numbers: float inputs, "
        "integer class indices (not names) or float regression targets"
    )


def to_inputs(value: Any, what: str) -> Any:
    """Model inputs from arrays: a dict of named arrays or a tuple/list of arrays keeps its
    structure (each entry one input field), anything else becomes one tensor."""
    if isinstance(value, Mapping):
        return {str(k): to_inputs(v, f"{what}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (tuple, list)) and _is_structure(value):
        return type(value)(to_inputs(v, f"{what}[{i}]") for i, v in enumerate(value))
    return to_tensor(value, what)


def _is_structure(value: Any) -> bool:
    """Whether ``value`` is arrays, or dicts or non-empty tuples/lists of them (not numbers)."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_structure(v) for v in value)
    return isinstance(value, (Tensor, np.ndarray, Mapping))


def tensor_table(
    inputs: Any, targets: Any, where: str, names: tuple[str, str], num_classes: int | None = None
) -> Table:
    """A table over in-memory inputs (a tensor, or a dict or tuple of tensors, one entry per
    sample in each field) and targets, one entry per sample."""
    x = to_inputs(inputs, f"{where}: {names[0]}")
    y = to_tensor(targets, f"{where}: {names[1]}")
    if y.ndim == 0:
        raise InputError(f"{where}: {names[1]} is a single number; it needs one entry per sample")
    count = sample_count(x, f"{where}: {names[0]}")
    if count != len(y):
        raise InputError(
            f"{where}: {names[0]} have {count} samples but {names[1]} have {len(y)}; "
            "both need one entry per sample"
        )
    return Table(count, partial(_index_pair, x, y), num_classes)


def _index_pair(x: Any, y: Tensor, idx: Tensor) -> tuple[Any, Tensor]:
    return take(x, idx), y[idx]


def class_count(targets: Sequence[Tensor]) -> int | None:
    """``max label + 1`` over integer targets (all of a file's splits); None for float targets."""
    if any(t.is_floating_point() for t in targets):
        return None
    labels = [t for t in targets if t.numel()]
    return max(int(t.max()) for t in labels) + 1 if labels else None


def digits_source() -> Source:
    """scikit-learn's bundled 8x8 digits: a fixed 80/20 train/test split (seed 0)."""
    return named_splits("digits", {s: partial(_digits_table, s) for s in ("train", "test")})


def _digits_table(split: str) -> Table:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    n = len(bunch.target)
    order = np.random.RandomState(0).permutation(n)
    n_train = int(0.8 * n)
    part = np.sort(order[:n_train] if split == "train" else order[n_train:])
    inputs = torch.from_numpy(bunch.images[part]).float().div(16).unsqueeze(1)
    targets = torch.from_numpy(bunch.target[part]).long()
    return tensor_table(inputs, targets, "digits", ("inputs", "targets"), num_classes=10)

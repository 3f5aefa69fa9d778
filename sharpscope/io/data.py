"""Data specs: load a model's data as tensors (``load_data``), batch it, check it fits a model.

A spec is ``digits``, a tensor file (``.pt``/``.pth``, ``.safetensors``, ``.npz``), a text file
(``.jsonl``, ``.csv``; tokenized as :class:`TextSpec` says), a Hugging Face ``datasets`` folder, a
CIFAR-10/100 folder, an image folder with a subfolder per class, or ``pkg.module:function`` /
``path/to/file.py:function``. ``docs/data.md`` describes each form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sharpscope.batches import logits_of
from sharpscope.errors import InputError
from sharpscope.io.data_files import file_source
from sharpscope.io.data_folders import folder_source
from sharpscope.io.data_hf import datasets_source, is_datasets_folder
from sharpscope.io.data_python import python_source
from sharpscope.io.data_sources import ALL, Source, digits_source
from sharpscope.io.data_text import TEXT_SUFFIXES, text_source
from sharpscope.io.losses import IGNORE_INDEX
from sharpscope.io.tokenizer import TextSpec
from sharpscope.io.user_code import is_object_spec
from sharpscope.structures import leaves, map_tensors, split

BUILTINS = {"digits": digits_source}
HELD_OUT = ("val", "valid", "validation", "test")
SPEC_FORMS = (
    "digits, a tensor file (.pt, .pth, .safetensors, .npz), a text file (.jsonl, .csv), a "
    "datasets, CIFAR or image-class folder, or pkg.module:function / path/to/file.py:function"
)


@dataclass
class DataBundle:
    """A split of a data set in memory: its inputs and their targets, N samples each."""

    inputs: Any
    """A tensor (N x ...), or a tuple or dict of them (:mod:`sharpscope.structures`); floating
    and uint8 (pixel) inputs are float32, other integer and bool ones (token ids, masks) keep
    their dtype."""
    targets: Tensor
    """int64 class labels (classification; -100 marks no label) or float32 values
    (regression)."""
    num_classes: int | None
    """The class count for class labels; None for regression."""
    source: str
    """What was loaded, for reports: "digits (train split, 512 of 1437 samples)"."""
    split: str
    """The split loaded; ``all`` for a single-split source."""
    splits: tuple[str, ...] = ()
    """The named splits the source offers (empty for a single-split source)."""
    split_size: int | None = None
    """How many samples the split holds (the bundle may be a subset of them)."""

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def load_data(
    spec: str,
    split: str = "train",
    samples: int | None = None,
    seed: int = 0,
    text: TextSpec | None = None,
) -> DataBundle:
    """Load ``split`` of the data ``spec`` names; ``samples`` keeps a random subset, fixed by
    ``seed`` (None: all of the split); ``text`` says how text data is tokenized."""
    if samples is not None and samples < 1:
        raise InputError(f"`samples` must be at least 1, got {samples}")
    source = open_source(spec, text or TextSpec())
    table = source.open(split)
    loaded = split if source.splits else ALL
    if table.size == 0:
        raise InputError(f"{source.name} has no samples (split {loaded}); check that it holds data")
    idx = subset_indices(table.size, samples, seed)
    inputs, targets = table.take(idx)
    inputs = _checked_inputs(inputs, idx, source.name)
    targets, num_classes = _checked_targets(targets, table.num_classes, idx, source.name)
    source_text = _describe(source, loaded, len(idx), table.size, samples)
    return DataBundle(inputs, targets, num_classes, source_text, loaded, source.splits, table.size)


def open_source(spec: str, text: TextSpec | None = None) -> Source:
    """The data source ``spec`` names, not read yet; ``text`` tokenizes text data."""
    if spec in BUILTINS:
        return BUILTINS[spec]()
    path = Path(spec).expanduser()
    if spec.strip() and path.is_dir():
        if is_datasets_folder(path):
            return datasets_source(path, spec, text or TextSpec())
        return folder_source(path, spec)
    if spec.strip() and path.is_file():
        if path.suffix.lower() in TEXT_SUFFIXES:
            return text_source(path, spec, text or TextSpec())
        return file_source(path, spec)
    if is_object_spec(spec):
        return python_source(spec)
    raise _unknown(spec, path)


def _unknown(spec: str, path: Path) -> InputError:
    if path.suffix or "/" in spec or "\\" in spec or spec.startswith((".", "~")):
        return InputError(
            f"data not found: no file or folder {spec} (a data function is written "
            "pkg.module:function)"
        )
    if spec.lower().startswith("cifar"):
        return InputError(
            f"data spec {spec!r}: sharpscope never downloads data; pass the folder of the "
            "extracted CIFAR python files, e.g. `data` ./cifar-10-batches-py"
        )
    return InputError(f"unknown data spec {spec!r}; pass {SPEC_FORMS}")


def subset_indices(size: int, samples: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of ``samples`` of ``size`` samples, the same for a seed on every machine.

    Subsets are nested: for one seed, the first ``k`` picks are shared by every larger subset.
    """
    if samples is None or samples >= size:
        return torch.arange(size)
    if not 0 <= seed < 2**32:
        raise InputError(f"`seed` must be in 0 .. 2**32 - 1, got {seed}; pass another `seed`")
    picks = np.random.RandomState(seed).permutation(size)[:samples]
    return torch.from_numpy(np.sort(picks)).long()


def _describe(source: Source, split: str, count: int, size: int, samples: int | None) -> str:
    if samples is not None and samples > size:
        amount = f"all {size} samples, {samples} asked"
    elif count < size:
        amount = f"{count} of {size} samples"
    else:
        amount = f"{size} samples"
    part = f"{split} split, " if source.splits and split != ALL else ""
    part = "all splits, " if source.splits and split == ALL else part
    return f"{source.name} ({part}{amount})"


def _checked_inputs(inputs: Any, idx: Tensor, name: str) -> Any:
    """Floating and uint8 inputs (pixel values) as float32, and finite; other integer and bool
    inputs (token ids, masks) as they are."""
    inputs = map_tensors(_as_model_input, inputs)
    for field, tensor in leaves(inputs):
        if tensor.is_floating_point():
            what = f"{name}: inputs" if field == "inputs" else f"{name}: input {field}"
            _check_finite(tensor, idx, what)
    return inputs


def _as_model_input(tensor: Tensor) -> Tensor:
    if tensor.is_floating_point() or tensor.dtype == torch.uint8:
        return tensor.to(torch.float32)
    return tensor


def _checked_targets(
    targets: Tensor, declared: int | None, idx: Tensor, name: str
) -> tuple[Tensor, int | None]:
    """Float targets: regression (float32). Integer or bool targets: int64 class labels."""
    if targets.is_floating_point():
        targets = targets.to(torch.float32)
        _check_finite(targets, idx, f"{name}: targets")
        return targets, None
    targets = targets.to(torch.int64)
    labelled = targets[targets != IGNORE_INDEX]
    if not labelled.numel():
        raise InputError(f"{name}: every label is {IGNORE_INDEX} (no label); give labelled data")
    lowest, highest = int(labelled.min()), int(labelled.max())
    if lowest < 0:
        raise InputError(
            f"{name}: class labels must be 0, 1, 2, ... (or {IGNORE_INDEX} for no label); "
            f"found {lowest}; renumber the classes from 0"
        )
    if declared is not None and highest >= declared:
        raise InputError(
            f"{name}: labels go up to {highest} but it declares {declared} classes; fix the labels"
        )
    return targets, declared if declared is not None else highest + 1


def _check_finite(values: Tensor, idx: Tensor, what: str) -> None:
    bad = ~torch.isfinite(values.reshape(len(values), -1))
    if bad.any():
        first = int(idx[bad.any(dim=1)][0])
        raise InputError(
            f"{what} hold {int(bad.sum())} NaN/inf values (first in sample {first}); "
            "fix or drop those samples"
        )


def batches(bundle: DataBundle, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """The bundle as ``(inputs, targets)`` batches in order; the last one may be smaller."""
    if batch_size < 1:
        raise InputError(f"`batch_size` must be at least 1, got {batch_size}")
    pairs = zip(split(bundle.inputs, batch_size), bundle.targets.split(batch_size), strict=True)
    return list(pairs)


def held_out_split(bundle: DataBundle) -> str | None:
    """The split to validate on (val, valid, validation or test, other than the one loaded),
    or None when the source has none."""
    if bundle.split == ALL:
        return None
    return next((s for s in HELD_OUT if s in bundle.splits and s != bundle.split), None)


def check_targets(bundle: DataBundle, outputs: Any) -> None:
    """Raise InputError when the logits of a model's ``outputs`` on a batch cannot be scored
    per sample against the bundle's targets (labels beyond the outputs, or a different number of
    values per sample)."""
    logits = logits_of(outputs)
    if not isinstance(logits, Tensor):
        raise InputError(
            f"the model returns a {type(outputs).__name__} without logits; wrap it so that "
            "forward returns the output tensor, or pass `loss` a function of its outputs"
        )
    if bundle.num_classes is None:
        _check_regression(bundle, logits)
    else:
        _check_classes(bundle, bundle.num_classes, logits)


def _check_classes(bundle: DataBundle, num_classes: int, outputs: Tensor) -> None:
    width = int(outputs.shape[1]) if outputs.ndim >= 2 else 1
    if num_classes > width:
        raise InputError(
            f"labels in {bundle.source} go up to {num_classes - 1} but the model has {width} "
            f"output{'s' if width != 1 else ''}; use data with the model's classes or a model "
            f"with {num_classes} outputs"
        )
    per_sample = tuple(bundle.targets.shape[1:])
    if tuple(outputs.shape[2:]) != per_sample:
        raise InputError(
            f"the model's outputs per sample have shape {tuple(outputs.shape[1:])} but the "
            f"labels in {bundle.source} have shape {per_sample}; they must match after the "
            "class dimension"
        )


def _check_regression(bundle: DataBundle, outputs: Tensor) -> None:
    wanted = int(bundle.targets[0].numel())
    given = int(outputs[0].numel()) if outputs.ndim >= 1 and len(outputs) else 0
    if given != wanted:
        raise InputError(
            f"targets in {bundle.source} have {wanted} value{'s' if wanted != 1 else ''} per "
            f"sample but the model has {given} output{'s' if given != 1 else ''}; use a model "
            "with one output per target value"
        )

"""Hugging Face ``datasets`` folders written by ``save_to_disk``: a Dataset, or a DatasetDict of
named splits. Columns follow the field rules of tensor files (:func:`fields_table`); a text
column without ``input_ids`` is tokenized (:mod:`sharpscope.io.text_tables`). Only the rows a run
takes are read from the memory-mapped Arrow files."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor

from sharpscope.errors import InputError
from sharpscope.io.data_files import LABEL_FIELDS, MODEL_FIELDS, language_model_labels
from sharpscope.io.data_sources import ALL, Source, Table, named_splits, single_split, to_tensor
from sharpscope.io.load_errors import first_line
from sharpscope.io.losses import IGNORE_INDEX
from sharpscope.io.optional import require_offline
from sharpscope.io.text_tables import Records, text_table
from sharpscope.io.tokenizer import TextSpec

DICT_FILE = "dataset_dict.json"
DATASET_FILES = ("dataset_info.json", "state.json")
_REWRITE = "write it again with save_to_disk"


def is_datasets_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``save_to_disk`` wrote (a DatasetDict or a Dataset)."""
    return (path / DICT_FILE).is_file() or all((path / f).is_file() for f in DATASET_FILES)


def datasets_source(path: Path, name: str, spec: TextSpec) -> Source:
    """The Dataset or DatasetDict in ``path``; a DatasetDict's splits are ``split``'s choices."""
    datasets = require_offline("datasets", f"reading the datasets folder {name}")
    _check_contained(path, name)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"datasets cannot read {name} ({first_line(exc)}); write it again with save_to_disk"
        ) from exc
    if isinstance(loaded, datasets.Dataset):
        hint = ", or save the other split in its own folder"
        return single_split(name, partial(dataset_table, loaded, name, spec), hint)
    splits = {
        split: partial(dataset_table, part, f"{name} ({split})", spec)
        for split, part in loaded.items()
    }
    source = named_splits(name, splits)
    joined = [loaded[split] for split in source.splits]

    def open_split(split: str) -> Table:
        if split == ALL:  # joined as rows, so that text is padded over all the splits together
            return dataset_table(datasets.concatenate_datasets(joined), name, spec)
        return source.open(split)

    return Source(name, source.splits, open_split)


def _check_contained(path: Path, name: str) -> None:
    """Refuse a folder whose json files name (or whose links lead to) a file or split folder
    outside it, before datasets reads anything: save_to_disk writes plain names."""
    root = path.resolve()
    if (path / DICT_FILE).is_file():
        splits = _json(path / DICT_FILE, root, name).get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise InputError(f"{name}: {DICT_FILE} has no list of split names; {_REWRITE}")
        folders = [path / split for split in splits]
    else:
        folders = [path]
    for folder in folders:
        _inside(folder, root, name)
        _inside(folder / DATASET_FILES[0], root, name)
        entries = _json(folder / DATASET_FILES[1], root, name).get("_data_files")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InputError(f"{name}: {folder / DATASET_FILES[1]} lists no data files; {_REWRITE}")
        for entry in entries:
            _inside(folder / str(entry.get("filename")), root, name)


def _inside(path: Path, root: Path, name: str) -> None:
    target = path.resolve()
    if not target.is_relative_to(root):
        raise InputError(
            f"{name} names {path}, which leads outside the folder (to {target}); a datasets "
            f"folder reads only its own files: {_REWRITE}"
        )


def _json(path: Path, root: Path, name: str) -> dict[str, Any]:
    """A json file of the folder, checked to be inside it, as a dict."""
    _inside(path, root, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"datasets cannot read {name} ({first_line(exc)}); {_REWRITE}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{name}: {path} does not hold a json object; {_REWRITE}")
    return data


def dataset_table(dataset: Any, name: str, spec: TextSpec) -> Table:
    """A table over a Dataset: its model fields by name, or its tokenized text."""
    columns = tuple(dataset.column_names)
    if "input_ids" not in columns and not any(key in columns for key in MODEL_FIELDS[1:]):
        return text_table(_records(dataset, name, columns), spec)
    label_key = next((key for key in LABEL_FIELDS if key in columns), None)
    if label_key is None and "input_ids" not in columns:
        raise InputError(
            f"{name} has {', '.join(k for k in MODEL_FIELDS if k in columns)} but no labels; add "
            f"a {LABEL_FIELDS[0]!r} column"
        )
    feature = dataset.features.get(label_key) if label_key else None
    classes = getattr(feature, "num_classes", None)
    return Table(len(dataset), partial(_take_fields, dataset, name, label_key), classes)


def _take_fields(dataset: Any, name: str, label_key: str | None, idx: Tensor) -> tuple[Any, Tensor]:
    """The model fields and labels of the rows ``idx``, sequences of different lengths padded
    (0, attention mask 0, labels -100)."""
    batch = dataset[idx.tolist()]
    inputs = {
        key: _padded(batch[key], 0, f"{name}: {key!r}") for key in MODEL_FIELDS if key in batch
    }
    ids = batch.get("input_ids")
    if ids is not None and "attention_mask" not in inputs and _ragged(ids):
        inputs["attention_mask"] = _padded([[1] * len(seq) for seq in ids], 0, name)
    if label_key is None:
        return inputs, language_model_labels(inputs)
    return inputs, _padded(batch[label_key], IGNORE_INDEX, f"{name}: {label_key!r}")


def _padded(values: list[Any], pad: int, what: str) -> Tensor:
    """Rows as one tensor; rows of sequences of different lengths padded at the end with ``pad``."""
    if not _ragged(values):
        return to_tensor(values, what)
    longest = max(len(v) for v in values)
    return to_tensor([list(v) + [pad] * (longest - len(v)) for v in values], what)


def _ragged(values: list[Any]) -> bool:
    lengths = {len(v) for v in values if isinstance(v, (list, tuple))}
    return len(lengths) > 1


def _records(dataset: Any, name: str, columns: tuple[str, ...]) -> Records:
    def column(field: str, idx: list[int] | None) -> list[Any]:
        return list(dataset[field]) if idx is None else dataset[idx][field]

    return Records(name, len(dataset), columns, column, lambda i: f"row {i}")

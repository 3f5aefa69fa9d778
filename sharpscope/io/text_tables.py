"""Rows of text fields as model inputs: tokenized with the model's tokenizer, only the rows a run
takes, padded to the longest of them and truncated to the model's length; labels as class ids
(names through the config's ``label2id``) or regression values.

A text is cut to :data:`CHARS_PER_TOKEN` characters per token of that length before the tokenizer
sees it: tokenizers work on the whole text before truncating, and one 10 MB line took 2 GB and
more than a minute."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sharpscope.errors import InputError
from sharpscope.io.data_files import MODEL_FIELDS, language_model_labels
from sharpscope.io.data_sources import Table, class_count, to_tensor
from sharpscope.io.load_errors import few
from sharpscope.io.tokenizer import TextSpec, label_ids, load_tokenizer, max_length

CHARS_PER_TOKEN = 32
"""Characters kept per token of the longest input. Text averages about 4 characters a token, so
only text whose tokens average more than 32 characters (long runs of spaces, words the tokenizer
reads as one unknown token) is cut shorter than the tokenizer would cut it."""
UNSET_TOKENS = 65_536
"""The length the cut assumes when neither ``max_length`` nor the model's positions say one."""


@dataclass(frozen=True)
class Records:
    """Rows of named fields, read on demand: the lines of a text file or a datasets table."""

    name: str
    size: int
    fields: tuple[str, ...]
    column: Callable[[str, list[int] | None], list[Any]]
    """A field's values in the rows at the given indices (None: in every row)."""
    row: Callable[[int], str]
    """Where a row is, for errors: ``line 4`` of a file, ``row 3`` of a data set."""


def text_table(records: Records, spec: TextSpec) -> Table:
    """A table over ``records`` whose inputs are the tokenized text fields of ``spec`` and whose
    targets are its label field (without one, the language-modelling labels)."""
    names = spec.text_fields()
    missing = [name for name in names if name not in records.fields]
    if missing:
        raise InputError(
            f"{records.name} has no text field {missing[0]!r} (its fields: "
            f"{few(list(records.fields))}); pass `text_field` the field that holds the text"
        )
    labels, num_classes = _labels(records, spec) if spec.label_field else (None, None)
    tokenizer = load_tokenizer(spec.tokenizer, records.name)
    length = max_length(spec, tokenizer)
    chars = CHARS_PER_TOKEN * (length or UNSET_TOKENS)

    def take(idx: Tensor) -> tuple[Any, Tensor]:
        rows = idx.tolist()
        texts = [[text[:chars] for text in _texts(records, name, rows)] for name in names]
        encoded = tokenizer(
            *texts,
            padding="longest",
            truncation=length is not None,
            max_length=length,
            return_tensors="pt",
        )
        inputs = {key: encoded[key] for key in MODEL_FIELDS if key in encoded}
        return inputs, language_model_labels(inputs) if labels is None else labels[idx]

    return Table(records.size, take, num_classes)


def _texts(records: Records, name: str, rows: list[int]) -> list[str]:
    values = records.column(name, rows)
    for row, value in zip(rows, values, strict=True):
        if not isinstance(value, str):
            raise InputError(
                f"{records.name} {records.row(row)}: {name!r} is {_kind(value)}, not text; give "
                "every row its text"
            )
    return values


def _labels(records: Records, spec: TextSpec) -> tuple[Tensor, int | None]:
    """Every row's label and the class count (None for regression values)."""
    field = spec.label_field
    if field not in records.fields:
        raise InputError(
            f"{records.name} has no label field {field!r} (its fields: "
            f"{few(list(records.fields))}); pass `label_field` the field that holds the labels, "
            "or an empty `label_field` for a language model (its labels are the input ids)"
        )
    values = [_number(v) for v in records.column(field, None)]
    for row, value in enumerate(values):
        if value is None or value == "":
            raise InputError(
                f"{records.name} {records.row(row)} has no {field!r}; give every row a label"
            )
    if all(isinstance(v, str) for v in values):
        return _named(values, records.name, spec.tokenizer)
    if any(isinstance(v, str) for v in values):
        raise InputError(
            f"{records.name}: {field!r} mixes names and numbers; give every label as a class id "
            "or every label as a name"
        )
    targets = to_tensor(values, f"{records.name}: labels {field!r}")
    return targets, class_count([targets])


def _named(names: Sequence[str], where: str, folder: Path | None) -> tuple[Tensor, int]:
    """Class names as ids by the config's ``label2id``. Without a mapping for every name they
    are refused: a classifier's class order cannot be guessed from the data."""
    ids = label_ids(folder)
    unknown = sorted(set(names) - set(ids))
    if unknown:
        known = few(sorted(ids)) if ids else "none"
        raise InputError(
            f"{where}: the labels are names ({few(unknown)}) that the model's config.json "
            f"label2id does not map (it maps: {known}); add them to label2id, or save the labels "
            "as class ids 0, 1, 2, ..."
        )
    return torch.tensor([ids[n] for n in names], dtype=torch.int64), max(ids.values()) + 1


def _number(value: Any) -> Any:
    """A CSV cell's text as the number it spells (an int, else a float); anything else as is."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _kind(value: Any) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"

"""Tensor files (``.pt``/``.pth``, ``.safetensors``, ``.npz``) and mappings of named arrays."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from sharpscope.errors import InputError
from sharpscope.io.data_sources import (
    ALL,
    Source,
    Table,
    class_count,
    named_splits,
    single_split,
    tensor_table,
    to_tensor,
)
from sharpscope.io.losses import IGNORE_INDEX
from sharpscope.io.npz_limits import BoundedNpz
from sharpscope.io.unpickler import refuse_unsafe_unpickler
from sharpscope.io.user_code import one_line

INPUT_KEYS = ("inputs", "x", "X", "data", "images", "features")
TARGET_KEYS = ("targets", "y", "Y", "labels", "label", "target")
MODEL_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")
"""Hugging Face model inputs, passed to the model by name."""
LABEL_FIELDS = ("labels", "label")
SUFFIX_KINDS = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors", ".npz": "npz"}
KEY_HINT = (
    f"name the arrays {'/'.join(INPUT_KEYS)} and {'/'.join(TARGET_KEYS)}, "
    "or per split like train_x/test_x or x_train/x_test, or use Hugging Face field names "
    "(input_ids, attention_mask, labels, ...)"
)


def file_source(path: Path, name: str) -> Source:
    """A tensor file, recognised by its content (by its suffix when the content is unclear)."""
    kind = _detect(path)
    if kind == "npz":
        with _read_npz(path, name) as npz:
            return mapping_source(BoundedNpz(npz, name), name)
    if kind == "safetensors":
        return mapping_source(_read_safetensors(path, name), name)
    if kind == "torch":
        return mapping_source(_read_torch(path, name), name)
    raise InputError(
        f"{name} is not a tensor file sharpscope reads: save inputs and targets with torch.save "
        "(.pt/.pth), safetensors (.safetensors) or numpy.savez (.npz)"
    )


def mapping_source(mapping: Mapping[str, Any], name: str) -> Source:
    """A source over a mapping of named arrays: one split, or several by per-split key names;
    Hugging Face field names (``input_ids``, ``pixel_values``, ...) make one split of model
    inputs by name (:func:`fields_table`)."""
    if any(key in MODEL_FIELDS for key in mapping):
        hint = ", or pass the other split as its own file"
        return single_split(name, _const(fields_table(mapping, name)), hint)
    pairs = find_pairs(list(mapping), name)
    data = {
        split: [to_tensor(_value(mapping, key, name), f"{name}: {key!r}") for key in keys]
        for split, keys in pairs.items()
    }
    num_classes = class_count([y for _, y in data.values()])
    tables = {
        split: tensor_table(x, y, name, _roles_named(pairs[split]), num_classes)
        for split, (x, y) in data.items()
    }
    if list(tables) == [ALL]:
        hint = ", pass the other split as its own file, or name its keys like test_x/test_y"
        return single_split(name, _const(tables[ALL]), hint)
    return named_splits(name, {split: _const(table) for split, table in tables.items()})


def mapping_table(mapping: Mapping[str, Any], where: str) -> Table:
    """The one (inputs, targets) pair of a mapping returned by user code, as a table."""
    source = mapping_source(mapping, where)
    if source.splits:
        raise InputError(
            f"{where} gave per-split keys ({', '.join(source.splits)}); return one split's "
            "inputs and targets"
        )
    return source.open(ALL)


def fields_table(mapping: Mapping[str, Any], name: str) -> Table:
    """A table of Hugging Face fields: the inputs are the model fields present, passed by name
    (``model(input_ids=..., attention_mask=...)``); the targets are ``labels`` (or ``label``),
    or without them the language-modelling labels: the input ids, padding (attention mask 0) as
    -100."""
    inputs = {
        key: to_tensor(_value(mapping, key, name), f"{name}: {key!r}")
        for key in MODEL_FIELDS
        if key in mapping
    }
    label_key = next((key for key in LABEL_FIELDS if key in mapping), None)
    if label_key is not None:
        targets = to_tensor(_value(mapping, label_key, name), f"{name}: {label_key!r}")
    elif "input_ids" in inputs:
        targets = language_model_labels(inputs)
    else:
        raise InputError(
            f"{name} has {', '.join(inputs)} but no labels; add a {LABEL_FIELDS[0]!r} field"
        )
    fields = f"input fields {', '.join(inputs)}"
    targets_name = f"labels {label_key!r}" if label_key else "labels (the input_ids)"
    return tensor_table(inputs, targets, name, (fields, targets_name), class_count([targets]))


def language_model_labels(inputs: Mapping[str, Tensor]) -> Tensor:
    """The labels a language model learns from its own inputs: the input ids, with the padded
    positions (attention mask 0) as -100, ignored."""
    labels = inputs["input_ids"].to(torch.int64)
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape != labels.shape:
        return labels.clone()
    return labels.masked_fill(mask == 0, IGNORE_INDEX)


def _roles_named(keys: tuple[str, str]) -> tuple[str, str]:
    return f"inputs {keys[0]!r}", f"targets {keys[1]!r}"


def _const(table: Table) -> Callable[[], Table]:
    return lambda: table


def find_pairs(keys: list[str], name: str) -> dict[str, tuple[str, str]]:
    """``{split: (inputs key, targets key)}``; plain keys are split ``all`` (``train`` beside
    per-split keys)."""
    found: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        for role_split in _roles(key):
            found.setdefault(role_split, []).append(key)
    for (role, split), matches in found.items():
        if len(matches) > 1 and ("inputs", split) in found and ("targets", split) in found:
            raise InputError(
                f"{name} has several {role} arrays ({', '.join(matches)}): keep one, or rename "
                "the others to names sharpscope does not read"
            )
    pairs = {
        split: (found[("inputs", split)][0], found[("targets", split)][0])
        for (role, split) in found
        if role == "inputs" and ("targets", split) in found
    }
    if not pairs:
        shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "") or "none"
        raise InputError(
            f"{name} has no inputs and targets sharpscope knows (keys: {shown}); {KEY_HINT}"
        )
    return _plain_as_train(pairs, name)


def _plain_as_train(pairs: dict[str, tuple[str, str]], name: str) -> dict[str, tuple[str, str]]:
    if ALL not in pairs or len(pairs) == 1:
        return pairs
    if "train" in pairs:
        raise InputError(
            f"{name} mixes plain keys ({', '.join(pairs[ALL])}) with per-split keys including "
            "train; rename the plain ones to the split they hold"
        )
    return {("train" if split == ALL else split): keys for split, keys in pairs.items()}


def _roles(key: str) -> list[tuple[str, str]]:
    """The (role, split) readings of a key: ``x`` -> (inputs, all), ``y_test`` -> (targets,
    test)."""
    readings = []
    for role, names in (("inputs", INPUT_KEYS), ("targets", TARGET_KEYS)):
        for known in names:
            if key == known:
                readings.append((role, ALL))
            elif key.startswith(known + "_") and key[len(known) + 1 :].isalnum():
                readings.append((role, key[len(known) + 1 :]))
            elif key.endswith("_" + known) and key[: -len(known) - 1].isalnum():
                readings.append((role, key[: -len(known) - 1]))
    return readings


def _value(mapping: Mapping[str, Any], key: str, name: str) -> Any:
    try:
        return mapping[key]
    except ValueError as exc:  # numpy refuses object arrays without allow_pickle
        raise InputError(
            f"{name}: {key!r} holds Python objects, not numbers; save numeric arrays only"
        ) from exc


def _detect(path: Path) -> str | None:
    """``"torch"``, ``"safetensors"`` or ``"npz"`` by content, else by suffix, else None."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
    with path.open("rb") as f:
        head = f.read(9)
    if head[:2] == b"\x80\x02":  # the legacy (pre-zip) torch.save format
        return "torch"
    size = path.stat().st_size
    if len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    return SUFFIX_KINDS.get(path.suffix.lower())


def _read_npz(path: Path, name: str) -> Any:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise _unreadable(name, "numpy.load", exc) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(
            f"{name} holds a single array; save inputs and targets together: "
            "numpy.savez(path, x=inputs, y=targets)"
        )
    return loaded


def _read_safetensors(path: Path, name: str) -> dict[str, Any]:
    try:
        return load_file(path)
    except Exception as exc:
        raise _unreadable(name, "safetensors", exc) from exc


def _read_torch(path: Path, name: str) -> Mapping[str, Any]:
    """``torch.load`` with weights only; a zip-format file is memory-mapped, so that only the
    samples a run takes are read (the legacy format cannot be)."""
    refuse_unsafe_unpickler(name, None)
    try:
        mmap = zipfile.is_zipfile(path)
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:  # torch's message is many lines: keep the gist
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise InputError(
                f"cannot read {name} with torch.load; the file is damaged or not a torch file"
            ) from exc
        raise InputError(
            f"{name} holds a Python object ({found[1]}) that sharpscope will not unpickle: "
            "unpickling can run any code, so data files are read as tensors only; save tensors "
            "or dicts of tensors: torch.save({'inputs': x, 'targets': y}, path)"
        ) from exc
    except Exception as exc:
        raise _unreadable(name, "torch.load", exc) from exc
    if isinstance(loaded, Mapping):
        return {str(k): v for k, v in loaded.items()}
    if isinstance(loaded, (tuple, list)) and len(loaded) == 2:
        return {"inputs": loaded[0], "targets": loaded[1]}
    raise InputError(
        f"{name} holds a {type(loaded).__name__}; save a dict of tensors or an (inputs, targets) "
        "pair: torch.save({'inputs': x, 'targets': y}, path)"
    )


def _unreadable(name: str, reader: str, exc: Exception) -> InputError:
    return InputError(
        f"cannot read {name} with {reader} ({one_line(exc)}); the file is damaged or not "
        "in that format"
    )

"""Weights as ``{name: tensor}``: checked and unprefixed as read, fitted to a model (dtype, key
prefixes, tied weights, a check that names every mismatch), and a model's state made savable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.load_errors import few

WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")
"""Keys under which a ``torch.save`` checkpoint may nest its state dict."""
KEY_PREFIXES: tuple[str, ...] = ("module.", "model.")
"""Key prefixes stripped when every weight name carries one."""


def as_state_dict(path: Path, mapping: Mapping[Any, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Check that ``mapping`` is ``{name: tensor}``; strip a key prefix all names share."""
    if not mapping:
        raise InputError(f"{path} holds an empty state dict; it has no weights to load")
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(
                f"{path} is not a state dict: entry {key!r} is a {type(value).__name__}, not a "
                "tensor; expected {name: tensor}, possibly under one of "
                f"{', '.join(WRAPPER_KEYS)}"
            )
    state = dict(mapping)
    prefix = ""
    while shared := _shared_prefix(state):
        state = {key[len(shared) :]: value for key, value in state.items()}
        prefix += shared
    return state, prefix


def _shared_prefix(state: Mapping[str, Any]) -> str:
    for prefix in KEY_PREFIXES:
        if all(key.startswith(prefix) and len(key) > len(prefix) for key in state):
            return prefix
    return ""


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "the weights",
    model_name: str = "",
) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, after a check that names missing and
    unexpected keys and mismatched shapes; tied weights may be stored once."""
    state = _fill_tied(model, state_dict)
    problems = _mismatches(model, state)
    if problems:
        raise InputError(
            f"{source} does not fit the model {model_name or type(model).__name__}: "
            f"{'; '.join(problems)}; check that "
            "`model` and `model_args` describe the architecture that wrote the checkpoint"
        )
    model.load_state_dict(state, strict=True)


def in_dtype_of(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Convert the model to the one floating dtype of the stored weights, so that loading them
    loses no precision (a float64 checkpoint gives a float64 model)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return model.to(dtypes.pop()) if len(dtypes) == 1 else model


def restore_prefix(
    model: nn.Module, state: dict[str, torch.Tensor], stripped: str
) -> dict[str, torch.Tensor]:
    """Put back the part of a stripped prefix that the model's own names start with (a model
    whose weights all live under ``model.``, say)."""
    names = list(model.state_dict())
    for start in range(len(stripped)):
        prefix = stripped[start:]
        if (start == 0 or stripped[start - 1] == ".") and all(n.startswith(prefix) for n in names):
            return {prefix + key: value for key, value in state.items()}
    return state


def _fill_tied(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy a tied (shared) tensor stored under one of its names to its other names."""
    filled = dict(state)
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    for names in groups.values():
        stored = next((n for n in names if n in filled), None)
        for name in names if stored is not None else ():
            filled.setdefault(name, filled[stored])
    return filled


def _mismatches(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {list(state[k].shape)} in the file but {list(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {few(shapes)}")
    return problems


def savable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as dense, contiguous CPU tensors that share no memory."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            kind = value.layout if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(
                f"cannot save the model's {name!r}: it is a {kind}, and safetensors stores "
                "dense tensors only"
            )
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors

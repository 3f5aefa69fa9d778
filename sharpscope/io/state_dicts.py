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
    state, problems = fitting(model, state_dict)
    if problems:
        raise InputError(
            f"{source} does not fit the model {model_name or type(model).__name__}: "
            f"{'; '.join(problems)}; check that "
            "`model` and `model_args` describe the architecture that wrote the checkpoint"
        )
    model.load_state_dict(state, strict=True)


def fitting(
    model: nn.Module, state: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights with a tied tensor stored once given all its names, and what does not fit the
    model (missing and unexpected names, mismatched shapes; none when they fit)."""
    filled = _fill_tied(model, state)
    return filled, _mismatches(model, filled)


def in_dtype_of(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Convert the model to the one floating dtype of the stored weights, so that loading them
    loses no precision (a float64 checkpoint gives a float64 model)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return model.to(dtypes.pop()) if len(dtypes) == 1 else model


def stored_dtype(state: Mapping[str, torch.Tensor]) -> str | None:
    """The one floating dtype of the stored weights (``bfloat16``), ``mixed`` for several, None
    for none."""
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else ("mixed" if dtypes else None)


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


def fit_prefix(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str = "the weights",
    model_name: str = "",
) -> tuple[dict[str, torch.Tensor], str]:
    """The weights, and the key prefix stripped from them: none if their names are the model's,
    else the one prefix (``net.`` of a LightningModule holding the network as ``self.net``) that
    every name carries and whose removal gives exactly the model's names. A prefix that fits but
    leaves other weights out, or several that fit, raise naming them."""
    if _names_fit(model, state):
        return dict(state), ""
    fitting = [p for p in _prefixes_of(model, state) if _names_fit(model, under_prefix(state, p))]
    if len(fitting) == 1 and all(key.startswith(fitting[0]) for key in state):
        return under_prefix(state, fitting[0]), fitting[0]
    if not fitting:
        return dict(state), ""
    target = model_name or type(model).__name__
    if len(fitting) > 1:
        found = f"under each of the key prefixes {', '.join(fitting)}"
    else:
        others = [key for key in state if not key.startswith(fitting[0])]
        found = f"under the key prefix {fitting[0]} beside other weights ({few(others)})"
    raise InputError(
        f"{source} holds weights that fit the model {target} {found}; pass `state_prefix` "
        "with the prefix of the weights to load"
    )


def under_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The weights whose names start with ``prefix``, with it removed."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def select_prefix(
    state: Mapping[str, torch.Tensor], prefix: str, source: str = "the weights"
) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` (the other weights left out), unprefixed; raise naming the
    first components of the names if none starts with it."""
    chosen = under_prefix(state, prefix)
    if not prefix or not chosen:
        tops = sorted({key.partition(".")[0] + "." for key in state if "." in key})
        raise InputError(
            f"`state_prefix` {prefix!r}: no weight of {source} is under it; its names start "
            f"with {few(tops) or 'no dotted prefix'}"
        )
    return chosen


def _prefixes_of(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """The dotted prefixes of the weight names that are followed by one of the model's names."""
    names = set(model.state_dict())
    found = {
        key[: i + 1]
        for key in state
        for i, char in enumerate(key)
        if char == "." and key[i + 1 :] in names
    }
    return sorted(found)


def _names_fit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    return bool(state) and not _mismatches(model, _fill_tied(model, state), shapes=False)


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


def _mismatches(
    model: nn.Module, state: Mapping[str, torch.Tensor], shapes: bool = True
) -> list[str]:
    """The missing and unexpected names and, with ``shapes``, the mismatched shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [
        f"{k} is {list(state[k].shape)} in the file but {list(v.shape)} in the model"
        for k, v in expected.items()
        if shapes and k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {few(unexpected)}")
    if shaped:
        problems.append(f"shape mismatch: {few(shaped)}")
    return problems


def savable_state(
    model: nn.Module, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state (or ``state``, given in its place) as dense, contiguous CPU tensors that
    share no memory."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in (model.state_dict() if state is None else state).items():
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

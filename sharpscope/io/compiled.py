"""TorchScript and ``torch.export`` archives, loaded as modules: refused when their graph is fixed
in training mode (dropout on, BatchNorm on batch statistics) and, unless trusted, when a
``.pt2`` holds pickled payloads."""

from __future__ import annotations

import functools
import io
import json
import pickle
import types
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.load_errors import corrupt, first_line, pickle_refusal, refused_global

_TRAINING_ARGS = frozenset({"training", "train"})
_UNKNOWN = object()


def load_torchscript(path: Path) -> nn.Module:
    """The module of a TorchScript archive, refused if traced in training mode."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is what the file holds
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise InputError(
            f"{path} is a TorchScript archive that torch.jit.load cannot read "
            f"({first_line(exc)}); save it again with torch.jit.save"
        ) from exc
    _refuse_training_graph(path, _jit_training_ops(module), "torch.jit.trace")
    return module


def load_export(path: Path, trust_pickle: bool) -> nn.Module:
    """The module of a ``torch.export`` ``.pt2`` archive, refused if exported in training mode
    or, unless ``trust_pickle``, if it holds pickled payloads; ``train()``/``eval()`` work on it
    and inputs of shapes it was not exported for get a clear error."""
    if not trust_pickle:
        _refuse_pickled_payloads(path)
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as exc:
        raise InputError(
            f"{path}: torch.export.load cannot read this .pt2 archive ({first_line(exc)}); "
            f"export and save it again with torch {torch.__version__} (torch.export.save)"
        ) from exc
    _refuse_training_graph(path, _fx_training_ops(module), "torch.export.export")
    _allow_mode_switch(module)
    module.register_forward_pre_hook(_shape_check(path, _input_shapes(program)), prepend=True)
    return module


def _refuse_pickled_payloads(path: Path) -> None:
    """torch.export.load unpickles some payloads (``use_pickle`` weights, custom objects, sample
    inputs); refuse a file that needs it unless it is trusted."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            tail = name.split("/", 1)[-1]
            if tail.startswith(("data/weights/", "data/constants/")) and tail.endswith(".json"):
                _check_payload_config(path, tail, archive.read(name))
            elif name.endswith(".pt"):
                _check_weights_only(path, archive.read(name))


def _check_payload_config(path: Path, name: str, raw: bytes) -> None:
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError) as exc:
        raise corrupt(path, exc) from exc
    constants = name.startswith("data/constants/")
    for key, payload in config.items():
        if not isinstance(payload, dict):
            raise corrupt(path, ValueError(f"{name}: entry {key} is not an object"))
        pickled = payload.get("use_pickle") or (
            constants and not str(payload.get("path_name", "")).startswith("tensor_")
        )
        if pickled:
            raise pickle_refusal(path, f"pickled {key}")


def _check_weights_only(path: Path, raw: bytes) -> None:
    try:
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle_refusal(path, refused_global(exc)) from exc
    except Exception as exc:
        raise corrupt(path, exc) from exc


def _allow_mode_switch(module: nn.Module) -> None:
    """``ExportedProgram.module()`` makes ``train()``/``eval()`` raise; make them set the flags
    only, as the graph's behaviour was fixed at export (and checked to be eval-mode)."""
    module.train = types.MethodType(nn.Module.train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(nn.Module.eval, module)  # type: ignore[method-assign]


def _input_shapes(program: torch.export.ExportedProgram) -> list[tuple[int | None, ...] | None]:
    """The exported input shapes, ``None`` for a dynamic dimension (or a non-tensor input)."""
    users = set(program.graph_signature.user_inputs)
    shapes: list[tuple[int | None, ...] | None] = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            value = node.meta.get("val")
            shape = getattr(value, "shape", None)
            shapes.append(None if shape is None else tuple(_static(d) for d in shape))
    return shapes


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) else None


def _shape_check(path: Path, shapes: list[tuple[int | None, ...] | None]) -> Callable[..., None]:
    """A forward pre-hook that explains inputs the program's static shapes reject."""

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        if len(args) != len(shapes):
            return
        for got, want in zip(args, shapes, strict=True):
            if isinstance(got, torch.Tensor) and want is not None and not _fits(got, want):
                shown = ", ".join("*" if d is None else str(d) for d in want)
                raise InputError(
                    f"{path} was exported for inputs of shape [{shown}], got "
                    f"{list(got.shape)}; export with dynamic_shapes (a torch.export.Dim for the "
                    "batch dimension) or use batches of exactly that shape"
                )

    return check


def _fits(tensor: torch.Tensor, shape: tuple[int | None, ...]) -> bool:
    return tensor.dim() == len(shape) and all(
        want is None or got == want for got, want in zip(tensor.shape, shape, strict=True)
    )


def _refuse_training_graph(path: Path, ops: list[str], how: str) -> None:
    if ops:
        raise InputError(
            f"{path} was made by {how} in training mode ({', '.join(ops)} with training=True "
            "fixed in the graph), so eval mode cannot be restored; call model.eval() before "
            f"{how} and save it again"
        )


def _trains(schema: Any, value_at: Callable[[int, str], Any]) -> bool:
    """Whether an operator call is fixed in training mode: dropout on, or BatchNorm on batch
    statistics while it has running statistics (without them it uses the batch in any mode)."""
    if "batch_norm_with_update" in schema.name:
        return True
    values = {arg.name: value_at(i, arg.name) for i, arg in enumerate(schema.arguments)}
    if "running_mean" in values and values["running_mean"] is None:
        return False
    return any(values.get(name) is True for name in _TRAINING_ARGS)


def _fx_training_ops(module: nn.Module) -> list[str]:
    found: set[str] = set()
    for sub in module.modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            schema = getattr(node.target, "_schema", None)
            if node.op != "call_function" or schema is None:
                continue
            if _trains(schema, functools.partial(_fx_value, node)):
                found.add(schema.name)
    return sorted(found)


def _fx_value(node: torch.fx.Node, index: int, name: str) -> Any:
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, _UNKNOWN)


def _jit_training_ops(module: torch.jit.ScriptModule) -> list[str]:
    found: set[str] = set()
    for node in _jit_nodes(module.inlined_graph):
        text = node.schema()
        if text == "(no schema)":
            continue
        schema = torch._C.parse_schema(text)
        if _trains(schema, functools.partial(_jit_constant, node)):
            found.add(schema.name)
    return sorted(found)


def _jit_nodes(block: Any) -> Any:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _jit_nodes(sub)


def _jit_constant(node: Any, index: int, name: str) -> Any:
    """The value of a constant argument, else ``_UNKNOWN``."""
    del name  # JIT nodes pass every argument positionally
    if index >= node.inputsSize():
        return _UNKNOWN
    value = node.inputsAt(index)
    return value.toIValue() if value.node().kind() == "prim::Constant" else _UNKNOWN

"""TorchScript and ``torch.export`` archives, loaded as modules: refused when their graph is fixed
in training mode (dropout on, BatchNorm on batch statistics).

A TorchScript archive holds code that runs when it is loaded (``__setstate__``) and when it is
called, and that code may open and write files (``torch.from_file(..., shared=True)``): it loads
only with ``trust_code``. A ``.pt2`` holds a graph of operators instead: read once into memory
(:mod:`sharpscope.io.pt2_archive`), it is refused unless trusted when it holds pickled payloads
(``trust_pickle``) or an operator that is not a plain computation (``trust_code``), checked
before it runs. torch's log lines and warnings while loading are kept off the terminal.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.graph_ops import refuse_unsafe_ops
from sharpscope.io.load_errors import first_line
from sharpscope.io.pt2_archive import read_pt2

_TRAINING_ARGS = frozenset({"training", "train"})
_UNKNOWN = object()


def load_torchscript(path: Path, trust_code: bool) -> nn.Module:
    """The module of a TorchScript archive, only with ``trust_code`` (its code runs as it loads);
    refused if traced in training mode."""
    if not trust_code:
        raise InputError(
            f"{path} is a TorchScript archive: the TorchScript code in it runs when it is loaded "
            "and can read and write files, so sharpscope refuses it by default: pass "
            "`trust_code` only for files you trust, or export the model with torch.export "
            "(a .pt2 is checked instead) or save its state_dict"
        )
    try:
        with quiet_torch():  # TorchScript is deprecated, but it is what the file holds
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise InputError(
            f"{path} is a TorchScript archive that torch.jit.load cannot read "
            f"({first_line(exc)}); save it again with torch.jit.save"
        ) from exc
    _refuse_training_graph(path, _jit_training_ops(module), "torch.jit.trace")
    return module


def load_export(path: Path, trust_pickle: bool, trust_code: bool) -> nn.Module:
    """The module of a ``torch.export`` ``.pt2`` archive, refused if exported in training mode,
    unless ``trust_pickle`` if it holds pickled payloads, and unless ``trust_code`` if its graph
    calls an operator that is not a plain computation (:mod:`sharpscope.io.graph_ops`);
    ``train()``/``eval()`` work on it and inputs of shapes it was not exported for get a clear
    error."""
    archive = read_pt2(path, trust_pickle)
    with quiet_torch() as logged:
        try:
            program = torch.export.load(archive)
            module = program.module()
        except Exception as exc:
            cause = next((r.exc_info[1] for r in logged if r.exc_info and r.exc_info[1]), exc)
            raise InputError(
                f"{path}: torch.export.load cannot read this .pt2 archive ({first_line(cause)}); "
                f"export and save it again with torch {torch.__version__} (torch.export.save)"
            ) from exc
    if not trust_code:
        refuse_unsafe_ops(path, module)
    _refuse_training_graph(path, _fx_training_ops(module), "torch.export.export")
    _allow_mode_switch(module)
    module.register_forward_pre_hook(_shape_check(path, _input_shapes(program)), prepend=True)
    return module


class _Kept(logging.Handler):
    """A log handler that keeps the records instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def quiet_torch() -> Iterator[list[logging.LogRecord]]:
    """While torch loads a file: its log records kept (the list yielded) instead of printed, and
    warnings dropped. A failed ``torch.export.load`` logs a traceback, then raises a vaguer
    error: the error line names the logged cause instead."""
    names = [name for name in logging.root.manager.loggerDict if name.startswith("torch.")]
    loggers = [logging.getLogger("torch"), *map(logging.getLogger, names)]
    saved = [(logger, logger.handlers, logger.propagate) for logger in loggers]
    kept = _Kept()
    for logger in loggers:  # every record goes up to "torch", whose only handler keeps it
        logger.handlers, logger.propagate = [], True
    loggers[0].handlers, loggers[0].propagate = [kept], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield kept.records
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


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

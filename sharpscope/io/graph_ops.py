"""Which operators a ``torch.export`` graph from a file may call without ``trust_code``.

A ``.pt2`` graph is a list of operator calls, and some operators are not computations: a node
``aten.from_file(path, shared=True)`` followed by ``fill_`` writes the named file on the first
forward, ``aten.save`` writes one. The rule is an allow-list: operators of torch's own ``aten``
and ``prims`` namespaces less :data:`DENIED` (and any that takes a file name as a string), the
control-flow operators of :data:`HIGHER_ORDER` (their subgraphs are checked too), and the Python
arithmetic torch.export records for symbolic shapes. Anything else (a custom or library
namespace, another higher-order operator) needs ``trust_code``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.load_errors import few

NAMESPACES = frozenset({"aten", "prims"})
DENIED = frozenset({"from_file", "save", "_print", "manual_seed", "seed", "initial_seed"})
"""``aten``/``prims`` operators that touch files, print or reseed the global generator."""
HIGHER_ORDER = frozenset(
    {
        "cond",
        "while_loop",
        "map_impl",
        "scan",
        "associative_scan",
        "invoke_subgraph",
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
        "flex_attention",
    }
)
"""Higher-order operators that only call their subgraphs (control flow, grad and autocast
modes, attention score functions)."""
_FILE_ARGS = frozenset({"filename", "file", "path", "f"})
_PYTHON_MODULES = frozenset({"_operator", "operator", "math"})
_STRUCTURAL = frozenset({"placeholder", "output", "get_attr", "call_module"})


def refuse_unsafe_ops(path: Path, module: nn.Module) -> None:
    """Raise :class:`InputError` naming the operators of ``module``'s graphs (and every
    submodule's, the subgraphs of control flow included) that the allow-list does not admit."""
    found = sorted({name for sub in module.modules() for name in _unsafe_in(sub)})
    if found:
        raise InputError(
            f"{path} is a .pt2 whose graph calls {few(found)}, which is not a plain computation "
            "on tensors (it may read or write files, or run code outside torch), so sharpscope "
            "refuses it by default: pass `trust_code` only for files you trust"
        )


def _unsafe_in(module: nn.Module) -> list[str]:
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return []
    unsafe = []
    for node in graph.nodes:
        if node.op in _STRUCTURAL:
            continue
        if node.op != "call_function" or not _allowed(node.target):
            unsafe.append(_name(node))
    return unsafe


def _allowed(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        operator = schema.name.partition("::")[2]
        return (
            target.namespace in NAMESPACES
            and operator not in DENIED
            and not any(_names_a_file(arg) for arg in schema.arguments)
        )
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name() in HIGHER_ORDER
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", "")
    if module in _PYTHON_MODULES:
        return True
    return module == "torch" and name.lstrip("_").startswith("sym_")


def _names_a_file(arg: Any) -> bool:
    """A string argument named like a file (``aten.from_file``'s ``filename``)."""
    return arg.name in _FILE_ARGS and str(arg.type) in ("str", "Optional[str]")


def _name(node: torch.fx.Node) -> str:
    if node.op != "call_function":
        return f"{node.op} {node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.partition('::')[2]}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}"

"""The optional Hugging Face libraries (the ``hf`` extra), imported only when data or a model
needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from sharpscope.errors import InputError

INSTALL = 'pip install "sharpscope[hf]"'


def require(module: str, purpose: str) -> ModuleType:
    """``import module`` (transformers or datasets); an :class:`InputError` saying ``purpose``
    needs it and how to install it when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"{purpose} needs {module}, which is not installed: {INSTALL}") from exc

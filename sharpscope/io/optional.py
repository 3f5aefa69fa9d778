"""The optional Hugging Face libraries (the ``hf`` and ``peft`` extras), imported only when data
or a model needs them; when sharpscope reads files with them, offline."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from sharpscope.errors import InputError

INSTALL = 'pip install "sharpscope[hf]"'
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
"""The switches that keep huggingface_hub, transformers and datasets off the network. They are
read when those libraries are first imported, so they are set before sharpscope imports them."""


def require(module: str, purpose: str, install: str = INSTALL) -> ModuleType:
    """``import module`` (transformers, datasets or peft); an :class:`InputError` saying
    ``purpose`` needs it and how to install it (``install``) when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"{purpose} needs {module}, which is not installed: {install}") from exc


def require_offline(module: str, purpose: str, install: str = INSTALL) -> ModuleType:
    """:func:`require` for reading files: the Hugging Face libraries' offline switches
    (:data:`OFFLINE`) are set in this process first. Were they imported before, the switches
    come too late for them, so every call that reads a file also says ``local_files_only``."""
    os.environ.update(OFFLINE)
    return require(module, purpose, install)

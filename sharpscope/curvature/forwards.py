"""The modules' own ``forward`` while a curvature figure is computed: accelerate (and so the
Hugging Face ``Trainer``) replaces a model's ``forward`` under mixed precision with one that runs
in bf16 or fp16 autocast, keeping the original as ``_original_forward``, and leaves it so after
training; an ``autocast(enabled=False)`` around the call does not undo it, so the Hessian's
products would run in that precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def own_forwards(model: nn.Module) -> Iterator[None]:
    """Each module of ``model`` whose ``forward`` accelerate patched runs its own (its
    ``_original_forward``) for the body, the patched one again afterwards.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> model._original_forward, model.forward = model.forward, print
        >>> with own_forwards(model):
        ...     model.forward == model._original_forward
        True
        >>> model.forward is print
        True
    """
    patched = [
        (m, m.__dict__["forward"])
        for m in model.modules()
        if "forward" in m.__dict__ and "_original_forward" in m.__dict__
    ]
    try:
        for module, _ in patched:
            module.forward = module.__dict__["_original_forward"]
        yield
    finally:
        for module, forward in patched:
            module.forward = forward

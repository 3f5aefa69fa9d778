"""A model's own ``forward`` while sharpscope differentiates it inside a ``transformers.Trainer``:
under mixed precision accelerate replaces ``forward`` with one that runs in autocast (bf16 or
fp16), which an ``autocast(enabled=False)`` around the call does not undo, so Hessian products
would run in that precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def own_forward(model: nn.Module) -> Iterator[None]:
    """``model``'s unpatched ``forward`` for the body, when accelerate has patched it (its
    ``_original_forward``); the patched one again afterwards."""
    patched = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")
    if patched is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = patched

"""Hugging Face activation (gradient) checkpointing under curvature products: non-reentrant, so
double backward still runs through it, and on in eval mode, where Hugging Face turns it off."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from sharpscope.errors import InputError

_STATE = ("gradient_checkpointing", "_gradient_checkpointing_func", "training")
"""What :func:`checkpointed` sets on a module, and restores."""


def _checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of a Hugging Face model that can checkpoint (a ``gradient_checkpointing``
    flag); an :class:`InputError` naming the setting when it has none."""
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if not getattr(model, "supports_gradient_checkpointing", False) or not layers:
        raise InputError(
            f"`gradient_checkpointing` needs a Hugging Face model that supports it, not a "
            f"{type(model).__name__}; leave `gradient_checkpointing` off"
        )
    return layers


@contextlib.contextmanager
def checkpointed(model: nn.Module) -> Iterator[None]:
    """Checkpoint a Hugging Face model's layers while inside: each layer keeps its inputs only
    and recomputes its activations in the backward pass (``torch.utils.checkpoint`` with
    ``use_reentrant=False``, which double backward and forward-mode AD pass through). The
    layers that checkpoint (those Hugging Face wraps, which checkpoint only in training mode)
    are put in training mode; their submodules (dropout) keep theirs. The model config's
    ``use_cache`` is off while inside (no key-value cache is built). Every flag set comes back
    afterwards, the model's own checkpointing included.

    Raises:
        InputError: The model is not a Hugging Face model that supports checkpointing.
    """
    layers = _checkpointing_layers(model)
    saved = [(m, {k: m.__dict__[k] for k in _STATE if k in m.__dict__}) for m in layers]
    func = functools.partial(checkpoint, use_reentrant=False)
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    try:
        if cache is not None:
            config.use_cache = False  # a key-value cache is no use here, and HF warns of it
        for m in layers:
            m.gradient_checkpointing = True
            m._gradient_checkpointing_func = func
            if _wraps_forward(m):
                m.training = True
        yield
    finally:
        if cache is not None:
            config.use_cache = cache
        for m, state in saved:
            for key in _STATE:
                if key in state:
                    setattr(m, key, state[key])
                elif key in m.__dict__:
                    delattr(m, key)


def _wraps_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose forward Hugging Face checkpoints itself (a
    ``GradientCheckpointingLayer``), rather than a model that only holds the flag."""
    return any(c.__name__ == "GradientCheckpointingLayer" for c in type(module).__mro__)

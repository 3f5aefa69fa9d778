"""Keeping BatchNorm running statistics unchanged by a forward pass: SAM's second pass, and the
Hessian on batch statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` (1d, 2d, 3d, lazy and synced ones)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def freeze_batchnorm_stats(model: nn.Module) -> Callable[[], None]:
    """Stop every BatchNorm layer of ``model`` from updating its running statistics (and
    ``num_batches_tracked``); return the function that undoes it.

    Each layer's ``track_running_stats`` is switched off: in training mode it still normalises
    with the batch's statistics, in eval mode with its running ones, so outputs are unchanged.
    No buffer is copied or written, so autograd graphs holding them stay valid.
    """
    layers = [(m, m.track_running_stats) for m in batchnorm_layers(model)]
    for m, _ in layers:
        m.track_running_stats = False

    def restore() -> None:
        for m, flag in layers:
            m.track_running_stats = flag

    return restore


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, no BatchNorm layer of ``model`` updates its running statistics."""
    restore = freeze_batchnorm_stats(model)
    try:
        yield
    finally:
        restore()

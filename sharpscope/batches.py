"""Batches of ``(inputs, targets)`` as every layer handles them: the loss on one, moving one to
a device, counting its samples and its correct class predictions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, targets)``: the mean loss of a batch, a scalar tensor."""


def move_to(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors (also nested in tuples, lists, dicts) to a device; cast floats to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else None)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    return obj


def batch_size(batch: tuple[Any, Any]) -> int:
    """Number of samples in an ``(inputs, targets)`` batch: the leading dimension of the targets."""
    targets = batch[1]
    if isinstance(targets, torch.Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    inputs = batch[0]
    while isinstance(inputs, (tuple, list)) and inputs:
        inputs = inputs[0]
    if isinstance(inputs, torch.Tensor) and inputs.ndim > 0:
        return int(inputs.shape[0])
    raise ValueError(
        "cannot tell the number of samples of a batch: expected (inputs, targets) tensors"
    )


def correct_count(outputs: Any, targets: Any) -> tuple[int, int] | None:
    """How many class predictions (argmax over dimension 1) match the labels, and out of how
    many; None unless the targets are integer labels and the outputs score at least two classes
    along dimension 1, shaped like the targets otherwise (regression, soft targets)."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        return None
    if not isinstance(outputs, torch.Tensor) or outputs.ndim < 2 or outputs.shape[1] < 2:
        return None
    predicted = outputs.argmax(dim=1)
    if predicted.shape != targets.shape:
        return None
    hits = predicted == targets.to(predicted.device)
    return int(hits.sum()), hits.numel()

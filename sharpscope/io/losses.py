"""Loss specs: ``cross-entropy`` (``ce``), ``mse``, ``pkg.module:function`` or ``file.py:function``.

Every loss returns the mean over the batch, as the curvature engine requires.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from sharpscope.batches import LossFn
from sharpscope.errors import InputError
from sharpscope.io.user_code import import_object, is_object_spec, one_line


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (N, C, ...) against class indices, or against class
    probabilities shaped like the logits."""
    if targets.is_floating_point() and targets.shape != outputs.shape:
        raise InputError(
            f"cross-entropy needs class labels, but the targets are floats of shape "
            f"{tuple(targets.shape)} against outputs {tuple(outputs.shape)}; for regression "
            "pass `loss` mse"
        )
    return F.cross_entropy(outputs, targets)


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error over samples and outputs (as ``nn.MSELoss``); class labels are compared
    as one-hot vectors as wide as the outputs."""
    if not targets.is_floating_point():
        targets = F.one_hot(targets, int(outputs.shape[1])).movedim(-1, 1).to(outputs.dtype)
    elif targets.shape != outputs.shape:
        if targets.numel() != outputs.numel():
            raise InputError(
                f"mse: targets of shape {tuple(targets.shape)} do not match outputs of shape "
                f"{tuple(outputs.shape)}; give the model one output per target value"
            )
        targets = targets.reshape(outputs.shape)
    return F.mse_loss(outputs, targets)


BUILTIN_LOSSES: dict[str, LossFn] = {
    "cross-entropy": cross_entropy,
    "ce": cross_entropy,
    "mse": mse,
}
LOSS_CHOICES = "cross-entropy (or ce), mse, or pkg.module:function / path/to/file.py:function"


def resolve_loss(spec: str = "cross-entropy", num_classes: int | None = None) -> LossFn:
    """The mean-reduced loss ``(outputs, targets) -> scalar`` a loss spec names. With the data's
    ``num_classes``, a built-in loss refuses outputs narrower than the classes with a clear error
    (torch's own is an index error, a device-side assert on CUDA)."""
    key = spec.strip().lower().replace("_", "-")
    if key in BUILTIN_LOSSES:
        loss = BUILTIN_LOSSES[key]
        return loss if num_classes is None else partial(_class_checked, loss, num_classes)
    if is_object_spec(spec):
        return _user_loss(spec)
    raise InputError(f"unknown loss {spec!r}; pass {LOSS_CHOICES}")


def _class_checked(loss: LossFn, num_classes: int, outputs: Tensor, targets: Tensor) -> Tensor:
    width = int(outputs.shape[1]) if outputs.ndim >= 2 else 1
    if width < num_classes:
        raise InputError(
            f"the labels go up to {num_classes - 1} but the model has {width} output"
            f"{'s' if width != 1 else ''}; use a model with {num_classes} outputs"
        )
    return loss(outputs, targets)


def _user_loss(spec: str) -> LossFn:
    """A user's loss function, or a loss class (e.g. ``torch.nn:SmoothL1Loss``) made with no
    arguments; its result is checked to be a scalar."""
    loss: Any = import_object(spec, "`loss`")
    if isinstance(loss, type):
        try:
            loss = loss()
        except Exception as exc:
            raise InputError(
                f"`loss` {spec}: making {loss.__name__}() failed ({one_line(exc)}); name a "
                "function or a class that needs no arguments"
            ) from exc
    if not callable(loss):
        raise InputError(
            f"`loss` {spec} is a {type(loss).__name__}, not a function; name a function "
            "(outputs, targets) -> mean loss"
        )

    def checked(outputs: Tensor, targets: Tensor) -> Tensor:
        try:
            value = loss(outputs, targets)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"`loss` {spec} raised {one_line(exc)}; fix the function") from exc
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InputError(
                f"`loss` {spec} returned {shape}, not a scalar tensor; it must return the mean "
                "loss of the batch (reduction='mean')"
            )
        return value.reshape(())

    return checked

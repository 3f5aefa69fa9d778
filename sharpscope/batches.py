"""Batches of ``(inputs, targets)`` as every layer handles them: the loss on one, moving one to
a device, counting its samples and its correct class predictions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from sharpscope.structures import leaves, map_tensors

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, targets)``: the mean loss of a batch, a scalar tensor."""


@runtime_checkable
class CountedLoss(Protocol):
    """A loss whose batch mean is over its own units (predicted tokens, labelled positions),
    which ``count`` tells from the targets; other losses average over samples."""

    def __call__(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor: ...

    def count(self, targets: torch.Tensor) -> int: ...


Draw = Callable[[tuple[int, ...]], torch.Tensor]
"""``draw(shape)``: uniform numbers in (0, 1) of shape ``(samples, *shape)``, each sample's own
(the same for the same sample however the data is batched)."""


@runtime_checkable
class LikelihoodLoss(Protocol):
    """A loss on the logits of a model's outputs that is the mean of per-term negative
    log-likelihoods: which dimensions of the logits one term spans, and targets drawn from the
    model's predictive distribution (the Fisher's)."""

    def __call__(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor: ...

    def term_dims(self, logits: torch.Tensor) -> tuple[int, ...]: ...

    def sample_targets(
        self, logits: torch.Tensor, targets: torch.Tensor, draw: Draw
    ) -> torch.Tensor: ...


def loss_weight(loss_fn: LossFn, batch: tuple[Any, Any]) -> int:
    """How many terms ``loss_fn``'s mean over ``batch`` averages: the counted loss's units, else
    the batch's samples. Weighting batch means by it gives the mean over all the data."""
    if isinstance(loss_fn, CountedLoss):
        return loss_fn.count(batch[1])
    return batch_size(batch)


def logits_of(outputs: Any) -> Any:
    """The prediction tensor of a model's outputs: the tensor itself, the ``logits`` of a
    Hugging Face ``ModelOutput`` or a dict, or the first entry of a tuple; None when there is
    none."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
        return logits if isinstance(logits, torch.Tensor) else None
    if isinstance(outputs, (tuple, list)) and outputs:
        return logits_of(outputs[0])
    return None


def move_to(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors (also nested in tuples, lists and any mapping: a dict, a tokenizer's
    ``BatchEncoding``) to a device; cast floats to ``dtype``."""
    return map_tensors(
        lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None), obj
    )


def batch_size(batch: tuple[Any, Any]) -> int:
    """Number of samples in an ``(inputs, targets)`` batch: the leading dimension of the targets."""
    targets = batch[1]
    if isinstance(targets, torch.Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    named = leaves(batch[0])
    if named and named[0][1].ndim > 0:
        return int(named[0][1].shape[0])
    raise ValueError(
        "cannot tell the number of samples of a batch: expected (inputs, targets) tensors"
    )


def correct_count(outputs: Any, targets: Any) -> tuple[int, int] | None:
    """How many class predictions (argmax over dimension 1 of the outputs' logits) match the
    labels, and out of how many; None unless the targets are integer labels and the outputs
    score at least two classes along dimension 1, shaped like the targets otherwise (regression,
    soft targets)."""
    outputs = logits_of(outputs)
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        return None
    if not isinstance(outputs, torch.Tensor) or outputs.ndim < 2 or outputs.shape[1] < 2:
        return None
    predicted = outputs.argmax(dim=1)
    if predicted.shape != targets.shape:
        return None
    hits = predicted == targets.to(predicted.device)
    return int(hits.sum()), hits.numel()

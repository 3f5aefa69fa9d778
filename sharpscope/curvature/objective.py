"""The problem a curvature matrix describes, declared once and shared by every operator: the
model, its loss, the data and its weighting, the parameters, the BatchNorm mode, the ranks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from sharpscope.batches import LossFn
from sharpscope.choices import REDUCTIONS
from sharpscope.errors import InputError


class ObjectiveSettings(Protocol):
    """What a command's settings say of the objective: the parameters, BatchNorm, reduction."""

    params: Sequence[str] | str | None
    exclude: Sequence[str] | str | None
    batch_stats: bool
    reduction: str


@dataclass(frozen=True, eq=False)
class Objective:
    """The loss whose curvature an operator is: ``loss_fn(model(inputs), targets)`` over all of
    ``batches``, in the parameters ``params`` select, as
    :class:`~sharpscope.curvature.operator.CurvatureOperator` describes.

    Args:
        model: The network; its parameters are read in place, never copied.
        loss_fn: ``loss_fn(outputs, targets)``: a batch's loss, reduced as ``reduction`` says.
        batches: ``(inputs, targets)`` pairs (any iterable; kept as a tuple). Inputs may be
            tensors, tuples or mappings (``input_style`` says how a mapping reaches the model).
        params: Globs of parameter names to take the curvature over (None: all that require grad:
            a PEFT model's adapter).
        exclude: Globs of parameter names to leave out of ``params``' selection.
        batch_stats: BatchNorm normalises with each batch's statistics instead of its running
            ones (which stay untouched).
        reduction: ``mean`` (the loss is each batch's mean) or ``sum`` (its sum).
        input_style: ``auto``, ``kwargs`` or ``single``: a mapping input as keyword arguments or
            as one argument (:func:`~sharpscope.structures.input_style`).
        distributed: Each rank holds its own shard of the batches and the operator is that of
            all of them (None: when a torch.distributed process group is initialised).
        total_terms: With ``reduction`` sum, the terms of the data the sum stands for (None: the
            batches' own); a shard's operator scales its sum to all the data.
        micro_batch: Run each batch in chunks of at most this many samples, weighted so that
            the loss and every matrix stay those of the whole batch (None: whole batches).
        checkpointing: Hugging Face activation checkpointing (non-reentrant) in every forward
            (:func:`~sharpscope.curvature.checkpointing.checkpointed`).

    Raises:
        InputError: ``reduction`` is neither mean nor sum, ``micro_batch`` is below 1, or
            ``model`` holds a PEFT adapter loaded for inference (frozen, so nothing to
            differentiate).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> objective = Objective(model, torch.nn.functional.cross_entropy, data, params="weight")
        >>> objective.replace(batch_stats=True).batch_stats
        True
    """

    model: nn.Module
    loss_fn: LossFn
    batches: Iterable[tuple[Any, Any]]
    params: Sequence[str] | str | None = None
    exclude: Sequence[str] | str | None = None
    batch_stats: bool = False
    reduction: str = "mean"
    input_style: str = "auto"
    distributed: bool | None = None
    total_terms: int | None = None
    micro_batch: int | None = None
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise InputError(f"unknown `reduction` {self.reduction!r}; choose one of mean, sum")
        if _frozen_adapter(self.model):
            raise InputError(
                "the model's PEFT adapter is frozen (`PeftModel.from_pretrained` loads adapters "
                "for inference) and nothing else requires grad, so there are no parameters to "
                "take the curvature over: load it with `is_trainable=True`"
            )
        if self.micro_batch is not None and self.micro_batch < 1:
            raise InputError(f"`micro_batch` must be at least 1, got {self.micro_batch}")
        object.__setattr__(self, "batches", tuple(self.batches))

    def replace(self, **changes: Any) -> Objective:
        """This objective with the fields ``changes`` names set to other values.

        Args:
            **changes: Field names and their new values.

        Returns:
            A new :class:`Objective`; this one is unchanged.

        Examples:
            >>> import torch
            >>> objective = Objective(torch.nn.Linear(2, 1), torch.nn.functional.mse_loss, [])
            >>> objective.replace(reduction="sum").reduction
            'sum'
        """
        return dataclasses.replace(self, **changes)


def _frozen_adapter(model: nn.Module) -> bool:
    """Whether ``model`` holds a PEFT adapter (``peft_config``) and no parameter requires grad."""
    return hasattr(model, "peft_config") and not any(p.requires_grad for p in model.parameters())


def configured_objective(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    settings: ObjectiveSettings,
) -> Objective:
    """The objective of ``model``, ``loss_fn`` and ``batches`` over the parameters, in the
    BatchNorm mode and with the reduction that ``settings`` (a command's config) give, and with
    its memory levers (``micro_batch``, ``gradient_checkpointing``) where it has them.

    Args:
        model: The network.
        loss_fn: ``loss_fn(outputs, targets)``, a batch's loss.
        batches: The ``(inputs, targets)`` pairs.
        settings: Any object with ``params``, ``exclude``, ``batch_stats`` and ``reduction``.

    Returns:
        The :class:`Objective`.
    """
    return Objective(
        model,
        loss_fn,
        batches,
        settings.params,
        exclude=settings.exclude,
        batch_stats=settings.batch_stats,
        reduction=settings.reduction,
        micro_batch=getattr(settings, "micro_batch", None),
        checkpointing=getattr(settings, "gradient_checkpointing", False),
    )

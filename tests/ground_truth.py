"""Dense float64 Hessians of small models: the ground truth the engine is checked against (the
problems themselves are conftest.py's fixtures)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from sharpscope.curvature import BACKENDS, select_params
from sharpscope.curvature.attention import twice_differentiable

EXACT_BACKENDS = tuple(b for b in BACKENDS if b != "finite-difference")
"""The backends exact to rounding (finite differences are checked at their own tolerance in
tests/curvature/test_finite_difference.py)."""


@dataclass
class Problem:
    """A model, its loss and data, and the dense Hessian of the mean loss over all the data."""

    name: str
    model: nn.Module
    loss_fn: Any
    inputs: torch.Tensor
    targets: torch.Tensor
    hessian: torch.Tensor

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.inputs, self.targets)]

    def split(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same data as batches of at most ``size`` samples."""
        return list(zip(self.inputs.split(size), self.targets.split(size), strict=True))


def dense_hessian(model: nn.Module, loss_fn: Any, inputs: Any, targets: Any) -> torch.Tensor:
    """The Hessian of ``loss_fn(model(inputs), targets)`` (``inputs`` a tensor, or a mapping of
    keyword inputs) over the model's trainable parameters, in flat-vector order, in eval mode:
    autograd double backward, row by row, under torch's math attention kernel. Never
    ``torch.func.hessian``: its second derivatives are wrong through attention, LayerNorm and
    batch-statistics BatchNorm on this torch (tests/curvature/test_attention.py, test_hvp.py)."""
    space = select_params(model)
    flat = torch.cat([p.detach().reshape(-1) for p in space.params])
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, space.unflatten(w), args, kwargs), targets)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with twice_differentiable():
            return torch.autograd.functional.hessian(loss_of, flat)
    finally:
        for module, training in modes:
            module.training = training


def batches_hessian(model: nn.Module, loss_fn: Any, batches: list[tuple[Any, Any]]) -> torch.Tensor:
    """:func:`dense_hessian` of a mean loss over ``batches`` of tensors taken as one batch."""
    inputs, targets = (torch.cat(parts) for parts in zip(*batches, strict=True))
    return dense_hessian(model, loss_fn, inputs, targets)


class Shared(nn.Module):
    """A frozen embedding layer, then one linear layer applied twice (a shared parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 6)
        self.frozen.requires_grad_(False)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.frozen(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(h)

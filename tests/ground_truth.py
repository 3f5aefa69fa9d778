"""Dense float64 Hessians of small models: the ground truth the engine is checked against (the
problems themselves are conftest.py's fixtures)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, hessian

from sharpscope.curvature import BACKENDS, curvature_mode, select_params

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


def dense_hessian(
    model: nn.Module, loss_fn: Any, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The Hessian over the model's trainable parameters by ``torch.func.hessian`` (eval mode)."""
    space = select_params(model)
    flat = torch.cat([p.detach().reshape(-1) for p in space.params])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, space.unflatten(w), (inputs,)), targets)

    with curvature_mode(model):
        return hessian(loss_of)(flat)


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

"""A plain minibatch training loop, for built-in examples and tests."""

from __future__ import annotations

import torch
from torch import nn


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-2,
    seed: int = 0,
) -> list[float]:
    """Train with Adam on cross-entropy over shuffled minibatches; return each step's loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    order = torch.randperm(len(targets), generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(targets), generator=generator), 0
        index = order[position : position + batch_size]
        position += batch_size
        loss = nn.functional.cross_entropy(model(inputs[index]), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses

"""Plain model metrics on a list of batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sharpscope import distributed
from sharpscope.batches import correct_count, move_to
from sharpscope.curvature import curvature_mode
from sharpscope.structures import call_model


def accuracy(
    model: nn.Module,
    batches: list[tuple[Any, Any]],
    dtype: torch.dtype,
    device: torch.device,
    batch_stats: bool = False,
    across_ranks: bool = False,
    rounds: int = 0,
) -> float | None:
    """Top-1 accuracy over all batches, or None when the targets are not class labels (see
    :func:`~sharpscope.batches.correct_count`); with ``across_ranks``, over all ranks' batches
    (their counts are all-reduced). A model sharded over the ranks gathers its parameters in every
    forward: ``rounds`` forwards are run in all (the first batch again, uncounted, at the end)."""
    correct = total = 0
    with torch.no_grad(), curvature_mode(model, batch_stats):
        for inputs, targets in batches:
            hits = correct_count(call_model(model, move_to(inputs, device, dtype)), targets)
            if hits is None:
                return None
            correct += hits[0]
            total += hits[1]
        for _ in range(rounds - len(batches)):
            call_model(model, move_to(batches[0][0], device, dtype))
    if across_ranks:
        counts = torch.tensor([correct, total], dtype=torch.int64, device=device)
        correct, total = distributed.all_reduce_sum(counts).tolist()
    return correct / total if total else None

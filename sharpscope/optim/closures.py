"""The closure of a step over micro-batches (gradient accumulation), for SAM's two passes or any
optimizer's ``step(closure)``, with an optional ``torch.amp.GradScaler``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.amp import GradScaler

from sharpscope.optim.sam import Closure


def micro_batch_closure(
    loss_of: Callable[[Any], torch.Tensor],
    micro_batches: Sequence[Any],
    *,
    scaler: GradScaler | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    backward: Callable[[torch.Tensor], Any] | None = None,
) -> Closure:
    """A closure that backpropagates ``loss_of(b) / n`` for each of the ``n`` micro-batches (their
    mean loss: equal-sized micro-batches give one batch of them all), through ``scaler.scale``
    when given, and returns the mean loss, detached. ``loss_of`` runs the forward pass (under
    autocast if wanted). ``no_sync`` (e.g. a DDP model's ``no_sync``) wraps all micro-batches but
    the last, so the gradients are averaged over the ranks once per pass. ``backward(loss)``
    replaces ``loss.backward()`` (e.g. Lightning's ``manual_backward``)."""
    if not micro_batches:
        raise ValueError("micro_batches is empty: a step needs at least one micro-batch")
    count = len(micro_batches)

    def closure() -> torch.Tensor:
        losses = []
        for i, batch in enumerate(micro_batches):
            last = i == count - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss = loss_of(batch) / count
                scaled = scaler.scale(loss) if scaler is not None else loss
                if backward is None:
                    scaled.backward()
                else:
                    backward(scaled)
            losses.append(loss.detach())
        return torch.stack(losses).sum()

    return closure

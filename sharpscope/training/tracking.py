"""What a run records at its tracking steps: sharpness and alignment on a fixed probe batch, and
loss and accuracy on the probe and validation data."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sharpscope import distributed
from sharpscope.batches import LossFn, correct_count, loss_weight
from sharpscope.curvature import HessianOperator, curvature_mode, lanczos
from sharpscope.curvature.vectors import abs_cosine
from sharpscope.structures import call_model

Batch = tuple[Any, Any]
TRACK_TOL = 1e-3
"""Relative residual at which the tracked λ_max counts as converged."""


def evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]
) -> tuple[float, float | None]:
    """Mean loss (batches weighted by :func:`~sharpscope.batches.loss_weight`) and accuracy
    (None for regression) over ``batches``, in eval mode; the model's modes are restored. Under
    torch.distributed, over all ranks' batches."""
    loss_sum, samples, correct, counted = 0.0, 0, 0, 0
    with torch.no_grad(), curvature_mode(model):
        for inputs, targets in batches:
            outputs = call_model(model, inputs)
            n = loss_weight(loss_fn, (inputs, targets))
            loss_sum += float(loss_fn(outputs, targets)) * n
            samples += n
            hits = correct_count(outputs, targets)
            if hits is not None:
                correct += hits[0]
                counted += hits[1]
    loss_sum, samples, correct, counted = distributed.sum_floats(
        [loss_sum, samples, correct, counted]
    )
    return loss_sum / samples, (correct / counted if counted else None)


@dataclass
class Tracker:
    """Measures a model at a tracking step without touching the training's random streams.

    λ_max is the top Hessian eigenvalue of the loss on the ``probe`` batches (the same samples at
    every step, so curves are comparable across runs and optimizers), by Lanczos with at most
    ``max_iter`` products from a vector seeded by ``seed``; ``alignment`` is |cos(ĝ, v₁)| with ĝ
    the probe gradient. Both in eval mode, as ``sharpscope analyze`` measures them. Under
    torch.distributed each rank holds its share of ``probe`` and ``val``, and every figure is
    that of all ranks' data together.
    """

    loss_fn: LossFn
    probe: list[Batch]
    val: list[Batch] | None
    seed: int
    max_iter: int

    def __call__(self, model: nn.Module) -> dict[str, float | None]:
        """The figures of ``model`` now: λ_max, its residual, alignment, probe and val metrics."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            op = HessianOperator(model, self.loss_fn, self.probe)
            top = lanczos(
                op, k=1, which="largest", tol=TRACK_TOL, max_iter=self.max_iter, seed=self.seed
            )
            alignment = abs_cosine(op.gradient(), top.eigenvectors[0])
            op.release()
            probe_loss, probe_accuracy = evaluate(model, self.loss_fn, self.probe)
            val_loss, val_accuracy = (
                evaluate(model, self.loss_fn, self.val) if self.val else (None, None)
            )
        return {
            "lambda_max": float(top.eigenvalues[0]),
            "lambda_residual": float(top.residuals[0]),
            "alignment": alignment,
            "probe_loss": probe_loss,
            "probe_accuracy": probe_accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "track_seconds": time.perf_counter() - start,
        }

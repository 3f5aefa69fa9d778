"""The optimizers and learning-rate schedules a fine-tuning run can use."""

from __future__ import annotations

import math
from typing import Any, Protocol

from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from sharpscope.batches import LossFn
from sharpscope.curvature.hvp import Backend
from sharpscope.optim import ASAM, SAM, EigenEstimate, EigenSAM
from sharpscope.training.options import SCHEDULES, OptimizerSettings


class StepHook(Protocol):
    """What the training loop does and reads besides ``optimizer.step``: ``refresh(inputs,
    targets)`` once per step, after the pass at w and before the perturbation, and the figures
    of the last step. Eigen-SAM is its own hook; the other optimizers have :class:`NoHook`."""

    @property
    def alignment(self) -> float | None:
        """|cos(ĝ, v)| of the last step, None without an eigenvector."""

    @property
    def estimate(self) -> EigenEstimate | None:
        """The latest eigenvector refresh, None before the first."""

    def refresh(self, inputs: Any, targets: Any) -> object:
        """Re-estimate the eigenvector on this step's batch when due."""


class NoHook:
    """The hook of an optimizer without an eigenvector: nothing to refresh or report."""

    alignment: float | None = None
    estimate: EigenEstimate | None = None

    def refresh(self, inputs: Any, targets: Any) -> None:
        """Nothing to refresh."""


Built = tuple[Optimizer, StepHook]
"""An optimizer and its hook for the training loop."""


def build_optimizer(
    model: nn.Module, loss_fn: LossFn, s: OptimizerSettings, backend: Backend = "double-backward"
) -> Built:
    """The optimizer ``s`` describes, over the model's trainable parameters, and its hook;
    Eigen-SAM's Hessian products are taken by ``backend``."""
    params = [p for p in model.parameters() if p.requires_grad]
    base = SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return base, NoHook()
    if s.optimizer == "sam":
        return SAM(base, s.rho, model=model), NoHook()
    if s.optimizer == "asam":
        return ASAM(base, s.rho, model=model), NoHook()
    assert s.optimizer == "eigen-sam", f"not one of OPTIMIZERS: {s.optimizer!r}"
    eigen = EigenSAM(
        base,
        s.rho,
        s.alpha,
        model=model,
        loss_fn=loss_fn,
        eig_every=s.eig_every,
        eig_steps=s.eig_steps,
        seed=s.seed,
        backend=backend,
    )
    return eigen, eigen


def build_scheduler(optimizer: Optimizer, schedule: str, total_steps: int) -> LambdaLR:
    """A per-step schedule: ``constant``, or ``cosine`` from the base rate to 0 at
    ``total_steps``. Its state (the step count) is a torch scheduler's; the curve is rebuilt
    from ``schedule`` and ``total_steps``, so a resumed run may extend ``total_steps``."""
    assert schedule in SCHEDULES, f"not one of SCHEDULES: {schedule!r}"

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return LambdaLR(optimizer, factor)

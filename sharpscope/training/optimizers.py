"""The optimizers and learning-rate schedules a fine-tuning run can use."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from sharpscope.batches import LossFn
from sharpscope.optim import ASAM, SAM, EigenSAM

OPTIMIZERS: tuple[str, ...] = ("sgd", "sam", "asam", "eigen-sam")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
DEFAULT_RHO: dict[str, float] = {"sgd": 0.0, "sam": 0.05, "asam": 0.5, "eigen-sam": 0.05}
"""ρ when none is given: SAM's and Eigen-SAM's usual 0.05, ASAM's 0.5 (about 10× larger)."""


@dataclass(frozen=True)
class OptimizerSettings:
    """SGD with momentum and weight decay, optionally wrapped by SAM, ASAM or Eigen-SAM."""

    name: str
    lr: float
    momentum: float
    weight_decay: float
    rho: float
    alpha: float
    eig_every: int
    eig_steps: int
    seed: int


def build_optimizer(model: nn.Module, loss_fn: LossFn, s: OptimizerSettings) -> Optimizer:
    """The optimizer ``s`` describes, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    base = SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.name == "sgd":
        return base
    if s.name == "sam":
        return SAM(base, s.rho, model=model)
    if s.name == "asam":
        return ASAM(base, s.rho, model=model)
    if s.name == "eigen-sam":
        return EigenSAM(
            base,
            s.rho,
            s.alpha,
            model=model,
            loss_fn=loss_fn,
            eig_every=s.eig_every,
            eig_steps=s.eig_steps,
            seed=s.seed,
        )
    raise ValueError(f"unknown optimizer {s.name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_scheduler(optimizer: Optimizer, schedule: str, total_steps: int) -> LambdaLR:
    """A per-step schedule: ``constant``, or ``cosine`` from the base rate to 0 at
    ``total_steps``. Its state (the step count) is a torch scheduler's; the curve is rebuilt
    from ``schedule`` and ``total_steps``, so a resumed run may extend ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return LambdaLR(optimizer, factor)

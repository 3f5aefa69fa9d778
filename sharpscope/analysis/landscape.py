"""Loss-landscape slices: the loss on a line and on a plane through the weights, along the top
Hessian eigenvectors or along filter-normalised random directions (Li et al. 2018).

Under torch.distributed every rank holds all of the data and evaluates its contiguous block of
the points (:func:`sharpscope.distributed.block`) on all of it; the losses are then gathered in
rank order. Each point's loss is computed exactly as one process computes it, so the grid is
bit-identical to one process's given the same directions (the eigenvectors' Lanczos shards the
data and all-reduces its products, as ``analyze`` does: equal to rounding).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sharpscope import distributed
from sharpscope.analysis.landscape_config import Kind, LandscapeConfig
from sharpscope.batches import LossFn
from sharpscope.curvature import (
    HessianOperator,
    ParamSpace,
    Progress,
    SolveSettings,
    lanczos,
)
from sharpscope.curvature.objective import configured_objective
from sharpscope.curvature.operator import check_adds_to_a_run
from sharpscope.curvature.vectors import random_vectors

FILTER_EPS = 1e-10
"""Added to a random filter's norm before rescaling it (tomgoldstein/loss-landscape's guard)."""


@dataclass
class Directions:
    """The two directions d₁, d₂ (flat, over the selected parameters) and where they came from."""

    kind: Kind
    vectors: torch.Tensor
    """Rows d₁ and d₂."""
    eigenvalues: list[float] | None = None
    residuals: list[float] | None = None
    """For eigen directions: λ₁, λ₂ and ‖Hv − λv‖ of each (Lanczos's, verified)."""
    n_products: int = 0


@dataclass
class Landscape:
    """The loss at w + a·d₁ + b·d₂ on a line (b = 0) and on a square grid."""

    config: LandscapeConfig
    directions: Directions
    param_names: tuple[str, ...]
    num_params: int
    num_samples: int
    centre_loss: float
    line_steps: list[float]
    line: list[float]
    """The loss at w + t·d₁ for each t of ``line_steps``."""
    grid_steps: list[float]
    surface: list[list[float]]
    """``surface[i][j]``: the loss at w + grid_steps[i]·d₁ + grid_steps[j]·d₂."""
    evaluations: int
    """Loss evaluations over all the data (the centre, the line and the grid), all ranks."""
    seconds: float
    """Wall time of the evaluations."""


def filter_normalized(space: ParamSpace, generator: torch.Generator) -> torch.Tensor:
    """A random flat direction in which each filter (a weight's slice along its first dimension:
    a convolution's output channel, a linear layer's neuron) has that filter's norm in the
    weights; one-dimensional parameters (biases, normalisation layers) get zero, as
    tomgoldstein/loss-landscape's ``--xignore biasbn``."""
    raw = random_vectors(1, space.size, torch.empty(0, dtype=torch.float64), generator)[0]
    parts = []
    for d, w in zip(space.split(raw), space.params, strict=True):
        if w.ndim <= 1:
            parts.append(torch.zeros_like(d))
            continue
        rows = d.reshape(d.shape[0], -1)
        norms = w.detach().to(device="cpu", dtype=torch.float64).reshape(w.shape[0], -1).norm(dim=1)
        parts.append(rows * (norms / (rows.norm(dim=1) + FILTER_EPS)).unsqueeze(1))
    return torch.cat([p.reshape(-1) for p in parts]).to(device=space.device, dtype=space.dtype)


def random_directions(space: ParamSpace, seed: int) -> Directions:
    """Two filter-normalised random directions from one CPU generator seeded with ``seed`` (the
    same on every device and rank)."""
    generator = torch.Generator().manual_seed(seed)
    first = filter_normalized(space, generator)
    return Directions("random", torch.stack([first, filter_normalized(space, generator)]))


def eigen_directions(
    op: HessianOperator, config: LandscapeConfig, progress: Progress | None
) -> Directions:
    """The top two Hessian eigenvectors (unit vectors) by Lanczos."""
    settings = SolveSettings(tol=config.tol, max_iter=config.max_iter, seed=config.seed)
    top = lanczos(op, 2, settings=settings, progress=progress)
    return Directions(
        "eigen",
        top.eigenvectors,
        eigenvalues=top.eigenvalues.tolist(),
        residuals=top.residuals.tolist(),
        n_products=op.n_products,
    )


def landscape(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[tuple[Any, Any]],
    config: LandscapeConfig | None = None,
    progress: Progress | None = None,
    *,
    checked: bool = False,
) -> Landscape:
    """The loss of ``model`` around its weights along ``config``'s directions, each point the
    mean over all of ``batches`` weighted as the Hessian weights it
    (:func:`~sharpscope.batches.loss_weight`; the total with ``reduction`` sum), in curvature
    mode (eval, or BatchNorm on batch statistics with ``batch_stats``). The weights are restored
    bit for bit after each point.

    Under torch.distributed every rank passes all of the data (see the module's docstring).
    ``progress("landscape", done, total)`` counts this rank's evaluations. ``checked``: the
    first batch already ran through the model and the loss in eval mode (as
    :func:`~sharpscope.cli.loading.load_inputs` runs it), so it is run again only where that
    checks more (see :func:`~sharpscope.analysis.analyze.analyze`).
    """
    config = config or LandscapeConfig()
    objective = configured_objective(model, loss_fn, batches, config)
    validate = not checked or check_adds_to_a_run(objective)
    evaluate = HessianOperator(
        objective.replace(distributed=False), cache_graph=False, validate=validate
    )
    if config.directions == "eigen":
        mine = [batches[i] for i in distributed.shard(len(batches))]
        # the same objective on this rank's share: checked once, by ``evaluate``
        hessian = HessianOperator(
            objective.replace(batches=mine), cache_graph=False, validate=False
        )
        directions = eigen_directions(hessian, config, progress)
    else:
        directions = random_directions(evaluate.space, config.seed)
    line_steps = _steps(config.span, config.points)
    grid_steps = _steps(config.span, config.grid)
    points = [(0.0, 0.0), *((t, 0.0) for t in line_steps)]
    points += [(a, b) for a in grid_steps for b in grid_steps]
    start = time.perf_counter()
    losses = _losses(evaluate, directions.vectors, points, progress)
    seconds = time.perf_counter() - start
    n, m = config.points, config.grid
    surface = [losses[1 + n + i * m : 1 + n + (i + 1) * m] for i in range(m)]
    return Landscape(
        config=config,
        directions=directions,
        param_names=evaluate.space.names,
        num_params=evaluate.size,
        num_samples=evaluate.num_samples,
        centre_loss=losses[0],
        line_steps=line_steps,
        line=losses[1 : 1 + n],
        grid_steps=grid_steps,
        surface=surface,
        evaluations=len(points),
        seconds=seconds,
    )


def _steps(span: float, count: int) -> list[float]:
    """``count`` evenly spaced values in [−span, span], the middle one exactly 0."""
    half = count // 2
    return [span * i / half for i in range(-half, half + 1)]


def _losses(
    op: HessianOperator,
    vectors: torch.Tensor,
    points: list[tuple[float, float]],
    progress: Progress | None,
) -> list[float]:
    """The loss at w + a·d₁ + b·d₂ for each ``(a, b)``: this rank's block of the points, then
    every rank's in rank order (the origin is evaluated unshifted)."""
    mine = distributed.block(len(points))
    local = []
    for done, i in enumerate(mine, start=1):
        a, b = points[i]
        delta = None if a == b == 0 else a * vectors[0] + b * vectors[1]
        local.append(op.loss(delta))
        if progress is not None:
            progress("landscape", done, len(mine))
    return [loss for block in distributed.all_gather(local) for loss in block]

"""Data uncertainty: how much each headline figure would move with another sample of the same
size from the same data, by a grouped jackknife over disjoint shards of the analysed samples.

The samples are cut into ``m`` shards (every batch split into ``m`` chunks, so each shard spans
all batches). Each figure is written as a function of per-shard means of the loss, the gradient
and Rayleigh quotients at the full-data solution; deleting one shard at a time gives ``m``
replicates ``θ₍₋ⱼ₎``, and the jackknife standard error is

    SE² = (m − 1)/m · Σⱼ (θ₍₋ⱼ₎ − θ̄₍.₎)²,

which estimates the figure's spread over samples of the analysed size (docs/engine.md). The
eigenvalues use the shards' Rayleigh quotients ``vᵀHⱼv`` of the full-data eigenvectors, exact to
first order in the data (an eigenvalue's first-order change is ``vᵀ dH v``); the alignment and
the top-k share hold v₁ and the eigenspace fixed; the SAM sharpness holds ε fixed. Each costs
one product (or one gradient, or two losses) spread over the shards: about one full one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sharpscope import distributed
from sharpscope.batches import loss_weight
from sharpscope.curvature import CurvatureOperator
from sharpscope.curvature.vectors import dot
from sharpscope.structures import sample_count, split

T_975 = (12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student's t 97.5 % quantiles for 1 to 10 degrees of freedom (then 2.2 down to 1.96)."""


def t_quantile(dof: int) -> float:
    """The two-sided 95 % multiplier of a standard error with ``dof`` degrees of freedom."""
    if dof <= len(T_975):
        return T_975[dof - 1]
    return 1.96 + 2.4 / dof  # within 0.5 % of the exact quantile beyond 10 degrees of freedom


UNIT = (0.0, 1.0)
"""The range of |cos| and of a share: their intervals are clipped to it."""


def interval(
    value: float, se: float, multiplier: float, bounds: tuple[float, float] | None = None
) -> tuple[float, float]:
    """``value ± multiplier·se``, clipped to the figure's ``bounds`` (a cosine's [0, 1])."""
    low, high = value - multiplier * se, value + multiplier * se
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return low, high


def jackknife_se(replicates: Sequence[float]) -> float:
    """The grouped jackknife standard error of a figure from its delete-one-shard replicates."""
    m = len(replicates)
    mean = sum(replicates) / m
    return math.sqrt((m - 1) / m * sum((r - mean) ** 2 for r in replicates))


def deleted_means(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """``Σᵢ≠ⱼ wᵢ xᵢ / Σᵢ≠ⱼ wᵢ`` for each shard j: the figure's mean without shard j."""
    total = sum(w * x for w, x in zip(weights, values, strict=True))
    return [(total - w * x) / (1 - w) for w, x in zip(weights, values, strict=True)]


@dataclass(frozen=True)
class SamplingErrors:
    """Each figure's jackknife standard error over ``shards`` shards (None: not estimated)."""

    shards: int
    eigenvalues: list[float]
    """One per top-k eigenvalue, λ₁ first."""
    lambda_min: float
    cos_full: float | None = None
    topk_share: float | None = None
    sam_sharpness: float | None = None

    @property
    def multiplier(self) -> float:
        """The 95 % interval's half-width in standard errors (Student's t, m − 1 dof)."""
        return t_quantile(self.shards - 1)


def shard_operators(op: CurvatureOperator, shards: int) -> list[CurvatureOperator]:
    """``op``'s data as at most ``shards`` disjoint operators: every batch cut into ``shards``
    chunks (whole batches, when BatchNorm uses batch statistics), shards empty on every rank
    left out."""
    if op.batch_stats:
        groups = [op.batches[j::shards] for j in range(shards)]
    else:
        groups = [[] for _ in range(shards)]
        for inputs, targets in op.batches:
            size = -(-sample_count(inputs, "batch") // shards)
            for j, (x, y) in enumerate(zip(split(inputs, size), targets.split(size), strict=True)):
                groups[j].append((x, y))
    local = [float(sum(loss_weight(op.loss_fn, b) for b in g)) for g in groups]
    counts = distributed.sum_floats(local) if op.distributed else local  # all ranks agree
    groups = [g for g, count in zip(groups, counts, strict=True) if count > 0]
    return [op.restricted(group, cache_graph=False) for group in groups]


def sampling_errors(
    op: CurvatureOperator,
    shards: int,
    eigenvectors: torch.Tensor,
    min_vector: torch.Tensor,
    gradient: torch.Tensor,
    epsilon: torch.Tensor | None,
) -> SamplingErrors | None:
    """The jackknife standard errors of the top-k eigenvalues (rows of ``eigenvectors``), λ_min
    (of ``min_vector``) and, given the full-data ``gradient`` and the SAM perturbation
    ``epsilon`` (None when the gradient is zero), of the alignment, the top-k share and the SAM
    sharpness. Costs one product per eigenvector, one gradient and two losses, each spread over
    the shards. None when the data makes fewer than two shards."""
    parts = shard_operators(op, shards)
    if len(parts) < 2:
        return None
    weights = [p.num_terms / op.num_terms for p in parts]
    rayleigh = [[dot(v, p.matvec(v)) for p in parts] for v in (*eigenvectors, min_vector)]
    replicates = [deleted_means(q, weights) for q in rayleigh]
    errors = SamplingErrors(
        shards=len(parts),
        eigenvalues=[jackknife_se(r) for r in replicates[:-1]],
        lambda_min=jackknife_se(replicates[-1]),
    )
    if epsilon is None:
        return errors
    cos, share = _gradient_replicates(parts, weights, gradient, eigenvectors)
    sharpness = deleted_means([p.loss(epsilon) - p.loss() for p in parts], weights)
    errors = SamplingErrors(
        shards=errors.shards,
        eigenvalues=errors.eigenvalues,
        lambda_min=errors.lambda_min,
        cos_full=jackknife_se(cos),
        topk_share=jackknife_se(share),
        sam_sharpness=jackknife_se(sharpness),
    )
    return errors


def _gradient_replicates(
    parts: list[CurvatureOperator],
    weights: list[float],
    gradient: torch.Tensor,
    basis: torch.Tensor,
) -> tuple[list[float], list[float]]:
    """Delete-one-shard |cos(ĝ, v₁)| and ‖P_k ĝ‖ with v₁ and the top-k eigenspace (rows of
    ``basis``) fixed. The gradient without shard j is ``(g − wⱼgⱼ)/(1 − wⱼ)``, so each shard's
    gradient is needed only as scalars (its norm, and its dot products with g and the basis)."""
    full = [dot(v, gradient) for v in basis]
    g_squared = dot(gradient, gradient)
    cos, share = [], []
    for w, p in zip(weights, parts, strict=True):
        g = p.gradient()
        squared = (g_squared - 2 * w * dot(gradient, g) + w * w * dot(g, g)) / (1 - w) ** 2
        coeffs = [(c - w * dot(v, g)) / (1 - w) for c, v in zip(full, basis, strict=True)]
        size = math.sqrt(max(squared, 0.0))
        cos.append(abs(coeffs[0]) / size if size > 0 else 0.0)
        share.append(math.sqrt(sum(c * c for c in coeffs)) / size if size > 0 else 0.0)
    return cos, share

"""The paper's diagnostic: how well the SAM perturbation lines up with the top eigenvector."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from sharpscope import distributed
from sharpscope.curvature import CurvatureOperator, HessianOperator
from sharpscope.curvature.vectors import abs_cosine, dot, norm
from sharpscope.optim.perturbations import eigen_sam_perturbation, sam_perturbation

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def subspace_share(u: torch.Tensor, basis: torch.Tensor) -> float:
    """‖P u‖/‖u‖: the share of ``u`` in the span of the orthonormal rows of ``basis``."""
    size = norm(u)
    shares = [dot(row, u) for row in basis]
    return math.sqrt(sum(c * c for c in shares)) / size if size > 0 else 0.0


@dataclass
class Distribution:
    """Summary of a sample of values: count, mean, extremes and quantiles (5, 25, 50, 75, 95 %)."""

    count: int
    mean: float
    min: float
    max: float
    quantiles: dict[str, float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        t = torch.tensor(list(values), dtype=torch.float64)
        qs = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64))
        return cls(
            count=len(t),
            mean=float(t.mean()),
            min=float(t.min()),
            max=float(t.max()),
            quantiles={
                f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)
            },
        )


@dataclass
class Alignment:
    """SAM alignment figures at one point w (see paper.md, "The paper's finding")."""

    rho: float
    alpha: float
    cos_full: float
    """|cos(ĝ, v₁)| for the full-data gradient."""
    cos_batches: Distribution | None
    """|cos(ĝ_b, v₁)| over minibatch gradients (None with a single batch)."""
    topk_share: float
    """‖P_k ĝ‖: the share of ĝ in the span of the top-k eigenvectors."""
    sam_sharpness: float
    """L(w + ρĝ) − L(w), measured."""
    sam_sharpness_quadratic: float
    """½ρ² ĝᵀHĝ, its curvature term."""
    sam_sharpness_taylor: float
    """ρ‖g‖ + ½ρ² ĝᵀHĝ, its second-order Taylor prediction."""
    eigen_sam_cos: float
    """|cos(ε, v₁)| for Eigen-SAM's ε = ρ(ĝ + α s v⊥) at this ``rho`` and ``alpha``."""

    def to_dict(self) -> dict:
        return asdict(self)


def batch_cosines(op: CurvatureOperator, v1: torch.Tensor) -> list[float]:
    """|cos(ĝ_b, v₁)| for the gradient of each of ``op``'s batches on its own; when ``op`` is
    distributed, those of all ranks' batches, in rank order, on every rank."""
    values = []
    for batch in op.batches:
        single = HessianOperator(
            op.model,
            op.loss_fn,
            [batch],
            list(op.space.names),
            batch_stats=op.batch_stats,
            cache_graph=False,
            distributed=False,
        )
        values.append(abs_cosine(single.gradient(), v1))
    if not op.distributed:
        return values
    return [value for rank_values in distributed.all_gather(values) for value in rank_values]


def sam_alignment(
    op: CurvatureOperator,
    eigenvectors: torch.Tensor,
    rho: float,
    alpha: float,
    h_g_hat: torch.Tensor | None = None,
) -> Alignment:
    """All alignment figures for the top eigenvectors (rows, λ₁ first); costs one product (none
    when ``h_g_hat``, the product H·ĝ, is given) and one gradient per batch."""
    g = op.gradient()
    v1 = eigenvectors[0]
    g_hat = g / norm(g)
    curvature = dot(g_hat, op.matvec(g_hat) if h_g_hat is None else h_g_hat)
    base = op.loss()
    eps = sam_perturbation(g, rho)
    eigen_eps = eigen_sam_perturbation(g, v1, rho, alpha)
    cosines = batch_cosines(op, v1) if op.num_batches > 1 else None
    return Alignment(
        rho=rho,
        alpha=alpha,
        cos_full=abs_cosine(g, v1),
        cos_batches=Distribution.of(cosines) if cosines else None,
        topk_share=subspace_share(g, eigenvectors),
        sam_sharpness=op.loss(eps) - base,
        sam_sharpness_quadratic=0.5 * rho**2 * curvature,
        sam_sharpness_taylor=rho * norm(g) + 0.5 * rho**2 * curvature,
        eigen_sam_cos=abs_cosine(eigen_eps, v1),
    )

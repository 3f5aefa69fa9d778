"""The paper's diagnostic: how well the SAM perturbation lines up with the top eigenvector."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from sharpscope import distributed
from sharpscope.batches import batch_size
from sharpscope.curvature import CurvatureOperator
from sharpscope.curvature.shards import over_of, shards_of
from sharpscope.curvature.vectors import Over, abs_cosine, dot, norm
from sharpscope.optim.perturbations import eigen_sam_perturbation, sam_perturbation

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def subspace_share(u: torch.Tensor, basis: torch.Tensor, over: Over | None = None) -> float:
    """‖P u‖/‖u‖: the share of ``u`` in the span of the orthonormal rows of ``basis`` (sharded
    vectors reduced ``over`` their ranks)."""
    size = norm(u, over)
    shares = [dot(row, u, over) for row in basis]
    return math.sqrt(sum(c * c for c in shares)) / size if size > 0 else 0.0


@dataclass
class MinibatchCosines:
    """|cos(ĝ_B, v₁)| of SAM's own perturbation, one minibatch gradient ĝ_B at a time (Luo et al.
    measure it so): the mean over the full minibatches of ``batch_size`` samples, its standard
    error over them (None with fewer than two), the extremes, quantiles and each value, and the
    same mean for Eigen-SAM's ε_B."""

    batch_size: int
    count: int
    mean: float
    std_error: float | None
    min: float
    max: float
    quantiles: dict[str, float]
    values: tuple[float, ...]
    eigen_sam_mean: float
    """The mean over the same minibatches of |cos(ε_B, v₁)|, ε_B = ρ(ĝ_B + α s v⊥)."""

    @classmethod
    def of(
        cls, values: Sequence[float], eigen_sam: Sequence[float], batch_size: int
    ) -> MinibatchCosines:
        """The summary of per-minibatch |cos| ``values`` (and Eigen-SAM's, in the same order)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        qs = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64))
        return cls(
            batch_size=batch_size,
            count=len(t),
            mean=float(t.mean()),
            std_error=float(t.std() / math.sqrt(len(t))) if len(t) > 1 else None,
            min=float(t.min()),
            max=float(t.max()),
            quantiles={
                f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)
            },
            values=tuple(float(v) for v in t),
            eigen_sam_mean=float(torch.tensor(list(eigen_sam), dtype=torch.float64).mean()),
        )


@dataclass
class Alignment:
    """SAM alignment figures at one point w (see paper.md, "The paper's finding").

    Attributes:
        rho: SAM's radius ρ.
        alpha: Eigen-SAM's α.
        cos_full: |cos(ĝ, v₁)| for the full-data gradient.
        cos_batches: |cos(ĝ_B, v₁)| over the minibatch gradients SAM perturbs along: what the
            verdict reads.
        topk_share: ‖P_k ĝ‖: the share of ĝ in the span of the top-k eigenvectors.
        sam_sharpness: L(w + ρĝ) − L(w), measured.
        sam_sharpness_quadratic: ½ρ² ĝᵀHĝ, its curvature term.
        sam_sharpness_taylor: ρ‖g‖ + ½ρ² ĝᵀHĝ, its second-order Taylor prediction.
        eigen_sam_cos: |cos(ε, v₁)| for Eigen-SAM's ε = ρ(ĝ + α s v⊥) at this ``rho`` and
            ``alpha``, from the full-data gradient (its minibatch mean is in ``cos_batches``).

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import HessianOperator, Objective, lanczos
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(2, 32, 3, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> data = [(x[:16], y[:16, :1]), (x[16:], y[16:, :1])]
        >>> op = HessianOperator(Objective(model, torch.nn.functional.mse_loss, data))
        >>> figures = sam_alignment(op, lanczos(op, 2).eigenvectors, rho=0.05, alpha=0.2)
        >>> 0 <= figures.cos_full <= 1 and figures.cos_batches.count == 2
        True
    """

    rho: float
    alpha: float
    cos_full: float
    cos_batches: MinibatchCosines
    topk_share: float
    sam_sharpness: float
    sam_sharpness_quadratic: float
    sam_sharpness_taylor: float
    eigen_sam_cos: float

    def to_dict(self) -> dict:
        return asdict(self)


def minibatch_cosines(
    op: CurvatureOperator, v1: torch.Tensor, rho: float, alpha: float
) -> MinibatchCosines:
    """|cos(ĝ_B, v₁)| and Eigen-SAM's |cos(ε_B, v₁)| for the gradient of each of ``op``'s full
    minibatches on its own (those of the largest batch's size: a last, shorter one is left out),
    over all ranks' batches when ``op`` is distributed; the one batch when there is only one.
    Costs one gradient per batch (together, one pass over the data); of a sharded ``op``, as many
    passes as ranks (:func:`_sharded_batch_gradients`)."""
    over = over_of(op)
    found = []
    for size, g in _batch_gradients(op):
        eigen = 0.0
        if norm(g, over) > 0:
            eigen = abs_cosine(eigen_sam_perturbation(g, v1, rho, alpha, over), v1, over)
        found.append((size, abs_cosine(g, v1, over), eigen))
    if op.distributed and over is None:
        found = [item for rank_items in distributed.all_gather(found) for item in rank_items]
    size = max(item[0] for item in found)
    full = [item for item in found if item[0] == size]
    return MinibatchCosines.of([c for _, c, _ in full], [e for _, _, e in full], size)


def _batch_gradients(op: CurvatureOperator) -> Iterator[tuple[int, torch.Tensor]]:
    """Each of this rank's batches' size and gradient on its own; of a sharded ``op``, every
    rank's (:func:`_sharded_batch_gradients`)."""
    if shards_of(op) is not None:
        yield from _sharded_batch_gradients(op)
        return
    for batch in op.batches:
        single = op.replace(
            op.objective.replace(batches=[batch], distributed=False), cache_graph=False
        )
        yield batch_size(batch), single.gradient()


def _sharded_batch_gradients(op: CurvatureOperator) -> Iterator[tuple[int, torch.Tensor]]:
    """Each batch of every rank in rank order, its size and this rank's pieces of its gradient on
    its own: a sharded model's gradients are summed over the ranks, so all ranks run one forward
    and backward per batch together, the others' losses weighted 0."""
    sizes = distributed.all_gather([batch_size(b) for b in op.batches])
    for owner, owned in enumerate(sizes):
        for i, size in enumerate(owned):
            mine = distributed.rank() == owner
            single = op.replace(op.objective.replace(batches=[op.batches[i if mine else 0]]))
            single.weights = [1.0 if mine else 0.0]  # the batch's mean loss, or nothing
            yield size, single.gradient()


def sam_alignment(
    op: CurvatureOperator,
    eigenvectors: torch.Tensor,
    rho: float,
    alpha: float,
    h_g_hat: torch.Tensor | None = None,
) -> Alignment:
    """All alignment figures for the top eigenvectors (rows, λ₁ first); costs one product (none
    when ``h_g_hat``, the product H·ĝ, is given) and one gradient per batch.

    Args:
        op: The curvature operator (its loss, gradient and batches are used too).
        eigenvectors: The top eigenvectors, one per row, λ₁ first.
        rho: SAM's radius ρ.
        alpha: Eigen-SAM's α.
        h_g_hat: H·ĝ when already known (saves a product).

    Returns:
        The :class:`Alignment` figures.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import HessianOperator, Objective, lanczos
        >>> x, y = torch.randn(2, 16, 3, dtype=torch.float64)
        >>> op = HessianOperator(Objective(torch.nn.Linear(3, 1).double(),
        ...                                torch.nn.functional.mse_loss, [(x, y[:, :1])]))
        >>> figures = sam_alignment(op, lanczos(op, 2).eigenvectors, rho=0.05, alpha=0.2)
        >>> figures.sam_sharpness > 0
        True
    """
    over = over_of(op)  # the vectors of a sharded operator are this rank's pieces
    g = op.gradient()
    v1 = eigenvectors[0]
    g_hat = g / norm(g, over)
    curvature = dot(g_hat, op.matvec(g_hat) if h_g_hat is None else h_g_hat, over)
    base = op.loss()
    eps = sam_perturbation(g, rho, over)
    eigen_eps = eigen_sam_perturbation(g, v1, rho, alpha, over)
    return Alignment(
        rho=rho,
        alpha=alpha,
        cos_full=abs_cosine(g, v1, over),
        cos_batches=minibatch_cosines(op, v1, rho, alpha),
        topk_share=subspace_share(g, eigenvectors, over),
        sam_sharpness=op.loss(eps) - base,
        sam_sharpness_quadratic=0.5 * rho**2 * curvature,
        sam_sharpness_taylor=rho * norm(g, over) + 0.5 * rho**2 * curvature,
        eigen_sam_cos=abs_cosine(eigen_eps, v1, over),
    )

"""Power iteration with deflation (PyHessian's method), with residuals and convergence flags."""

from __future__ import annotations

import time

import torch

from sharpscope.curvature.lanczos import Which, select, start_vector
from sharpscope.curvature.linop import LinearOperator
from sharpscope.curvature.results import EigenResult, Progress
from sharpscope.curvature.shards import dimension, draw, over_of
from sharpscope.curvature.solve_settings import EIGEN_SETTINGS, SolveSettings
from sharpscope.curvature.vectors import distance, dot, norm, orthogonalize, rayleigh_quotients


def _wrong_side(value: float, which: Which) -> bool:
    return (which == "largest" and value < 0) or (which == "smallest" and value > 0)


def power_iteration(
    op: LinearOperator,
    k: int = 1,
    *,
    which: Which = "largest",
    settings: SolveSettings = EIGEN_SETTINGS,
    v0: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> EigenResult:
    """The ``k`` largest, smallest or largest-magnitude eigenpairs, one at a time.

    Each pair is iterated in the complement of those found before it until ‖Hv − λv‖ ≤ ``tol`` ·
    max|λ| seen, or for ``max_iter`` products. Plain power iteration finds the largest |λ|; when
    that has the wrong sign for ``which``, the operator is shifted by it (H − λI) and the pair is
    iterated again, so ``"largest"`` never returns a negative eigenvalue by mistake.

    Args:
        op: A symmetric operator, as :func:`~sharpscope.curvature.lanczos.lanczos` takes.
        k: How many eigenpairs.
        which: ``largest``, ``smallest`` or ``magnitude``.
        settings: ``tol``, ``max_iter`` (products per pair) and ``seed`` (:class:`SolveSettings`;
            ``max_basis`` is not used).
        v0: The first pair's start vector instead of a seeded random one.
        progress: Called as ``progress("power", products, k * max_iter)`` after each product.

    Returns:
        An :class:`~sharpscope.curvature.results.EigenResult`, in the order found.

    Raises:
        ValueError: ``k`` below 1, an unknown ``which``, or a ``v0`` of the wrong length or zero.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> round(float(power_iteration(op, settings=SolveSettings(tol=1e-10)).eigenvalues[0]), 6)
        3.0
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    select(torch.zeros(1), 1, which)
    start = time.perf_counter()
    products = op.n_products
    tol, max_iter = settings.tol, settings.max_iter
    generator = torch.Generator().manual_seed(settings.seed)
    k, over = min(k, dimension(op)), over_of(op)  # sharded vectors: sums over their ranks
    found = torch.empty(0, op.size, dtype=op.dtype, device=op.device)
    values: list[float] = []
    residuals: list[float] = []
    flags: list[bool] = []
    history: list[list[float]] = []
    shift, scale, iterations = 0.0, 0.0, 0

    def fresh(v: torch.Tensor) -> torch.Tensor:
        v = orthogonalize(v, found, over=over)
        return v / norm(v, over)

    for i in range(k):
        v = fresh(start_vector(op, generator, v0 if i == 0 else None))
        steps = 0
        while True:
            w = op.matvec(v)
            steps += 1
            iterations += 1
            value = dot(v, w, over)
            residual = distance(w, v, value, over)
            scale = max(scale, abs(value))
            history.append([*values, value])
            if progress is not None:
                progress("power", iterations, k * max_iter)
            ok = residual <= tol * scale
            if ok and which != "magnitude" and shift == 0.0 and _wrong_side(value, which):
                shift, steps = value, 0
                v = fresh(draw(op, 1, generator)[0])
                continue
            if ok or steps >= max_iter:
                break
            if shift:
                w.sub_(v, alpha=shift)  # (H − shift)v, in the product's own memory
            del v  # the next v is made from w alone, and w is not kept beside the next product
            v = fresh(w)
            del w
        found = torch.cat([found, v[None]])
        values.append(value)
        residuals.append(residual)
        flags.append(ok)
    return EigenResult(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        eigenvectors=found,
        residuals=torch.tensor(residuals, dtype=torch.float64),
        converged=torch.tensor(flags),
        n_products=op.n_products - products,
        n_iterations=iterations,
        seconds=time.perf_counter() - start,
        method="power",
        which=which,
        history=history,
    )


def rayleigh(op: LinearOperator, v: torch.Tensor, tol: float = 1e-4) -> EigenResult:
    """One product: ``v``'s (normalised) Rayleigh quotient vᵀHv, its true residual ‖Hv − λv‖
    (converged at ``tol`` · |λ|) and its image Hv (``images``): what Lanczos or power iteration
    returns after one step from ``v``, without their bookkeeping (a per-step tracker's cost)."""
    start, over = time.perf_counter(), over_of(op)
    v = v.to(dtype=op.dtype, device=op.device)
    v = v / norm(v, over)
    w = op.matvec(v)
    values, residuals = rayleigh_quotients(v[None], [w], over)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=v[None],
        residuals=residuals,
        converged=residuals <= tol * values.abs(),
        n_products=1,
        n_iterations=1,
        seconds=time.perf_counter() - start,
        method="rayleigh",
        which="largest",
        history=[values.tolist()],
        images=w[None],
    )

"""Stochastic trace estimation: Hutchinson, Hutch++ and the deflated estimate that reuses an
eigen-solve's Krylov basis, each with a standard-error stopping rule."""

from __future__ import annotations

import math
import time

import torch

from sharpscope.curvature.linop import LinearOperator
from sharpscope.curvature.results import Progress, Subspace, TraceResult
from sharpscope.curvature.vectors import dot, random_vectors


def _sample_until(
    op: LinearOperator,
    offset: float,
    project: torch.Tensor | None,
    generator: torch.Generator,
    tol: float,
    min_samples: int,
    max_samples: int,
    progress: Progress | None,
    task: str,
    floor: float = 0.0,
) -> tuple[torch.Tensor, bool]:
    """Draw Rademacher quadratic forms zᵀHz (z projected off ``project``'s rows if given) until the
    standard error of ``offset`` + their mean (with ``floor`` added in quadrature) is at most
    ``tol`` times its magnitude."""
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    samples: list[float] = []
    converged = False
    while len(samples) < max_samples:
        z = random_vectors(1, op.size, like, generator, "rademacher")[0]
        if project is not None:
            z = z - project.T @ (project @ z)
        samples.append(dot(z, op.matvec(z)))
        if progress is not None:
            progress(task, len(samples), max_samples)
        if len(samples) >= max(min_samples, 2):
            values = torch.tensor(samples, dtype=torch.float64)
            error = math.hypot(float(values.std()) / math.sqrt(len(samples)), floor)
            if error <= tol * abs(offset + float(values.mean())):
                converged = True
                break
    return torch.tensor(samples, dtype=torch.float64), converged


def _result(
    offset: float,
    samples: torch.Tensor,
    converged: bool,
    op: LinearOperator,
    products: int,
    start: float,
    method: str,
    floor: float = 0.0,
) -> TraceResult:
    n = len(samples)
    error = math.hypot(float(samples.std()) / math.sqrt(n), floor) if n > 1 else math.inf
    return TraceResult(
        estimate=offset + float(samples.mean()) if n else offset,
        std_error=error,
        n_samples=n,
        n_products=op.n_products - products,
        seconds=time.perf_counter() - start,
        method=method,
        converged=converged,
        samples=samples,
    )


def hutchinson(
    op: LinearOperator,
    tol: float = 1e-2,
    max_samples: int = 100,
    min_samples: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
) -> TraceResult:
    """Hutchinson's estimate of tr(H) = E[zᵀHz], z Rademacher; stops once the standard error is at
    most ``tol`` · |estimate| (after ``min_samples``) or after ``max_samples`` products."""
    start, products = time.perf_counter(), op.n_products
    generator = torch.Generator().manual_seed(seed)
    samples, converged = _sample_until(
        op, 0.0, None, generator, tol, min_samples, max_samples, progress, "hutchinson"
    )
    return _result(0.0, samples, converged, op, products, start, "hutchinson")


def hutchpp(
    op: LinearOperator,
    sketch: int = 10,
    tol: float = 1e-2,
    max_samples: int = 100,
    min_samples: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
) -> TraceResult:
    """Hutch++: the trace of H on a ``sketch``-dimensional range sketch, computed exactly (2·sketch
    products), plus Hutchinson on the rest, sampled as in :func:`hutchinson`.

    The sketch captures the few large outlier eigenvalues of a Hessian, which dominate
    Hutchinson's variance; the standard error is that of the remainder.
    """
    start, products = time.perf_counter(), op.n_products
    generator = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    sketch = max(1, min(sketch, op.size))
    probes = random_vectors(sketch, op.size, like, generator, "rademacher")
    images = torch.stack([op.matvec(z) for z in probes])
    basis = torch.linalg.qr(images.T).Q.T
    exact = sum(dot(q, op.matvec(q)) for q in basis)
    if progress is not None:
        progress("hutch++", 0, max_samples)
    samples, converged = _sample_until(
        op, exact, basis, generator, tol, min_samples, max_samples, progress, "hutch++"
    )
    return _result(exact, samples, converged, op, products, start, "hutch++")


def rounding_bound(subspace: Subspace, dtype: torch.dtype) -> float:
    """How far rounding may move ``subspace``'s exact part: a basis orthonormal to m·ε in the
    Frobenius norm (full reorthogonalisation) moves tr(QᵀHQ) + tr(PHP) by ≤ m^1.5·ε·max|θ|."""
    return len(subspace.basis) ** 1.5 * torch.finfo(dtype).eps * subspace.scale


def deflated_trace(
    op: LinearOperator,
    subspace: Subspace,
    tol: float = 1e-2,
    max_products: int = 100,
    min_samples: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
) -> TraceResult:
    """tr(H) = tr(QᵀHQ) + tr(PHP), P = I − QQᵀ, with Q an eigen-solve's orthonormal basis: the
    first part known (no product), the second by Hutchinson on Pz, z Rademacher.

    Unbiased for any basis drawn independently of the probes (converged or not); stops once the
    standard error (the samples', with :func:`rounding_bound` in quadrature) is at most ``tol`` ·
    |estimate| (after ``min_samples``), or after ``max_products`` samples, unconverged.
    """
    start, products = time.perf_counter(), op.n_products
    generator = torch.Generator().manual_seed(seed)
    floor = rounding_bound(subspace, op.dtype)
    budget = max(2, max_products)
    samples, converged = _sample_until(
        op,
        subspace.trace,
        subspace.basis,
        generator,
        tol,
        min(min_samples, budget),
        budget,
        progress,
        "deflated",
        floor,
    )
    return _result(subspace.trace, samples, converged, op, products, start, "deflated", floor)

"""Stochastic trace estimation: Hutchinson, Hutch++ and the deflated estimate that reuses an
eigen-solve's Krylov basis, each with a standard-error stopping rule."""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from sharpscope.curvature.linop import LinearOperator
from sharpscope.curvature.results import Progress, Subspace, TraceResult
from sharpscope.curvature.shards import dimension, draw, over_of
from sharpscope.curvature.solve_settings import TRACE_SETTINGS, SolveSettings
from sharpscope.curvature.vectors import dot, orthonormal_rows, project_out


def _standard_error(samples: list[float], images: list[float] | None, floor: float) -> float:
    """The standard error of the samples' mean, ``floor`` added in quadrature: from their sample
    variance or, given ``images`` (‖Bz‖² per probe), from the Gaussian-probe variance 2‖B‖_F²."""
    n = len(samples)
    if n < 2:
        return math.inf
    if images is None:
        variance = float(torch.tensor(samples, dtype=torch.float64).var())
    else:
        variance = 2 * math.fsum(images) / n
    return math.hypot(math.sqrt(variance / n), floor)


def _sample_until(
    op: LinearOperator,
    offset: float,
    project: torch.Tensor | None,
    settings: SolveSettings,
    min_samples: int,
    progress: Progress | None,
    task: str,
    floor: float = 0.0,
    generator: torch.Generator | None = None,
    rows: int | None = None,
) -> tuple[torch.Tensor, float, bool]:
    """Draw Rademacher quadratic forms zᵀBz, B = PHP with P = I − ``project``ᵀ``project`` (or H),
    until the standard error of ``offset`` + their mean is at most ``tol`` times its magnitude,
    or ``max_iter`` of them; the samples, that standard error (see :func:`_standard_error`: from
    ‖Bz‖² when there is a ``project``ion) and whether it was reached. The probes come from
    ``generator`` (default: a new one seeded by ``settings.seed``); ``project`` streams to the
    device ``rows`` vectors at a time (:func:`~sharpscope.curvature.vectors.project_out`).
    Sharded vectors' probes are this rank's pieces of one process's, their reductions summed
    over the ranks."""
    tol, max_samples, over = settings.tol, settings.max_iter, over_of(op)
    if generator is None:
        generator = torch.Generator().manual_seed(settings.seed)
    samples: list[float] = []
    images: list[float] | None = None if project is None else []
    error, converged = math.inf, False
    while len(samples) < max_samples:
        z = draw(op, 1, generator, "rademacher")[0]
        if project is not None:
            z = project_out(z, project, rows, over)
        image = op.matvec(z)
        samples.append(dot(z, image, over))
        if images is not None:
            if project is not None:
                image = project_out(image, project, rows, over)
            images.append(dot(image, image, over))
        if progress is not None:
            progress(task, len(samples), max_samples)
        error = _standard_error(samples, images, floor)
        if len(samples) >= min_samples and error <= tol * abs(offset + sum(samples) / len(samples)):
            converged = True
            break
    return torch.tensor(samples, dtype=torch.float64), error, converged


def _result(
    offset: float,
    sampled: tuple[torch.Tensor, float, bool],
    op: LinearOperator,
    products: int,
    start: float,
    method: str,
) -> TraceResult:
    samples, error, converged = sampled
    n = len(samples)
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
    *,
    settings: SolveSettings = TRACE_SETTINGS,
    min_samples: int = 10,
    progress: Progress | None = None,
) -> TraceResult:
    """Hutchinson's estimate of tr(H) = E[zᵀHz], z Rademacher; stops once the standard error is at
    most ``tol`` · |estimate| (after ``min_samples``) or after ``max_iter`` samples (products).

    Args:
        op: A symmetric operator, as :func:`~sharpscope.curvature.lanczos.lanczos` takes.
        settings: ``tol``, ``max_iter`` (the most samples) and ``seed`` (:class:`SolveSettings`).
        min_samples: The fewest samples before the standard error may stop it.
        progress: Called as ``progress("hutchinson", samples, max_iter)`` after each sample.

    Returns:
        A :class:`~sharpscope.curvature.results.TraceResult` with its standard error.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> hutchinson(op).estimate  # a diagonal matrix: every Rademacher probe is exact
        2.0
    """
    start, products = time.perf_counter(), op.n_products
    sampled = _sample_until(op, 0.0, None, settings, min_samples, progress, "hutchinson")
    return _result(0.0, sampled, op, products, start, "hutchinson")


def hutchpp(
    op: LinearOperator,
    *,
    sketch: int = 10,
    settings: SolveSettings = TRACE_SETTINGS,
    min_samples: int = 10,
    progress: Progress | None = None,
) -> TraceResult:
    """Hutch++: the trace of H on a ``sketch``-dimensional range sketch, computed exactly (2·sketch
    products), plus Hutchinson on the rest, sampled as in :func:`hutchinson`.

    The sketch captures the few large outlier eigenvalues of a Hessian, which dominate
    Hutchinson's variance; the standard error is that of the remainder, as in
    :func:`deflated_trace`.

    Args:
        op: A symmetric operator, as :func:`~sharpscope.curvature.lanczos.lanczos` takes.
        sketch: The sketch's dimension (at most the operator's size).
        settings: ``tol``, ``max_iter`` (the most samples after the sketch) and ``seed``.
        min_samples: The fewest samples before the standard error may stop it.
        progress: Called as ``progress("hutch++", samples, max_iter)``.

    Returns:
        A :class:`~sharpscope.curvature.results.TraceResult` with its standard error.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> round(hutchpp(op).estimate, 10)  # the sketch spans all three dimensions
        2.0
    """
    start, products, over = time.perf_counter(), op.n_products, over_of(op)
    generator = torch.Generator().manual_seed(settings.seed)
    sketch = max(1, min(sketch, dimension(op)))
    probes = draw(op, sketch, generator, "rademacher")
    images = torch.stack([op.matvec(z) for z in probes])
    basis = orthonormal_rows(images, over, lambda: draw(op, 1, generator)[0])
    exact = sum(dot(q, op.matvec(q), over) for q in basis)
    if progress is not None:
        progress("hutch++", 0, settings.max_iter)
    sampled = _sample_until(
        op, exact, basis, settings, min_samples, progress, "hutch++", generator=generator
    )
    return _result(exact, sampled, op, products, start, "hutch++")


def rounding_bound(subspace: Subspace, dtype: torch.dtype) -> float:
    """How far rounding may move ``subspace``'s exact part: a basis orthonormal to m·ε in the
    Frobenius norm (full reorthogonalisation) moves tr(QᵀHQ) + tr(PHP) by ≤ m^1.5·ε·max|θ|."""
    return len(subspace.basis) ** 1.5 * torch.finfo(dtype).eps * subspace.scale


def deflated_trace(
    op: LinearOperator,
    subspace: Subspace,
    *,
    settings: SolveSettings = TRACE_SETTINGS,
    min_samples: int = 10,
    progress: Progress | None = None,
) -> TraceResult:
    """tr(H) = tr(QᵀHQ) + tr(PHP), P = I − QQᵀ, with Q an eigen-solve's orthonormal basis: the
    first part known (no product), the second by Hutchinson on Pz, z Rademacher.

    Unbiased for any basis drawn independently of the probes (converged or not). Its standard
    error is √(2·mean‖PHPz‖²/n) (docs/engine.md), with :func:`rounding_bound` in quadrature: the
    exact one for Gaussian probes, an upper bound for Rademacher ones, and far less noisy than the
    samples' own spread, so stopping on it keeps the 95 % interval's coverage. It stops once that
    is at most ``tol`` · |estimate| (after ``min_samples``), or after ``max_iter`` samples,
    unconverged. Each sample costs one product and two projections.

    Args:
        op: A symmetric operator, as :func:`~sharpscope.curvature.lanczos.lanczos` takes.
        subspace: The eigen-solve's basis (``lanczos_extremes(..., keep_subspace=True)``).
        settings: ``tol``, ``max_iter`` (the most samples, at least 2) and ``seed``.
        min_samples: The fewest samples before the standard error may stop it.
        progress: Called as ``progress("deflated", samples, max_iter)`` after each sample.

    Returns:
        A :class:`~sharpscope.curvature.results.TraceResult` with its standard error.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator, lanczos_extremes
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64)))
        >>> top, _ = lanczos_extremes(op, 2, keep_subspace=True)
        >>> round(deflated_trace(op, top.subspace).estimate, 6)
        21.0
    """
    start, products = time.perf_counter(), op.n_products
    floor = rounding_bound(subspace, op.dtype)
    budget = dataclasses.replace(settings, max_iter=max(2, settings.max_iter))
    sampled = _sample_until(
        op,
        subspace.trace,
        subspace.basis,
        budget,
        min(min_samples, budget.max_iter),
        progress,
        "deflated",
        floor,
        rows=subspace.rows,
    )
    return _result(subspace.trace, sampled, op, products, start, "deflated")

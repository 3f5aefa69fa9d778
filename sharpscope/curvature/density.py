"""Spectral density by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import time

import torch

from sharpscope.curvature.lanczos import LanczosProcess
from sharpscope.curvature.linop import LinearOperator
from sharpscope.curvature.results import DensityResult, Progress
from sharpscope.curvature.shards import dimension, draw


def slq(
    op: LinearOperator,
    *,
    n_vectors: int = 4,
    n_iter: int = 80,
    seed: int = 0,
    progress: Progress | None = None,
) -> DensityResult:
    """Run ``n_iter`` Lanczos steps from each of ``n_vectors`` random unit Rademacher vectors.

    Each run gives Gauss quadrature nodes (Ritz values) and weights (squared first components of
    the Ritz vectors); their average is the density estimate (see :class:`DensityResult`).

    Args:
        op: A symmetric operator, as :func:`~sharpscope.curvature.lanczos.lanczos` takes.
        n_vectors: How many random start vectors (quadratures to average).
        n_iter: Lanczos steps from each (at most the operator's size).
        seed: The seed of the start vectors.
        progress: Called as ``progress("slq", steps, n_vectors * n_iter)`` after each step.

    Returns:
        A :class:`~sharpscope.curvature.results.DensityResult`.

    Raises:
        ValueError: ``n_vectors`` or ``n_iter`` below 1.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> density = slq(op, n_vectors=2)
        >>> round(density.mean * op.size, 6)  # n · the mean eigenvalue is the trace
        2.0
    """
    if n_vectors < 1 or n_iter < 1:
        raise ValueError("n_vectors and n_iter must be at least 1")
    start, products = time.perf_counter(), op.n_products
    generator = torch.Generator().manual_seed(seed)
    steps = min(n_iter, dimension(op))
    nodes, weights = [], []
    for i in range(n_vectors):
        z = draw(op, 1, generator, "rademacher")[0]  # this rank's pieces of a sharded one
        process = LanczosProcess(op, z, generator, capacity=steps)
        for _ in range(steps):
            process.step()
            if progress is not None:
                progress("slq", i * steps + process.steps, n_vectors * steps)
            if process.exhausted or process.beta == 0.0:
                break
        theta, s, _ = process.ritz()
        nodes.append(theta)
        weights.append(s[0, :] ** 2)
    return DensityResult(
        nodes=nodes,
        weights=weights,
        size=dimension(op),
        n_products=op.n_products - products,
        seconds=time.perf_counter() - start,
    )

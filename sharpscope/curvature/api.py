"""One-call entry points: an objective's Hessian and one estimator run on it (the eigen-solvers
are :data:`~sharpscope.curvature.solvers.SOLVERS`)."""

from __future__ import annotations

from typing import Literal

from sharpscope.analysis.plan import available_memory
from sharpscope.curvature.density import slq
from sharpscope.curvature.hvp import Backend, HessianOperator, refined
from sharpscope.curvature.lanczos import Which
from sharpscope.curvature.objective import Objective
from sharpscope.curvature.product_error import product_error
from sharpscope.curvature.results import DensityResult, EigenResult, Progress, TraceResult
from sharpscope.curvature.solve_settings import EIGEN_SETTINGS, TRACE_SETTINGS, SolveSettings
from sharpscope.curvature.solvers import solver
from sharpscope.curvature.trace import hutchinson, hutchpp
from sharpscope.errors import check_choice

TRACE_ESTIMATORS = {"hutch++": hutchpp, "hutchinson": hutchinson}
"""The trace estimators :func:`hessian_trace` runs, by name."""


def hessian_eigs(
    objective: Objective,
    k: int = 5,
    *,
    which: Which = "largest",
    method: str = "lanczos",
    backend: Backend = "double-backward",
    settings: SolveSettings = EIGEN_SETTINGS,
    progress: Progress | None = None,
) -> EigenResult:
    """The top (or bottom, or largest-magnitude) ``k`` Hessian eigenpairs of ``objective``'s
    loss; below float64, and with finite differences, the products' own error is in the bounds
    and ``converged`` flags (:func:`~sharpscope.curvature.product_error.error_products`).

    Args:
        objective: The model, loss, data and parameters (:class:`Objective`).
        k: How many eigenpairs.
        which: ``largest``, ``smallest`` or ``magnitude``.
        method: The solver, a key of :data:`~sharpscope.curvature.solvers.SOLVERS`.
        backend: How the Hessian's products are taken (:class:`HessianOperator`).
        settings: The solver's precision (:class:`SolveSettings`).
        progress: Called as ``progress(task, done, total)`` as the solver goes.

    Returns:
        An :class:`~sharpscope.curvature.results.EigenResult`, most extreme pair first.

    Raises:
        InputError: An unknown ``method``, or data the model cannot run on.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> objective = Objective(model, torch.nn.functional.cross_entropy, data)
        >>> result = hessian_eigs(objective, k=2)
        >>> bool(result.eigenvalues[0] >= result.eigenvalues[1]), bool(result.converged.all())
        (True, True)
    """
    op = HessianOperator(objective, backend=backend)
    result = refined(
        op, lambda: solver(method).eigs(op, k, which, settings, progress), settings.tol
    )
    vectors = result.eigenvectors
    error = product_error(op, vectors[0], available_memory(op.device), vectors[1:])
    if error is None:
        return result
    return error.widened(result, settings.tol, float(result.eigenvalues.abs().max()))


def hessian_trace(
    objective: Objective,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    backend: Backend = "double-backward",
    settings: SolveSettings = TRACE_SETTINGS,
    min_samples: int = 10,
    progress: Progress | None = None,
) -> TraceResult:
    """The estimated trace of ``objective``'s Hessian, with its standard error.

    Args:
        objective: The model, loss, data and parameters (:class:`Objective`).
        method: ``hutch++`` (:func:`hutchpp`) or ``hutchinson`` (:func:`hutchinson`).
        backend: How the Hessian's products are taken (:class:`HessianOperator`).
        settings: The standard error to stop at, the most samples, the probes' seed.
        min_samples: The fewest samples before the standard error may stop it.
        progress: Called as ``progress(task, samples, max_samples)`` after each sample.

    Returns:
        A :class:`~sharpscope.curvature.results.TraceResult`.

    Raises:
        InputError: An unknown ``method``, or data the model cannot run on.

    Examples:
        >>> import torch
        >>> data = [(torch.randn(16, 4), torch.randn(16, 1))]
        >>> objective = Objective(torch.nn.Linear(4, 1), torch.nn.functional.mse_loss, data)
        >>> x = data[0][0]
        >>> exact = 2 * (float((x * x).mean(0).sum()) + 1.0)  # tr of 2·E[[x,1][x,1]ᵀ]
        >>> abs(hessian_trace(objective).estimate - exact) < 1e-4
        True
    """
    check_choice("method", method, TRACE_ESTIMATORS)
    op = HessianOperator(objective, backend=backend)
    estimator = TRACE_ESTIMATORS[method]
    return estimator(op, settings=settings, min_samples=min_samples, progress=progress)


def spectral_density(
    objective: Objective,
    *,
    backend: Backend = "double-backward",
    n_vectors: int = 4,
    n_iter: int = 80,
    seed: int = 0,
    progress: Progress | None = None,
) -> DensityResult:
    """The spectral density of ``objective``'s Hessian by stochastic Lanczos quadrature.

    Args:
        objective: The model, loss, data and parameters (:class:`Objective`).
        backend: How the Hessian's products are taken (:class:`HessianOperator`).
        n_vectors: How many random start vectors (quadratures averaged), as in :func:`slq`.
        n_iter: Lanczos steps from each.
        seed: The seed of the start vectors.
        progress: Called as ``progress("slq", steps, n_vectors * n_iter)`` after each step.

    Returns:
        A :class:`~sharpscope.curvature.results.DensityResult`.

    Raises:
        InputError: Data the model cannot run on.

    Examples:
        >>> import torch
        >>> data = [(torch.randn(16, 4), torch.randn(16, 1))]
        >>> objective = Objective(torch.nn.Linear(4, 1), torch.nn.functional.mse_loss, data)
        >>> spectral_density(objective, n_vectors=2, n_iter=5).size
        5
    """
    op = HessianOperator(objective, backend=backend)
    return slq(op, n_vectors=n_vectors, n_iter=n_iter, seed=seed, progress=progress)

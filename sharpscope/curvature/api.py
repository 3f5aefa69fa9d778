"""One-call entry points: build a Hessian operator from a model and run an estimator on it (the
eigen-solvers are :data:`~sharpscope.curvature.solvers.SOLVERS`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from torch import nn

from sharpscope.analysis.plan import available_memory
from sharpscope.batches import LossFn
from sharpscope.curvature.density import slq
from sharpscope.curvature.hvp import Backend, HessianOperator
from sharpscope.curvature.lanczos import Which
from sharpscope.curvature.product_error import product_error
from sharpscope.curvature.results import DensityResult, EigenResult, Progress, TraceResult
from sharpscope.curvature.solvers import SolveSettings, solver
from sharpscope.curvature.trace import hutchinson, hutchpp

Batches = Iterable[tuple[Any, Any]]


def _operator(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    params: Sequence[str] | str | None,
    backend: Backend,
    batch_stats: bool,
    reduction: str,
    input_style: str,
) -> HessianOperator:
    return HessianOperator(
        model,
        loss_fn,
        batches,
        params,
        backend=backend,
        batch_stats=batch_stats,
        reduction=reduction,
        input_style=input_style,
    )


def hessian_eigs(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 5,
    which: Which = "largest",
    method: str = "lanczos",
    params: Sequence[str] | str | None = None,
    backend: Backend = "double-backward",
    batch_stats: bool = False,
    reduction: str = "mean",
    input_style: str = "auto",
    settings: SolveSettings | None = None,
    progress: Progress | None = None,
) -> EigenResult:
    """Top (or bottom, or largest-magnitude) ``k`` Hessian eigenpairs of the mean loss over
    ``batches`` (the total, with ``reduction`` sum; ``input_style``: how mapping inputs reach the
    model, see :class:`~sharpscope.curvature.operator.CurvatureOperator`), by the solver
    ``method`` names (see :data:`SOLVERS`) with its ``settings``; below float64 the products' own
    error is in the bounds and ``converged`` flags (two products)."""
    op = _operator(model, loss_fn, batches, params, backend, batch_stats, reduction, input_style)
    settings = settings or SolveSettings()
    result = solver(method).eigs(op, k, which, settings, progress)
    error = product_error(op, result.eigenvectors[0], available_memory(op.device))
    if error is None:
        return result
    return error.widened(result, settings.tol, float(result.eigenvalues.abs().max()))


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    params: Sequence[str] | str | None = None,
    backend: Backend = "double-backward",
    batch_stats: bool = False,
    reduction: str = "mean",
    input_style: str = "auto",
    **options: Any,
) -> TraceResult:
    """Estimated Hessian trace with its standard error; ``options`` go to the estimator."""
    estimator = {"hutch++": hutchpp, "hutchinson": hutchinson}.get(method)
    if estimator is None:
        raise ValueError(f"unknown method {method!r}; choose hutch++ or hutchinson")
    return estimator(
        _operator(model, loss_fn, batches, params, backend, batch_stats, reduction, input_style),
        **options,
    )


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    params: Sequence[str] | str | None = None,
    backend: Backend = "double-backward",
    batch_stats: bool = False,
    reduction: str = "mean",
    input_style: str = "auto",
    **options: Any,
) -> DensityResult:
    """Hessian spectral density by stochastic Lanczos quadrature; ``options`` go to :func:`slq`."""
    return slq(
        _operator(model, loss_fn, batches, params, backend, batch_stats, reduction, input_style),
        **options,
    )

"""The eigen-solvers a user chooses by name (``lanczos``, ``power``, ``pyhessian``): one registry,
used by the analyze pipeline and by :func:`sharpscope.hessian_eigs`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from sharpscope.curvature.lanczos import Which, lanczos, lanczos_extremes
from sharpscope.curvature.linop import LinearOperator
from sharpscope.curvature.power import power_iteration
from sharpscope.curvature.pyhessian_bridge import pyhessian_eigs, pyhessian_trace
from sharpscope.curvature.results import EigenResult, Progress, Subspace, TraceResult
from sharpscope.curvature.solve_settings import SolveSettings
from sharpscope.curvature.trace import deflated_trace, hutchpp
from sharpscope.errors import check_choice

HUTCHPP_SKETCH = 10
"""Hutch++'s sketch size: 2 × 10 products for the exactly traced part."""


Eigs = Callable[[LinearOperator, int, Which, SolveSettings, Progress | None], EigenResult]
Extremes = Callable[
    [LinearOperator, int, int, SolveSettings, Progress | None], tuple[EigenResult, EigenResult]
]
Trace = Callable[[LinearOperator, SolveSettings, Progress | None, Subspace | None], TraceResult]


TRACE_BUDGET_SHARE = 0.8
"""The trace may take this share of the eigen stage's products: the 40 or so samples its 1 % takes
on the digits MLP (docs/benchmarks.md §7), and at most 4/9 of the products of a run whose long
stages are it and the eigen stage."""


def trace_budget(max_samples: int, eigen_products: int) -> int:
    """The most products the trace may take: :data:`TRACE_BUDGET_SHARE` of the eigen stage's
    (whose basis makes each worth more), and never more than ``max_samples``."""
    return max(2, min(max_samples, math.ceil(TRACE_BUDGET_SHARE * eigen_products)))


@dataclass(frozen=True)
class Cost:
    """The most an extremes solve may take: operator products, and vectors of the operator's
    size held at once."""

    products: int
    vectors: int


@dataclass(frozen=True)
class Solver:
    """One way of finding eigenpairs and the trace of a curvature operator."""

    name: str
    eigs: Eigs
    """``eigs(op, k, which, settings, progress)``: ``k`` eigenpairs at the ``which`` end."""
    extremes: Extremes
    """``extremes(op, k, k_smallest, settings, progress)``: the top ``k`` and the bottom
    ``k_smallest`` pairs, as cheaply as the solver can."""
    trace: Trace
    """``trace(op, settings, progress, subspace)``: the trace with its standard error at
    ``settings.tol``, in at most ``settings.max_iter`` products, deflating the eigen stage's
    ``subspace`` when there is one."""
    cost: Callable[[int, int, SolveSettings], Cost]
    """``cost(k, k_smallest, settings)``: the most an ``extremes`` solve may take."""
    trace_products: Callable[[int], int]
    """``trace_products(max_products)``: the most products ``trace`` may take when given
    ``max_products`` (a fixed sketch may take more)."""
    single_process: bool = False
    """It cannot run under torch.distributed."""
    density_note: str | None = None
    """Why the spectral density, when asked for, is not the solver's own."""


def _lanczos_eigs(
    op: LinearOperator, k: int, which: Which, s: SolveSettings, progress: Progress | None
) -> EigenResult:
    return lanczos(op, k, which=which, settings=s, progress=progress)


def _lanczos_extremes(
    op: LinearOperator, k: int, k_smallest: int, s: SolveSettings, progress: Progress | None
) -> tuple[EigenResult, EigenResult]:
    return lanczos_extremes(
        op, k, k_smallest=k_smallest, settings=s, progress=progress, keep_subspace=True
    )


def _power_eigs(
    op: LinearOperator, k: int, which: Which, s: SolveSettings, progress: Progress | None
) -> EigenResult:
    """Power iteration with at most ``max_iter`` products per pair (as :func:`_power_cost`
    plans)."""
    return power_iteration(op, k, which=which, settings=s, progress=progress)


def _pyhessian_eigs(
    op: LinearOperator, k: int, which: Which, s: SolveSettings, progress: Progress | None
) -> EigenResult:
    """PyHessian's top-k; it has no smallest-eigenvalue solver, so the other ends are Lanczos'."""
    if which != "largest":
        return _lanczos_eigs(op, k, which, s, progress)
    return pyhessian_eigs(op, k, s.tol, s.max_iter, s.seed)  # type: ignore[arg-type]


def _hutchpp_samples(max_products: int) -> int:
    """Hutch++'s samples after its sketch (at least two, for a standard error)."""
    return max(2, max_products - 2 * HUTCHPP_SKETCH)


def _deflated_or_hutchpp(
    op: LinearOperator, s: SolveSettings, progress: Progress | None, subspace: Subspace | None
) -> TraceResult:
    """The deflated trace on the eigen stage's basis when it kept one, Hutch++ otherwise."""
    if subspace is not None:
        return deflated_trace(op, subspace, settings=s, progress=progress)
    samples = dataclasses.replace(s, max_iter=_hutchpp_samples(s.max_iter))
    return hutchpp(op, sketch=HUTCHPP_SKETCH, settings=samples, progress=progress)


def _pyhessian_trace(
    op: LinearOperator, s: SolveSettings, progress: Progress | None, subspace: Subspace | None
) -> TraceResult:
    return pyhessian_trace(op, s.tol, s.max_iter, s.seed)  # type: ignore[arg-type]


def _lanczos_cost(k: int, k_smallest: int, s: SolveSettings) -> Cost:
    """One Krylov run for both ends (its basis bounded by ``max_basis``), then one product to
    check each returned pair."""
    return Cost(s.max_iter + k + k_smallest, s.max_basis or s.max_iter + 1)


def _power_cost(k: int, k_smallest: int, s: SolveSettings) -> Cost:
    """``max_iter`` products per pair, holding the pairs found and two iterates."""
    return Cost(s.max_iter * (k + k_smallest), k + 2)


def _pyhessian_cost(k: int, k_smallest: int, s: SolveSettings) -> Cost:
    """PyHessian's power iteration for the top, then Lanczos for the bottom (and its checks)."""
    return Cost(s.max_iter * k + s.max_iter + k_smallest, s.max_basis or s.max_iter + 1)


def _hutchpp_products(max_products: int) -> int:
    return 2 * HUTCHPP_SKETCH + _hutchpp_samples(max_products)


def _one_end_at_a_time(eigs: Eigs) -> Extremes:
    """Both ends by two solves: the top ``k``, then the bottom ``k_smallest``."""

    def extremes(
        op: LinearOperator, k: int, k_smallest: int, s: SolveSettings, progress: Progress | None
    ) -> tuple[EigenResult, EigenResult]:
        return eigs(op, k, "largest", s, progress), eigs(op, k_smallest, "smallest", s, progress)

    return extremes


SOLVERS: dict[str, Solver] = {
    solver.name: solver
    for solver in (
        Solver(
            "lanczos",
            _lanczos_eigs,
            _lanczos_extremes,
            _deflated_or_hutchpp,
            _lanczos_cost,
            lambda max_products: max(2, max_products),
        ),
        Solver(
            "power",
            _power_eigs,
            _one_end_at_a_time(_power_eigs),
            _deflated_or_hutchpp,
            _power_cost,
            _hutchpp_products,
        ),
        Solver(
            "pyhessian",
            _pyhessian_eigs,
            _one_end_at_a_time(_pyhessian_eigs),
            _pyhessian_trace,
            _pyhessian_cost,
            lambda max_products: max_products,
            single_process=True,
            density_note="PyHessian 0.1's density calls torch.eig, which torch 2 removed; "
            "the density shown is sharpscope's SLQ",
        ),
    )
}
"""Solver name -> solver."""


def solver(name: str) -> Solver:
    """The solver called ``name``; an :class:`InputError` naming the choices otherwise."""
    check_choice("method", name, SOLVERS)
    return SOLVERS[name]

"""What the estimators return, and the progress callback they accept."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sharpscope.curvature.intervals import LEVEL, t_quantile

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: called after each product-costing step of an estimator."""

SHOWN_EIGENVALUES = 6
"""How many eigenvalues an :class:`EigenResult`'s summary lists before eliding the rest."""


def _figure(value: float, digits: int = 6) -> str:
    """``value`` to ``digits`` significant digits; a small figure is never rounded to a bare 0."""
    return "0.0" if value == 0 else f"{value:.{digits}g}"


def _seconds(value: float) -> str:
    return f"{_figure(value, 2)} s"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _with_error(value: float, error: float) -> str:
    """``value ± error``, the value given to the error's second significant digit."""
    if value == 0:
        return f"0.0 ± {_figure(error, 2)}"
    digits = math.floor(math.log10(abs(value))) - math.floor(math.log10(error)) + 2
    return f"{_figure(value, min(max(digits, 1), 12))} ± {_figure(error, 2)}"


@dataclass(frozen=True, repr=False)
class Subspace:
    """An orthonormal basis (rows) an eigen-solve built, with tr(QᵀHQ) known without a product:
    the exactly traced part of a deflated trace estimate.

    Attributes:
        basis: The orthonormal vectors Q, one per row.
        trace: tr(QᵀHQ): the trace of the projected matrix T (Lanczos: Σ of its Ritz values).
        scale: The largest |Ritz value|, for the rounding bound of :attr:`trace`.
        rows: None: :attr:`basis` lies on the operator's device; else in host memory, streamed to
            the device this many vectors at a time (``basis_device="host"``).

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator, lanczos_extremes
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> top, _ = lanczos_extremes(op, 1, keep_subspace=True)
        >>> round(top.subspace.trace, 6), len(top.subspace.basis)
        (2.0, 3)
    """

    basis: torch.Tensor
    trace: float
    scale: float
    rows: int | None = None

    def __repr__(self) -> str:
        return f"Subspace({len(self.basis)} vectors, trace {_figure(self.trace)})"


@dataclass(frozen=True)
class MultiplicityCheck:
    """How a solve made sure its eigenvalues come with their multiplicity: after its pairs first
    converged it locked them and started again from fresh random directions orthogonal to them,
    until a start found no further copy within the tolerance (a single Krylov sequence holds only
    one copy of a repeated eigenvalue).

    Attributes:
        starts: Extra random starts made; each but the last found a further copy or a missed
            value.
        complete: The last start found no further copy, or the basis spanned the whole space;
            False when the product budget (or unconverged pairs) cut the check short.
        products: Operator products the check cost (part of the solve's ``n_products``).

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator, lanczos
        >>> op = MatrixOperator(torch.diag(torch.tensor([2.0, 2.0, 1.0, 0.5], dtype=torch.float64)))
        >>> check = lanczos(op, 2).multiplicity
        >>> check.complete
        True
    """

    starts: int
    complete: bool
    products: int

    def __str__(self) -> str:
        """One line for the report's notes."""
        cost = _count(self.products, "product")
        if not self.complete and self.starts == 0:
            return "multiplicity not checked: the pairs did not converge"
        if not self.complete:
            return (
                f"multiplicity not fully checked: the product budget ran out after "
                f"{_count(self.starts, 'extra random start')} ({cost}); a repeated eigenvalue "
                "may be missing copies, raise `max_iter`"
            )
        if self.starts == 0:
            return "multiplicity checked: the Krylov basis spans the whole space"
        if self.starts == 1:
            return f"multiplicity checked: 1 extra random start found no further copy ({cost})"
        return (
            f"multiplicity checked: {self.starts} extra random starts, {self.starts - 1} of them "
            f"finding further copies, the last none ({cost})"
        )


@dataclass(repr=False)
class EigenResult:
    """Eigenpairs of an operator, with how far each is from converged.

    ``eigenvectors[i]`` is a unit flat vector; ``residuals[i]`` is ‖Hv − λv‖ for it, with the
    operator's products; ``bounds[i]`` adds their own error (``product_error``), so it bounds the
    distance from λ to an eigenvalue of the model's exact matrix.

    Attributes:
        eigenvalues: The eigenvalues (float64), most extreme first.
        eigenvectors: One unit flat vector per row.
        residuals: ‖Hv − λv‖ per pair.
        converged: Per pair, whether its residual met the tolerance.
        n_products: Operator products the solve took.
        n_iterations: Its iterations.
        seconds: Its wall-clock time.
        method: The solver's name.
        which: ``largest``, ``smallest`` or ``magnitude``.
        history: Per iteration, the current estimates of the wanted eigenvalues (convergence
            plots).
        subspace: The Krylov basis the pairs came from, when the solve was asked to keep it (a
            deflated trace reuses it); None otherwise.
        images: ``images[i]`` = H ``eigenvectors[i]``, when the solve kept its products; None
            otherwise.
        product_error: ‖(H_op − H₆₄)v‖ for a unit v, the products' own error (measured on float32
            operators by :func:`~sharpscope.curvature.product_error.product_error`; 0 when not
            measured).
        multiplicity: How repeated eigenvalues were looked for (Lanczos with k ≥ 2); None when
            not needed.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator, lanczos
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> result = lanczos(op, 2)
        >>> result.all_converged, [round(v, 6) for v in result.eigenvalues.tolist()]
        (True, [3.0, 1.0])
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    n_products: int
    n_iterations: int
    seconds: float
    method: str
    which: str
    history: list[list[float]] = field(default_factory=list)
    subspace: Subspace | None = None
    images: torch.Tensor | None = None
    product_error: float = 0.0
    multiplicity: MultiplicityCheck | None = None

    @property
    def bounds(self) -> torch.Tensor:
        """Per pair, ``residuals`` + ``product_error``: how far λ can be from an exact one."""
        return self.residuals + self.product_error

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def __repr__(self) -> str:
        """A summary: the eigenvalues, the largest residual, convergence and cost."""
        k = len(self.eigenvalues)
        values = [_figure(float(v)) for v in self.eigenvalues[:SHOWN_EIGENVALUES]]
        if k > SHOWN_EIGENVALUES:
            values.append(f"… {k - SHOWN_EIGENVALUES} more")
        residual = _figure(float(self.residuals.max()), 2)
        done = int(self.converged.sum())
        state = "all converged" if done == k else f"{done} of {k} converged"
        return (
            f"EigenResult(k={k} {self.which}, eigenvalues=[{', '.join(values)}], "
            f"max residual {residual}, {state}, {self.method}: {self.n_iterations} iterations, "
            f"{_count(self.n_products, 'product')}, {_seconds(self.seconds)})"
        )


@dataclass(repr=False)
class TraceResult:
    """A stochastic trace estimate and its standard error.

    Attributes:
        estimate: The estimated trace.
        std_error: Its standard error (inf with fewer than two samples).
        n_samples: The random probes drawn.
        n_products: Operator products taken (a sketch's too).
        seconds: The wall-clock time.
        method: ``hutchinson``, ``hutch++`` or ``deflated``.
        converged: Whether the standard error met the tolerance.
        samples: Each probe's quadratic form.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator, hutchinson
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> result = hutchinson(op)
        >>> result.estimate, result.std_error, result.converged
        (2.0, 0.0, True)
    """

    estimate: float
    std_error: float
    n_samples: int
    n_products: int
    seconds: float
    method: str
    converged: bool
    samples: torch.Tensor

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % confidence interval, estimate ± t·SE with Student's t for n − 1 degrees of
        freedom; unbounded with fewer than two samples."""
        if self.n_samples < 2 or not math.isfinite(self.std_error):
            return (-math.inf, math.inf)
        half = t_quantile(self.n_samples - 1) * self.std_error
        return (self.estimate - half, self.estimate + half)

    def __repr__(self) -> str:
        """A summary: the estimate ± its standard error, the cost and whether it converged."""
        if not math.isfinite(self.std_error):
            estimate = f"{_figure(self.estimate)} (no standard error from "
            estimate += f"{_count(self.n_samples, 'sample')})"
        elif self.std_error == 0:
            estimate = f"{_figure(self.estimate)} (all {self.n_samples} samples equal)"
        else:
            low, high = self.interval
            estimate = f"{_with_error(self.estimate, self.std_error)} (SE), "
            estimate += f"{LEVEL:.0%} interval [{_figure(low, 4)}, {_figure(high, 4)}]"
        state = "converged" if self.converged else "not converged"
        return (
            f"TraceResult(estimate={estimate}, {self.method}: "
            f"{_count(self.n_samples, 'sample')}, {_count(self.n_products, 'product')}, "
            f"{_seconds(self.seconds)}, {state})"
        )


@dataclass(repr=False)
class DensityResult:
    """Stochastic Lanczos quadrature: per starting vector, Ritz values (nodes) and their weights.

    Attributes:
        nodes: Per starting vector, the Ritz values (Gauss quadrature nodes).
        weights: Per starting vector, the nodes' weights (each set sums to 1).
        size: The operator's size n.
        n_products: Operator products taken.
        seconds: The wall-clock time.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator, slq
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> density = slq(op, n_vectors=1)
        >>> sorted(round(v, 6) for v in density.nodes[0].tolist())
        [-2.0, 1.0, 3.0]
    """

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    size: int
    n_products: int
    seconds: float

    @property
    def mean(self) -> float:
        """Mean of the estimated spectral density (an estimate of trace / n)."""
        return sum(
            float((w * t).sum()) for t, w in zip(self.nodes, self.weights, strict=True)
        ) / len(self.nodes)

    def __repr__(self) -> str:
        """A summary: how many vectors and nodes, the span of the nodes, the mean and the cost."""
        nodes = torch.cat(self.nodes)
        span = f"[{_figure(float(nodes.min()))}, {_figure(float(nodes.max()))}]"
        return (
            f"DensityResult(size={self.size}, {_count(len(self.nodes), 'vector')}, "
            f"{_count(len(nodes), 'node')} in {span}, mean {_figure(self.mean)}, "
            f"{_count(self.n_products, 'product')}, {_seconds(self.seconds)})"
        )

    def smoothed(
        self, grid: torch.Tensor | None = None, sigma: float | None = None, points: int = 1000
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A Gaussian-smoothed density on ``grid``: ``(grid, density)``, integrating to about 1.

        By default the grid spans the nodes with a margin and ``sigma`` is 1 % of that span.
        """
        nodes = torch.cat(self.nodes).double()
        weights = torch.cat(self.weights).double() / len(self.nodes)
        lo, hi = float(nodes.min()), float(nodes.max())
        span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
        if sigma is None:
            sigma = 0.01 * span
        if grid is None:
            grid = torch.linspace(
                lo - 0.05 * span - 3 * sigma, hi + 0.05 * span + 3 * sigma, points
            )
        grid = grid.double()
        z = (grid[:, None] - nodes[None, :]) / sigma
        density = (weights[None, :] * torch.exp(-0.5 * z**2)).sum(1) / (
            sigma * math.sqrt(2 * math.pi)
        )
        return grid, density

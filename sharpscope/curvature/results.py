"""What the estimators return, and the progress callback they accept."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: called after each product-costing step of an estimator."""


@dataclass
class EigenResult:
    """Eigenpairs of an operator, with how far each is from converged.

    ``eigenvectors[i]`` is a unit flat vector; ``residuals[i]`` is ‖Hv − λv‖ for it.
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
    """Per iteration, the current estimates of the wanted eigenvalues (convergence plots)."""

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


@dataclass
class TraceResult:
    """A stochastic trace estimate and its standard error."""

    estimate: float
    std_error: float
    n_samples: int
    n_products: int
    seconds: float
    method: str
    converged: bool
    samples: torch.Tensor


@dataclass
class DensityResult:
    """Stochastic Lanczos quadrature: per starting vector, Ritz values (nodes) and their weights."""

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

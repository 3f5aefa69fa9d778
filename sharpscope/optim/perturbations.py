"""The weight perturbations of SAM and Eigen-SAM, as pure functions of flat vectors."""

from __future__ import annotations

import torch


def _unit(g: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(g)
    if not norm > 0:
        raise ValueError("the gradient is zero: the SAM direction is undefined")
    return g / norm


def sam_perturbation(g: torch.Tensor, rho: float) -> torch.Tensor:
    """SAM's ε = ρ g/‖g‖."""
    return rho * _unit(g)


def eigen_sam_perturbation(
    g: torch.Tensor, v: torch.Tensor, rho: float, alpha: float
) -> torch.Tensor:
    """Eigen-SAM's ε = ρ(ĝ + α s v⊥): ĝ = g/‖g‖, s = sign⟨g, v⟩, v⊥ = v − ⟨ĝ, v⟩ĝ (not renormalised,
    as in the paper's code); ``v`` is the unit top eigenvector estimate."""
    g_hat = _unit(g)
    along = torch.dot(g_hat, v)
    sign = 1.0 if float(along) >= 0 else -1.0
    return rho * (g_hat + alpha * sign * (v - along * g_hat))

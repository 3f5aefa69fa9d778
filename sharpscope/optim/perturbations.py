"""The weight perturbations of SAM, ASAM and Eigen-SAM, as pure functions of flat vectors.

``rho``, ``alpha`` and ``eta`` are numbers, or flat tensors of per-element values (one value per
parameter group, spread over that group's elements) which broadcast against the vectors.
"""

from __future__ import annotations

import torch

Hyper = float | torch.Tensor
"""A hyperparameter: one number, or a flat tensor of per-element values."""


def _unit(g: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(g)
    if not norm > 0:
        raise ValueError("the gradient is zero: the SAM direction is undefined")
    return g / norm


def sam_perturbation(g: torch.Tensor, rho: Hyper) -> torch.Tensor:
    """SAM's ε = ρ g/‖g‖."""
    return rho * _unit(g)


def asam_perturbation(g: torch.Tensor, w: torch.Tensor, rho: Hyper, eta: Hyper) -> torch.Tensor:
    """ASAM's ε = ρ T²g/‖Tg‖ with T = diag(|w| + η), written ρ T (Tg/‖Tg‖)."""
    t = w.abs() + eta
    return rho * t * _unit(t * g)


def eigen_sam_perturbation(
    g: torch.Tensor, v: torch.Tensor, rho: Hyper, alpha: Hyper
) -> torch.Tensor:
    """Eigen-SAM's ε = ρ(ĝ + α s v⊥): ĝ = g/‖g‖, s = sign⟨g, v⟩, v⊥ = v − ⟨ĝ, v⟩ĝ (not renormalised,
    as in the paper's code); ``v`` is the unit top eigenvector estimate."""
    return eigen_sam_step(g, v, rho, alpha)[0]


def eigen_sam_step(
    g: torch.Tensor, v: torch.Tensor, rho: Hyper, alpha: Hyper
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-SAM's ε and ⟨ĝ, v⟩ (the signed alignment), in two reductions and one fused pass:
    ε = ρ(1 − α s⟨ĝ, v⟩)/‖g‖ · g + ρ α s · v, with no host synchronisation for s."""
    norm = torch.linalg.vector_norm(g)
    if not norm > 0:
        raise ValueError("the gradient is zero: the SAM direction is undefined")
    along = torch.dot(g, v) / norm
    along_v = rho * alpha * torch.where(along >= 0, 1.0, -1.0).to(g.dtype)
    return (rho - along_v * along) / norm * g + along_v * v, along

"""The weight perturbations of SAM, ASAM and Eigen-SAM, as pure functions of flat vectors.

``rho``, ``alpha`` and ``eta`` are numbers, or flat tensors of per-element values (one value per
parameter group, spread over that group's elements) which broadcast against the vectors.
"""

from __future__ import annotations

import torch

from sharpscope.curvature.vectors import Over

Hyper = float | torch.Tensor
"""A hyperparameter: one number, or a flat tensor of per-element values."""


def _unit(g: torch.Tensor, over: Over | None = None) -> torch.Tensor:
    norm = torch.linalg.vector_norm(g) if over is None else over(torch.dot(g, g)).sqrt()
    if not norm > 0:
        raise ValueError("the gradient is zero: the SAM direction is undefined")
    return g / norm


def sam_perturbation(g: torch.Tensor, rho: Hyper, over: Over | None = None) -> torch.Tensor:
    """SAM's ε = ρ g/‖g‖ (of this rank's pieces of a sharded ``g``, its norm summed ``over``)."""
    return rho * _unit(g, over)


def asam_perturbation(
    g: torch.Tensor, w: torch.Tensor, rho: Hyper, eta: Hyper, over: Over | None = None
) -> torch.Tensor:
    """ASAM's ε = ρ T²g/‖Tg‖ with T = diag(|w| + η), written ρ T (Tg/‖Tg‖); element-wise but for
    ‖Tg‖ (of this rank's pieces of sharded vectors, its square summed ``over`` the ranks)."""
    t = w.abs() + eta
    return rho * t * _unit(t * g, over)


def eigen_sam_perturbation(
    g: torch.Tensor, v: torch.Tensor, rho: Hyper, alpha: Hyper, over: Over | None = None
) -> torch.Tensor:
    """Eigen-SAM's ε = ρ(ĝ + α s v⊥): ĝ = g/‖g‖, s = sign⟨g, v⟩, v⊥ = v − ⟨ĝ, v⟩ĝ (not renormalised,
    as in the paper's code); ``v`` is the unit top eigenvector estimate (sharded vectors: this
    rank's pieces, reduced ``over`` their ranks)."""
    return eigen_sam_step(g, v, rho, alpha, over)[0]


def eigen_sam_step(
    g: torch.Tensor, v: torch.Tensor, rho: Hyper, alpha: Hyper, over: Over | None = None
) -> tuple[torch.Tensor, float]:
    """Eigen-SAM's ε and ⟨ĝ, v⟩ (the signed alignment) from two reductions, one transfer of two
    numbers to the host and one fused pass: ε = c_g·g + c_v·v with c_v = ρ α s and
    c_g = (ρ − c_v⟨ĝ, v⟩)/‖g‖; sharded vectors' reductions are summed ``over`` their ranks."""
    if over is None:
        norm, dot = torch.stack((torch.linalg.vector_norm(g), torch.dot(g, v))).tolist()
    else:
        squared, dot = over(torch.stack((torch.dot(g, g), torch.dot(g, v)))).tolist()
        norm = max(squared, 0.0) ** 0.5
    if not norm > 0:
        raise ValueError("the gradient is zero: the SAM direction is undefined")
    along = dot / norm
    c_v = rho * alpha * (1.0 if along >= 0 else -1.0)
    c_g = (rho - c_v * along) / norm
    if isinstance(c_g, torch.Tensor) or isinstance(c_v, torch.Tensor):
        return c_g * g + c_v * v, along  # per-element hyperparameters
    return torch.add(g.mul(c_g), v, alpha=c_v), along

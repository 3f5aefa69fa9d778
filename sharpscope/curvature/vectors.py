"""Seeded random vectors, orthogonalisation and |cos| shared by the estimators and their users."""

from __future__ import annotations

from typing import Literal

import torch


def random_vectors(
    count: int,
    size: int,
    like: torch.Tensor,
    generator: torch.Generator,
    kind: Literal["normal", "rademacher"] = "normal",
) -> torch.Tensor:
    """``count`` random vectors (rows) of ``size``, drawn on the CPU so that a seed gives the same
    vectors on every device, then moved to ``like``'s dtype and device."""
    if kind == "normal":
        out = torch.randn(count, size, generator=generator, dtype=torch.float64)
    else:
        out = torch.randint(0, 2, (count, size), generator=generator, dtype=torch.int8) * 2.0 - 1.0
    return out.to(dtype=like.dtype, device=like.device)


def orthogonalize(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from ``w`` its components along the orthonormal rows of ``basis`` (twice, for
    numerical safety: "twice is enough")."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def abs_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """|cos(a, b)|; 0 when either vector is zero."""
    norms = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    return float(torch.dot(a, b).abs() / norms) if norms > 0 else 0.0

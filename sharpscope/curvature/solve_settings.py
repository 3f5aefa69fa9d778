"""How precisely an estimator solves: the settings every eigen-solver and trace estimator takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SolveSettings:
    """How precisely to solve: the residual tolerance (relative to |λ_max|), the most products
    per solve, the seed of the random start, Lanczos' memory bound (None: unbounded) and where its
    basis lies: ``device`` (the operator's) or ``host`` (CPU memory, pinned when the operator is
    on CUDA, streamed to the device a slab at a time: the device then holds only a few vectors).

    A trace estimator reads ``tol`` as the standard error it stops at (relative to the
    estimate), ``max_iter`` as the most samples it draws and ``seed`` as its probes' seed.

    Args:
        tol: The relative tolerance a solve stops at.
        max_iter: The most operator products (a trace: samples) per solve.
        seed: The seed of the random start vectors (a trace: of the probes).
        max_basis: The most vectors Lanczos holds (at least k + 2); None: unbounded.
        basis_device: ``device`` or ``host``: where Lanczos keeps its basis.

    Examples:
        >>> SolveSettings(tol=1e-6).max_iter
        200
    """

    tol: float = 1e-4
    max_iter: int = 200
    seed: int = 0
    max_basis: int | None = None
    basis_device: str = "device"


EIGEN_SETTINGS = SolveSettings()
"""The eigen-solvers' default precision."""
TRACE_SETTINGS = SolveSettings(tol=1e-2, max_iter=100)
"""The trace estimators' default precision: a 1 % standard error, at most 100 samples."""

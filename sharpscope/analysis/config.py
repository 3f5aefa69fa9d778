"""What ``analyze`` computes, and how precisely: :class:`AnalyzeConfig`, checked when made
without importing torch (so that the command line refuses a bad option before it loads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sharpscope.choices import (
    ADAPTIVE_KINDS,
    ADAPTIVE_NORMS,
    BACKENDS,
    CURVATURE_NAMES,
    REDUCTIONS,
    SOLVER_NAMES,
)
from sharpscope.errors import InputError, check_choice, check_finite_fields

if TYPE_CHECKING:
    from sharpscope.analysis.adaptive_sharpness import AdaptiveSharpnessSettings
    from sharpscope.curvature.hvp import Backend
    from sharpscope.curvature.solvers import SolveSettings
Method = Literal["lanczos", "power", "pyhessian"]


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to compute, and how precisely; checked when made (an :class:`InputError` naming the
    parameter)."""

    k: int = 5
    method: Method = "lanczos"
    tol: float = 1e-4
    max_iter: int = 200
    max_basis: int | None = None
    """Lanczos: at most this many vectors in memory (thick restarts); None keeps them all."""
    seed: int = 0
    trace: bool = True
    trace_tol: float = 4e-3
    """The trace's target standard error, relative: 2.5 SE within 1 %, so that the estimate lands
    within 1 % for about 99 % of seeds (at 0.5 % it was 95 %)."""
    trace_samples: int = 100
    density: bool = False
    density_vectors: int = 4
    density_iter: int = 80
    per_layer: bool = False
    rho: float = 0.05
    alpha: float = 0.2
    backend: Backend = "double-backward"
    """How Hessian-vector products are taken (the Hessian's only)."""
    curvature: str = "hessian"
    """The matrix analysed: a name of :data:`~sharpscope.curvature.CURVATURES`."""
    batch_stats: bool = False
    reduction: str = "mean"
    """How the loss reduces a batch, ``mean`` or ``sum``: the curvature of the mean or the total
    loss (:class:`~sharpscope.curvature.operator.CurvatureOperator`)."""
    params: Sequence[str] | None = None
    """Globs of the parameters to analyze; None: all trainable ones."""
    exclude: Sequence[str] | None = None
    """Globs of parameters left out of those ``params`` selects; None: none."""
    slices: bool = False
    """Also measure the loss along v₁ and along ĝ, at 21 points in ±2ρ (for plots)."""
    shards: int = 8
    """Disjoint shards of the samples for the data uncertainty (a jackknife); 0 leaves it out."""
    adaptive_sharpness: str | None = None
    """Also measure the worst- or average-case sharpness (``worst``, ``average``); None: not."""
    adaptive_norm: str = "l2"
    """Its ball's norm (``l2``, ``linf``; the average case: Gaussian or uniform draws)."""
    adaptive_rho: float = 0.1
    adaptive_steps: int = 20
    """Its ascent steps (worst case) or random draws (average case)."""
    adaptive_scale: bool = True
    """Scale the ball by |w| (adaptive sharpness); False: the plain ball."""
    bias: bool = False
    """Also estimate the figures' sample-size bias by solving them on each shard (about one more
    eigen-solve in all); the spread's intervals then allow for it (docs/engine.md)."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice("method", self.method, SOLVER_NAMES)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("curvature", self.curvature, CURVATURE_NAMES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        for name in ("k", "max_iter", "trace_samples", "density_vectors", "density_iter"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        for name in ("tol", "trace_tol", "rho"):
            if not getattr(self, name) > 0:
                raise InputError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.shards == 1 or self.shards < 0:
            raise InputError(f"`shards` must be 0 (off) or at least 2, got {self.shards}")
        if not self.alpha >= 0:
            raise InputError(f"`alpha` must not be negative, got {self.alpha}")
        if self.adaptive_sharpness is not None:
            check_choice("adaptive_sharpness", self.adaptive_sharpness, ADAPTIVE_KINDS)
        check_choice("adaptive_norm", self.adaptive_norm, ADAPTIVE_NORMS)
        if not self.adaptive_rho > 0:
            raise InputError(f"`adaptive_rho` must be positive, got {self.adaptive_rho}")
        if self.adaptive_steps < 1:
            raise InputError(f"`adaptive_steps` must be at least 1, got {self.adaptive_steps}")
        if self.max_basis is not None and self.max_basis < self.k + 3:
            raise InputError(
                f"`max_basis` must be at least `k` + 3 = {self.k + 3} (the top-k, λ_min and "
                f"two more), got {self.max_basis}"
            )

    def settings(self) -> SolveSettings:
        """The eigen-solver's part of the config."""
        from sharpscope.curvature.solvers import SolveSettings  # torch: only for the analysis

        return SolveSettings(self.tol, self.max_iter, self.seed, self.max_basis)

    def sharpness_settings(self) -> AdaptiveSharpnessSettings | None:
        """The adaptive sharpness's part of the config (None: not measured)."""
        from sharpscope.analysis.adaptive_sharpness import AdaptiveSharpnessSettings  # torch

        if self.adaptive_sharpness is None:
            return None
        return AdaptiveSharpnessSettings(
            kind=self.adaptive_sharpness,  # type: ignore[arg-type]
            norm=self.adaptive_norm,  # type: ignore[arg-type]
            rho=self.adaptive_rho,
            adaptive=self.adaptive_scale,
            steps=self.adaptive_steps,
            seed=self.seed,
        )

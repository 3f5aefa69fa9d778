"""What ``landscape`` evaluates: :class:`LandscapeConfig`, checked when made without importing
torch (so that the command line refuses a bad option before it loads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sharpscope.choices import REDUCTIONS
from sharpscope.errors import InputError, check_choice, check_finite_fields

Kind = Literal["random", "eigen"]
KINDS: tuple[str, ...] = ("random", "eigen")


@dataclass(frozen=True)
class LandscapeConfig:
    """Which directions, how far and how finely; checked when made (an :class:`InputError`
    naming the parameter)."""

    directions: Kind = "random"
    span: float = 1.0
    """The line and the grid cover t ∈ [−span, span] along each direction."""
    points: int = 41
    """Points on the 1-D line (odd, so that the weights themselves are one)."""
    grid: int = 21
    """Points along each axis of the 2-D grid (odd)."""
    seed: int = 0
    """Seeds the random directions, or Lanczos's start vector."""
    tol: float = 1e-4
    max_iter: int = 200
    """Lanczos's tolerance and product budget for the eigen directions."""
    params: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    """Globs of the parameters that move (see :func:`~sharpscope.curvature.select_params`)."""
    batch_stats: bool = False
    reduction: str = "mean"
    """How the loss reduces a batch: ``mean``, or ``sum`` (every point the total loss)."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice("directions", self.directions, KINDS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        if not self.span > 0:
            raise InputError(f"`span` must be positive, got {self.span}")
        for name in ("points", "grid"):
            value = getattr(self, name)
            if value < 3 or value % 2 == 0:
                raise InputError(f"`{name}` must be odd and at least 3, got {value}")
        if not self.tol > 0 or self.max_iter < 2:
            raise InputError(
                f"`tol` must be positive and `max_iter` at least 2, got {self.tol}, {self.max_iter}"
            )

"""What ``landscape`` evaluates: :class:`LandscapeConfig`, checked when made without importing
torch (so that the command line refuses a bad option before it loads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sharpscope.choices import REDUCTIONS
from sharpscope.errors import InputError, check_choice, check_finite_fields
from sharpscope.settings import setting

Kind = Literal["random", "eigen"]
KINDS: tuple[str, ...] = ("random", "eigen")
LANDSCAPE = "Landscape"


@dataclass(frozen=True)
class LandscapeConfig:
    """Which directions, how far and how finely; checked when made (an :class:`InputError`
    naming the parameter).

    Example:
        >>> LandscapeConfig(directions="eigen", grid=31).points
        41
    """

    directions: Kind = setting(
        "random",
        help=f"The directions: {' or '.join(KINDS)}. Random: filter-normalised random directions "
        "(Li et al. 2018); eigen: the top two Hessian eigenvectors v₁, v₂ (Lanczos, unit "
        "vectors).",
        common=True,
        panel=LANDSCAPE,
    )
    span: float = setting(
        1.0,
        help="Half-width of the line and the grid: steps t in [−span, span]. Random directions: "
        "in units of each filter's norm; eigen: a distance in weights.",
        common=True,
        panel=LANDSCAPE,
    )
    points: int = setting(41, help="Points on the 1-D line (odd).", common=True, panel=LANDSCAPE)
    grid: int = setting(
        21,
        help="Points along each axis of the 2-D grid (odd; grid² evaluations).",
        common=True,
        panel=LANDSCAPE,
    )
    seed: int = setting(
        0, help="Seeds the random directions, or Lanczos's start vector.", panel=LANDSCAPE
    )
    tol: float = setting(
        1e-4, help="Lanczos's tolerance for the eigen directions.", panel=LANDSCAPE
    )
    max_iter: int = setting(
        200, help="Lanczos's product budget for the eigen directions.", panel=LANDSCAPE
    )
    params: Sequence[str] | None = setting(
        None,
        help="Move only the parameters whose name matches this glob (repeatable), e.g. 'fc.*'.",
        panel=LANDSCAPE,
    )
    exclude: Sequence[str] | None = setting(
        None,
        help="Keep still the parameters whose name matches this glob (repeatable; after --params).",
        panel=LANDSCAPE,
    )
    batch_stats: bool = setting(
        False,
        help="BatchNorm on batch statistics (train mode) instead of running statistics.",
        panel=LANDSCAPE,
    )
    reduction: str = setting(
        "mean",
        help="How the loss reduces a batch: mean, or sum (every point the total loss).",
        panel=LANDSCAPE,
    )

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

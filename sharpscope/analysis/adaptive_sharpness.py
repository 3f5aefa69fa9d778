"""Worst-case and average-case (adaptive) sharpness, as Andriushchenko et al. 2023 define them
("A modern look at the relationship between sharpness and generalization").

With T = diag(|w| + η) (adaptive) or T = I (not adaptive), and the perturbation written δ = T u:

- worst case: ``max_{‖u‖_p ≤ ρ} L(w + T u) − L(w)`` (p = 2 or ∞), by projected normalised
  gradient ascent in u: ``u ← P(u + α·d)`` with ``d = Tg/‖Tg‖`` (ℓ2) or ``sign(Tg)`` (ℓ∞),
  ``g = ∇L(w + Tu)``, from u = 0; the best iterate is kept, so the figure never falls below that
  of its starting perturbation. With α = ρ the first step is ASAM's (SAM's, not adaptive)
  perturbation. The ascent only finds a lower bound of the maximum.
- average case: ``E L(w + ρ T z) − L(w)`` with z standard Gaussian (ℓ2) or uniform on [−1, 1]
  (ℓ∞), over ``steps`` seeded draws, with its Monte-Carlo standard error.

With η = 0 (the default, as theirs), both are invariant to rescalings that leave the network's
function unchanged (a ReLU layer ×c, the next ×1/c): in u the loss is the same function.

The data uncertainty is a grouped jackknife over disjoint shards of the samples
(:mod:`sharpscope.analysis.sampling`): of the mean over the draws of each shard's loss difference
(average case), and of each shard's loss difference at the found δ (worst case, δ held fixed:
by Danskin's theorem the maximum's first-order change with the data is that of the loss
difference at its maximiser).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from sharpscope import distributed
from sharpscope.analysis.intervals import deleted_means, interval, jackknife_se, t_quantile
from sharpscope.analysis.sampling import shard_losses
from sharpscope.choices import ADAPTIVE_KINDS, ADAPTIVE_NORMS
from sharpscope.curvature import HessianOperator, Objective, Progress
from sharpscope.curvature.shards import dimension, over_of, shards_of
from sharpscope.curvature.vectors import Over, norm
from sharpscope.errors import InputError, check_choice, check_finite_fields

Kind = Literal["worst", "average"]
Norm = Literal["l2", "linf"]
KINDS, NORMS = ADAPTIVE_KINDS, ADAPTIVE_NORMS


@dataclass(frozen=True)
class AdaptiveSharpnessSettings:
    """What to measure: the kind, the ball's norm and radius ρ (relative to |w| + η when
    ``adaptive``), the ascent steps or draws, the step size (None: ρ) and the seed.

    Attributes:
        kind: ``worst`` (the largest loss increase found in the ball) or ``average`` (its mean).
        norm: The ball's norm, ``l2`` or ``linf``.
        rho: The ball's radius ρ.
        adaptive: The ball is scaled by |w| + η, per element (Kwon et al. 2021).
        steps: Worst case: gradient-ascent steps; average case: random draws.
        step_size: The ascent's step (None: ρ).
        eta: The offset η of the scaling.
        seed: The seed of the draws (and of the worst case's random restarts).

    Raises:
        InputError: An unknown ``kind`` or ``norm``, a non-finite figure, ``rho`` or
            ``step_size`` not positive, ``steps`` below 1, a negative ``eta``.

    Examples:
        >>> AdaptiveSharpnessSettings(kind="average", rho=0.05).steps
        20
    """

    kind: Kind = "worst"
    norm: Norm = "l2"
    rho: float = 0.1
    adaptive: bool = True
    steps: int = 20
    step_size: float | None = None
    eta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice("kind", self.kind, KINDS)
        check_choice("norm", self.norm, NORMS)
        if not self.rho > 0:
            raise InputError(f"`rho` must be positive, got {self.rho:g}")
        if self.steps < 1:
            raise InputError(f"`steps` must be at least 1, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise InputError(f"`step_size` must be positive, got {self.step_size:g}")
        if not self.eta >= 0:
            raise InputError(f"`eta` must not be negative, got {self.eta:g}")


@dataclass(frozen=True)
class AdaptiveSharpnessResult:
    """A sharpness figure, its uncertainties and its cost.

    Attributes:
        settings: What was measured.
        value: The worst (found) or mean loss increase L(w + δ) − L(w).
        loss: L(w), on the same samples.
        std_error: The Monte-Carlo standard error over the draws (average case; None for the
            worst case).
        sampling: The data's jackknife standard error (None: not estimated).
        shards: The shards of that jackknife (None: not estimated).
        history: Worst case: the loss increase at each iterate (u = 0 first); average case:
            each draw's.
        perturbation_norm: ‖u‖_p = ‖δ ⊘ (|w| + η)‖_p of the worst case's found δ (≤ ρ); None for
            the average case.
        n_gradients: Full-data gradients taken.
        n_losses: Full-data losses taken (shard losses counted together as one full loss).
        seconds: The wall-clock time.
        replicates: The value without shard j, for every shard j, whose spread :attr:`sampling`
            is (None: not estimated): a paired comparison with another model on the same
            shards jackknifes them.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import Objective
        >>> data = [(torch.randn(16, 3), torch.randn(16, 1))]
        >>> objective = Objective(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss, data)
        >>> result = adaptive_sharpness(objective, shards=0)
        >>> result.value >= 0, len(result.history) == result.settings.steps + 1
        (True, True)
    """

    settings: AdaptiveSharpnessSettings
    value: float
    loss: float
    std_error: float | None
    sampling: float | None
    shards: int | None
    history: tuple[float, ...]
    perturbation_norm: float | None
    n_gradients: int
    n_losses: int
    seconds: float
    replicates: tuple[float, ...] | None = None

    @property
    def multiplier(self) -> float | None:
        """The 95 % interval's half-width in data standard errors (None: not estimated)."""
        return None if self.shards is None else t_quantile(self.shards - 1)

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95 % data interval ``value ± t·SE`` (None: not estimated)."""
        if self.sampling is None or self.multiplier is None:
            return None
        return interval(self.value, self.sampling, self.multiplier)


def adaptive_sharpness(
    objective: Objective,
    settings: AdaptiveSharpnessSettings | None = None,
    *,
    shards: int = 8,
    start: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> AdaptiveSharpnessResult:
    """The sharpness ``settings`` describe of ``objective``'s loss (the mean over its batches, the
    total with ``reduction`` sum; perturbing the parameters it selects), with its data
    uncertainty over ``shards`` shards (0: none). The model runs in eval mode (BatchNorm buffers
    untouched, or each batch's statistics with ``batch_stats``) and its weights are restored bit
    for bit.

    Args:
        objective: The model, loss, data and parameters (:class:`~sharpscope.curvature.Objective`).
        settings: What to measure (:class:`AdaptiveSharpnessSettings`; default: its defaults).
        shards: Shards of the data's jackknife (0: none, else at least 2).
        start: The worst case's first iterate u (flat, projected onto the ball; default 0).
        progress: Hears of each step or draw.

    Returns:
        An :class:`AdaptiveSharpnessResult`.

    Raises:
        InputError: ``shards`` is 1 or negative, or the data cannot run through the model.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import Objective
        >>> data = [(torch.randn(16, 3), torch.randn(16, 1))]
        >>> objective = Objective(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss, data)
        >>> settings = AdaptiveSharpnessSettings(kind="average", steps=4)
        >>> result = adaptive_sharpness(objective, settings, shards=0)
        >>> len(result.history), result.std_error is not None
        (4, True)
    """
    settings = settings or AdaptiveSharpnessSettings()
    if shards == 1 or shards < 0:
        raise InputError(f"`shards` must be 0 (off) or at least 2, got {shards}")
    op = HessianOperator(objective, cache_graph=False)
    return sharpness_of(op, settings, shards, start, progress)


def sharpness_of(
    op: HessianOperator,
    settings: AdaptiveSharpnessSettings,
    shards: int,
    start: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> AdaptiveSharpnessResult:
    """:func:`adaptive_sharpness` of the loss ``op`` describes (an operator without a cached
    graph: its weights move; of a sharded one, every vector is this rank's pieces and every norm
    is reduced over the ranks as a scalar, so the figures are one process's)."""
    began = time.perf_counter()
    w = op.flat_weights()
    scale = w.abs() + settings.eta if settings.adaptive else torch.ones_like(w)
    at_w = shard_losses(op, shards or 1)  # L(w) once, for the ascent and the jackknife
    base = _weighted(*at_w)
    if settings.kind == "worst":
        found = _ascent(op, scale, settings, base, start, progress)
        deltas, history, size = [scale * found.u], found.history, found.size
        gradients, losses = found.gradients, found.losses
    else:
        deltas = [scale * z for z in _draws(op, settings)]
        history, size, gradients, losses = (), None, 0, 0
    shifted, spread = _loss_differences(op, shards, at_w, deltas, progress)
    losses += 1 + len(deltas)
    std_error = None
    if settings.kind == "worst":
        value = history[found.best]  # the ascent's own record of its best iterate
    else:
        history = tuple(s - base for s in shifted)
        value, std_error = sum(history) / len(history), _mean_error(list(history))
    return AdaptiveSharpnessResult(
        settings=settings,
        value=value,
        loss=base,
        std_error=std_error,
        sampling=None if spread is None else jackknife_se(spread),
        shards=None if spread is None else len(spread),
        history=history,
        perturbation_norm=size,
        n_gradients=gradients,
        n_losses=losses,
        seconds=time.perf_counter() - began,
        replicates=None if spread is None else tuple(spread),
    )


@dataclass(frozen=True)
class _Found:
    """The worst case's best iterate and the ascent's record."""

    u: torch.Tensor
    best: int
    history: tuple[float, ...]
    size: float
    gradients: int
    losses: int


def _ascent(
    op: HessianOperator,
    scale: torch.Tensor,
    settings: AdaptiveSharpnessSettings,
    base: float,
    start: torch.Tensor | None,
    progress: Progress | None,
) -> _Found:
    """Projected normalised gradient ascent in u = δ ⊘ scale from the loss ``base`` at u = 0,
    keeping the best iterate."""
    rho, over = settings.rho, over_of(op)
    step = rho if settings.step_size is None else settings.step_size
    u = torch.zeros_like(scale) if start is None else _project(start.to(scale), settings, over)
    history: list[float] = []
    best_u, best = u, -1
    gradients = 0
    for _ in range(settings.steps):
        with op.shifted(scale * u):
            loss, g = op.loss_and_gradient()
        gradients += 1
        if progress is not None:
            progress("adaptive sharpness", gradients, settings.steps)
        history.append(loss - base)
        if best < 0 or history[-1] > history[best]:
            best_u, best = u, len(history) - 1
        direction = scale * g
        if settings.norm == "l2":
            size = norm(direction, over)
            if not size > 0:
                break  # a stationary point: the ascent cannot move
            direction = direction / size
        else:
            direction = direction.sign()
        u = _project(u + step * direction, settings, over)
    else:
        history.append(op.loss(scale * u) - base)
        if history[-1] > history[best]:
            best_u, best = u, len(history) - 1
    size = _norm(best_u, settings.norm, over)
    return _Found(best_u, best, tuple(history), size, gradients, len(history) - gradients)


def _project(
    u: torch.Tensor, settings: AdaptiveSharpnessSettings, over: Over | None = None
) -> torch.Tensor:
    """The Euclidean projection of ``u`` onto the ball ‖u‖_p ≤ ρ (a sharded ``u``'s norm summed
    ``over`` the ranks)."""
    if settings.norm == "linf":
        return u.clamp(-settings.rho, settings.rho)
    size = norm(u, over)
    return u * (settings.rho / size) if size > settings.rho else u


def _norm(u: torch.Tensor, kind: Norm, over: Over | None = None) -> float:
    """‖u‖₂ or ‖u‖_∞ (of a sharded ``u``: the squares summed ``over`` the ranks, or the largest
    rank's)."""
    if kind == "l2":
        return norm(u, over)
    largest = float(torch.linalg.vector_norm(u, ord=math.inf))
    return largest if over is None else max(distributed.all_gather(largest))


def _draws(op: HessianOperator, settings: AdaptiveSharpnessSettings) -> list[torch.Tensor]:
    """``steps`` seeded draws of ρz: z standard Gaussian (ℓ2) or uniform on [−1, 1] (ℓ∞), of
    whole vectors (the same on every rank), cut to this rank's pieces of a sharded ``op``'s."""
    generator = torch.Generator(device=op.device).manual_seed(settings.seed)
    shape = (dimension(op),)
    kwargs = dict(generator=generator, device=op.device, dtype=op.dtype)
    shards = shards_of(op)
    draws = []
    for _ in range(settings.steps):
        if settings.norm == "l2":
            z = torch.randn(shape, **kwargs)
        else:
            z = 2 * torch.rand(shape, **kwargs) - 1
        draws.append(settings.rho * (z if shards is None else shards.cut(z)))
    return draws


def _loss_differences(
    op: HessianOperator,
    shards: int,
    at_w: tuple[list[float], list[float]],
    deltas: list[torch.Tensor],
    progress: Progress | None,
) -> tuple[list[float], list[float] | None]:
    """The full-data loss at w + each δ, and the delete-one-shard replicates of the mean over the
    δs of the loss difference (None with fewer than two shards), from the shards' weights and
    losses ``at_w``. Each full-data loss is the shards' weighted mean, from one forward per
    batch (:func:`shard_losses`)."""
    weights, base = at_w
    shifted: list[list[float]] = []
    for delta in deltas:
        shifted.append(shard_losses(op, shards or 1, delta)[1])
        if progress is not None and len(deltas) > 1:  # the draws (the worst case: its one δ)
            progress("adaptive sharpness", len(shifted), len(deltas))
    full = [_weighted(weights, row) for row in shifted]
    if len(weights) < 2:
        return full, None
    per_shard = [sum(row[j] for row in shifted) / len(deltas) - base[j] for j in range(len(base))]
    return full, deleted_means(per_shard, weights)


def _weighted(weights: list[float], values: list[float]) -> float:
    return sum(w * x for w, x in zip(weights, values, strict=True))


def _mean_error(values: list[float]) -> float | None:
    """The standard error of the mean of ``values`` (None for a single value)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)

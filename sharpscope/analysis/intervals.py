"""The statistics of a figure's spread over other samples: jackknife standard errors, 95 %
intervals and the sample-size bias's range. Plain arithmetic (no torch), so that a saved report
is read, explained and gated without loading torch; :mod:`sharpscope.analysis.sampling` measures
the numbers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

T_975 = (12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student's t 97.5 % quantiles for 1 to 10 degrees of freedom (then 2.2 down to 1.96)."""


def t_quantile(dof: int) -> float:
    """The two-sided 95 % multiplier of a standard error with ``dof`` degrees of freedom."""
    if dof <= len(T_975):
        return T_975[dof - 1]
    return 1.96 + 2.4 / dof  # within 0.5 % of the exact quantile beyond 10 degrees of freedom


UNIT = (0.0, 1.0)
"""The range of |cos| and of a share: their intervals are clipped to it."""


def interval(
    value: float,
    se: float,
    multiplier: float,
    bounds: tuple[float, float] | None = None,
    bias: tuple[float, float] = (0.0, 0.0),
) -> tuple[float, float]:
    """``value − b ± multiplier·se`` over b in ``bias`` (the figure's sample-size bias) and b = 0,
    their hull, clipped to the figure's ``bounds`` (a cosine's [0, 1]): it always holds ``value``
    itself, the figure on the data given, even when the bias shifts the rest away from it."""
    centres = (value, value - bias[0], value - bias[1])
    low, high = min(centres) - multiplier * se, max(centres) + multiplier * se
    if bounds is not None:
        low, high = max(low, min(bounds[0], value)), min(high, max(bounds[1], value))
    return low, high


def rounded_outward(low: float, high: float, digits: int = 2) -> tuple[float, float]:
    """``low`` rounded down and ``high`` up to ``digits`` significant digits: an interval that,
    printed with that many digits, still holds every point the exact one holds."""
    return _round(low, digits, math.floor), _round(high, digits, math.ceil)


def _round(x: float, digits: int, direction: Callable[[float], int]) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    quantum = 10.0 ** (math.floor(math.log10(abs(x))) - digits + 1)
    return direction(x / quantum) * quantum


def samples_to_settle(n: int, value: float, reach: float, cut: float) -> int | None:
    """How many samples would keep the spread of ``value`` from reaching ``cut``, where its 95 %
    interval now reaches ``reach`` on that side with ``n`` samples: the excursion shrinks as
    1/√n (the jackknife SE does; a sample-size bias at least as fast), so about
    n·((reach − value)/(cut − value))²; None when ``value`` is on the cut."""
    if value == cut:
        return None
    return math.ceil(n * ((reach - value) / (cut - value)) ** 2)


def jackknife_se(replicates: Sequence[float]) -> float:
    """The grouped jackknife standard error of a figure from its delete-one-shard replicates."""
    m = len(replicates)
    mean = sum(replicates) / m
    return math.sqrt((m - 1) / m * sum((r - mean) ** 2 for r in replicates))


def paired_se(first: Sequence[float], second: Sequence[float], factor: float = 1.0) -> float:
    """The jackknife standard error of ``θ − factor·φ`` from both figures' replicates over the
    same shards (a paired comparison: the data's common part cancels)."""
    return jackknife_se([a - factor * b for a, b in zip(first, second, strict=True)])


def deleted_means(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """``Σᵢ≠ⱼ wᵢ xᵢ / Σᵢ≠ⱼ wᵢ`` for each shard j: the figure's mean without shard j."""
    total = sum(w * x for w, x in zip(weights, values, strict=True))
    return [(total - w * x) / (1 - w) for w, x in zip(weights, values, strict=True)]


def noise_corrected_se(per_probe: Sequence[Sequence[float]], weights: Sequence[float]) -> float:
    """The jackknife standard error of a figure linear in the shards' values, each shard's value
    estimated by the mean over probes (rows of ``per_probe``: one value per shard), the same
    probes for every shard. The probes' own scatter inflates the shards' spread by
    ``Σ_p Q(x_p − x̄)/(s(s − 1))`` (Q: the squared jackknife SE), which is subtracted; the result
    is never below that scatter's own size, what the probes can resolve."""
    s = len(per_probe)

    def squared(values: Sequence[float]) -> float:
        return jackknife_se(deleted_means(values, weights)) ** 2

    mean = [sum(column) / s for column in zip(*per_probe, strict=True)]
    noise = sum(squared([x - m for x, m in zip(row, mean, strict=True)]) for row in per_probe) / (
        s * (s - 1)
    )
    return math.sqrt(max(squared(mean) - noise, noise))


@dataclass(frozen=True)
class Figures:
    """One number per headline figure (None: not estimated): each top-k eigenvalue, λ₁ first,
    λ_min, |cos(ĝ, v₁)|, the top-k share ‖P_k ĝ‖ and the SAM sharpness."""

    eigenvalues: list[float | None]
    lambda_min: float | None
    cos_full: float | None = None
    topk_share: float | None = None
    sam_sharpness: float | None = None


@dataclass(frozen=True)
class SamplingErrors:
    """Each figure's jackknife standard error over ``shards`` shards (None: not estimated), the
    trace's, and the figures' sample-size ``bias`` (None: not estimated)."""

    shards: int
    eigenvalues: list[float]
    """One per top-k eigenvalue, λ₁ first."""
    lambda_min: float
    cos_full: float | None = None
    topk_share: float | None = None
    sam_sharpness: float | None = None
    trace: float | None = None
    """The trace's data standard error (None: no trace, or too few probes)."""
    bias: Figures | None = None
    """Each figure's bias at this sample size under a 1/n law, split-sample (docs/engine.md);
    under a 1/√n law it is :attr:`bias_factor` times as large. The trace has none (linear)."""
    n_products: int = 0
    """Products spent, in full-data products (a shard's costs its share of the samples)."""
    replicates: dict[str, list[float]] | None = None
    """Each figure without shard j, for every shard j (the delete-one-shard replicates whose
    spread the SEs are), by gate metric (``lambda_max``, ``lambda_min``, ``trace``,
    ``cos_full``, ``sam_sharpness``), and the shards' ``weights``: what a paired comparison of
    two reports on the same data jackknifes together (:func:`paired_se`)."""

    @property
    def multiplier(self) -> float:
        """The 95 % interval's half-width in standard errors (Student's t, m − 1 dof)."""
        return t_quantile(self.shards - 1)

    @property
    def bias_factor(self) -> float:
        """How much larger the bias is under a 1/√n law than under 1/n: (m − 1)/(√m − 1)."""
        return bias_factor(self.shards)


def bias_factor(shards: int) -> float:
    """(m − 1)/(√m − 1) = √m + 1: a split-sample bias under 1/√n over the one under 1/n."""
    return math.sqrt(shards) + 1


COSINES = ("cos_full", "topk_share")
"""Figures whose split-sample bias is allowed either sign: a shard re-solves v₁ as well as ĝ, and
at n/m samples the cosine can move the other way than at n (the benchmark CNN: estimated −0.02,
actual +0.17, docs/benchmarks.md §8)."""


def bias_range(bias: float | None, factor: float, signed: bool = True) -> tuple[float, float]:
    """The range of a figure's bias, from its 1/n estimate to ``factor`` times it (0 when none);
    not ``signed``: ± ``factor`` times its size (a cosine's, :data:`COSINES`)."""
    if bias is None:
        return (0.0, 0.0)
    return (bias, factor * bias) if signed else (-factor * abs(bias), factor * abs(bias))

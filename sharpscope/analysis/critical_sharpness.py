"""Critical sharpness, a forward-only proxy of λ_max (Kalra et al. 2026, "A Scalable Measure of
Loss Landscape Curvature for Analyzing the Training Dynamics of LLMs", arXiv 2601.16979).

Given an update direction d (the optimizer's step per unit learning rate; −g for gradient
descent), the critical learning rate η_c is the smallest η at which the loss increases,
L(w + η d) > L(w), and the critical sharpness is λ_c = 2/η_c. On a quadratic,
L(w + η d) − L(w) = η gᵀd + ½ η² dᵀHd, so λ_c = dᵀHd / (−gᵀd): for d = −g the Rayleigh quotient
gᵀHg/gᵀg = Σ λ_i c_i² (c_i the cosines of g with the eigenvectors), never above λ_max.

The search takes forward passes only: from a first step ``eta``, it doubles (or halves) η until
the loss's increase changes sign, then bisects the bracket in log space until its ends are within
a factor 1 + ``rtol``. A loss that is not finite counts as an increase. The result is the bracket
[η_lo, η_hi] the search ended with, so λ_c lies in [2/η_hi, 2/η_lo]; a search that reaches the
end of its range without a sign change says so (λ_c below 2/η_max, or above 2/η_min).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from sharpscope.curvature import CurvatureOperator, HessianOperator, Objective
from sharpscope.curvature.shards import over_of
from sharpscope.curvature.vectors import norm
from sharpscope.errors import InputError

Status = Literal["bracketed", "never-increases", "increases-at-once", "zero-direction"]
GROWTH = 2.0
"""The factor the bracketing phase moves η by per pass."""


def bisections(rtol: float) -> int:
    """The bisections that shrink a bracket of ratio :data:`GROWTH` to at most 1 + ``rtol``."""
    return max(0, math.ceil(math.log2(math.log(GROWTH) / math.log1p(rtol))))


def pass_bound(span: int, rtol: float) -> int:
    """The most forward passes a search takes: the base loss, at most ``span`` + 1 bracketing
    steps and :func:`bisections` ``(rtol)``."""
    return 1 + span + 1 + bisections(rtol)


@dataclass(frozen=True)
class CriticalSharpness:
    """The critical sharpness along one direction, as the bracket the search ended with.

    Attributes:
        direction: What the direction is (``-gradient``, ``update``).
        eta_low: The largest step tried at which the loss did not increase (0: none).
        eta_high: The smallest step tried at which it did (inf: none).
        passes: The forward passes (loss evaluations) the search took.
        status: ``bracketed``, ``never-increases`` (within the range: λ_c below 2/η_max),
            ``increases-at-once`` (at the smallest step: λ_c above 2/η_min) or ``zero-direction``.
    """

    direction: str
    eta_low: float
    eta_high: float
    passes: int
    status: Status
    quadratic: float | None = None
    """The quadratic model's λ_c along the direction, dᵀHd/(−gᵀd), where a product gave it."""

    @property
    def low(self) -> float:
        """The lower end of λ_c's interval, 2/η_hi (0 when the loss never increased)."""
        return 2 / self.eta_high if self.status != "zero-direction" else math.nan

    @property
    def high(self) -> float:
        """The upper end of λ_c's interval, 2/η_lo (inf when it increased at once)."""
        if self.status == "zero-direction":
            return math.nan
        return 2 / self.eta_low if self.eta_low > 0 else math.inf

    @property
    def value(self) -> float | None:
        """The bracket's geometric middle, 2/√(η_lo η_hi); None unless ``bracketed``."""
        if self.status != "bracketed":
            return None
        return 2 / math.sqrt(self.eta_low * self.eta_high)


def critical_sharpness(
    op_or_objective: CurvatureOperator | Objective,
    direction: torch.Tensor,
    *,
    name: str = "-gradient",
    eta: float = 1.0,
    span: int = 20,
    rtol: float = 0.05,
    base_loss: float | None = None,
) -> CriticalSharpness:
    """The critical sharpness 2/η_c along ``direction`` (flat, in the operator's parameter order),
    by at most :func:`pass_bound` ``(span, rtol)`` forward passes; the weights are restored bit
    for bit after each.

    Args:
        op_or_objective: An operator (its ``loss(delta)`` is used) or an objective.
        direction: The update per unit step, e.g. −g.
        name: What the direction is, for the report.
        eta: The first step tried (a good guess, e.g. the last η_c, saves passes).
        span: The search range is [eta·2^-span, eta·2^span].
        rtol: Stop when η_hi/η_lo ≤ 1 + rtol.
        base_loss: L(w), when already known (one pass fewer).

    Returns:
        The :class:`CriticalSharpness` bracket.

    Raises:
        InputError: ``eta`` or ``rtol`` not positive, ``span`` negative, or L(w) not finite.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import Objective
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> objective = Objective(model, torch.nn.functional.mse_loss, [(x, torch.ones(2, 1))])
        >>> found = critical_sharpness(objective, torch.tensor([0.0, 1.0], dtype=torch.float64))
        >>> found.status, found.low <= 4.0 <= found.high  # along e₂, H = diag(1, 4)
        ('bracketed', True)
    """
    if not (eta > 0 and math.isfinite(eta)) or not rtol > 0 or span < 0:
        raise InputError(
            f"`eta` and `rtol` must be positive and `span` at least 0, got {eta}, {rtol}, {span}"
        )
    op = op_or_objective
    if isinstance(op, Objective):
        op = HessianOperator(op, validate=False)
    if norm(direction, over_of(op)) == 0:  # every rank's pieces of a sharded one
        return CriticalSharpness(name, 0.0, math.inf, 0, "zero-direction")
    passes = 0
    if base_loss is None:
        base_loss, passes = op.loss(), 1
    if not math.isfinite(base_loss):
        raise InputError(f"the loss is {base_loss} at these weights: it has no critical sharpness")

    def increases(step: float) -> bool:
        nonlocal passes
        passes += 1
        return not op.loss(step * direction) <= base_loss  # NaN counts as an increase

    low, high = 0.0, math.inf
    smallest, largest = eta * GROWTH**-span, eta * GROWTH**span
    if increases(eta):  # halve until it does not
        high, step = eta, eta / GROWTH
        while low == 0 and step >= smallest:
            if increases(step):
                high, step = step, step / GROWTH
            else:
                low = step
    else:  # double until it does
        low, step = eta, eta * GROWTH
        while high == math.inf and step <= largest:
            if increases(step):
                high = step
            else:
                low, step = step, step * GROWTH
    if high == math.inf:
        return CriticalSharpness(name, low, high, passes, "never-increases")
    if low == 0:
        return CriticalSharpness(name, low, high, passes, "increases-at-once")
    for _ in range(bisections(rtol)):  # the bracket's ratio is GROWTH
        middle = math.sqrt(low * high)
        if increases(middle):
            high = middle
        else:
            low = middle
    return CriticalSharpness(name, low, high, passes, "bracketed")

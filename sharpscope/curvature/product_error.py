"""How far an operator's products are from the model's float64 Hessian: measured once per run on
one vector and folded into the eigenvalue bounds and ``converged`` flags (docs/engine.md). Two
errors are counted: a float32 (or bfloat16) operator's rounding, and a finite-difference
operator's truncation and rounding, which it estimates itself (``fd_error``).

For a unit v and λ̂ its Rayleigh quotient, the residual ‖H₃₂v − λ̂v‖ bounds λ̂'s distance to an
eigenvalue of the float32 operator; ‖H₆₄v − λ̂v‖ ≤ ‖H₃₂v − λ̂v‖ + ‖(H₃₂ − H₆₄)v‖ bounds its
distance to one of the model's Hessian. The second term is what this module measures.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from sharpscope.curvature.operator import CurvatureOperator
from sharpscope.curvature.results import EigenResult
from sharpscope.curvature.shards import over_of, shards_of
from sharpscope.curvature.vectors import norm
from sharpscope.structures import sample_count, split

FLOAT64_SHARE = 8
"""The float64 reference is taken when the float64 copy of the model's parameters and buffers
takes at most 1/8 of the free memory (the rest for its gradient graph and one batch's float64
activations, no graph cached across batches), or when the free memory is unknown."""

PROXY_FACTOR = 10.0
"""The reordered product's difference, times this, stands for the float64 one. Calibrated on
ResNet-shaped CNNs (docs/engine.md): the difference was 0.73–0.87 of the float64 measure where
float32 rounding is the only error (CPU), 0.22 where the convolutions compute in bfloat16 (as
TF32 ones do on a GPU), whose per-sample rounding another batch order repeats."""

FAILURES = (RuntimeError, TypeError, ValueError, NotImplementedError, copy.Error)
"""What a model that cannot run in float64 (or on half batches) raises."""


@dataclass(frozen=True)
class ProductError:
    """‖(H_op − H₆₄)v‖ for one unit v (``absolute``), over ‖Hv‖ (``relative``), and how it was
    measured: ``float64`` (a product of a float64 copy), ``reordered`` (a second product in
    another summation order, times :data:`PROXY_FACTOR`) or ``finite-difference`` (a float64
    finite-difference operator: its own estimate alone)."""

    absolute: float
    relative: float
    method: str
    dtype: str
    """The operator's dtype (``float32``)."""
    finite_difference: float | None = None
    """A finite-difference operator's estimated relative error (``fd_error``), whose share
    ``finite_difference``·‖Hv‖ is in ``absolute``; None for the other backends."""

    def widened(self, result: EigenResult, tol: float, scale: float) -> EigenResult:
        """``result`` with this error in its bounds, and converged only where the bound meets
        ``tol`` · ``scale`` (the spectral scale the solver used)."""
        bounds = result.residuals + self.absolute
        return replace(
            result,
            product_error=self.absolute,
            converged=result.converged & (bounds <= tol * scale),
        )

    def notes(self, tol: float, scale: float) -> list[str]:
        """One note when the error alone exceeds the tolerance: the bounds cannot meet it."""
        if self.absolute <= tol * scale:
            return []
        if self.method == "finite-difference":
            what, remedy = "finite-difference products are", "`backend` double-backward"
        elif (fd := self.finite_difference) is not None:
            what = f"{self.dtype} finite-difference products (estimate {fd:.1e}) are"
            remedy = "`backend` double-backward or `dtype` float64"
        else:
            what, remedy = f"{self.dtype} products are", "`dtype` float64"
        return [
            f"{what} {self.relative:.1e} (relative) away from float64 ones "
            f"({self.method} measure), above tol={tol:g}: the eigenvalues are expected within "
            f"{self.absolute:.2g} of the model's, not the tolerance; use {remedy}"
        ]


def error_products(op: CurvatureOperator, vectors: int = 1) -> int:
    """The products :func:`product_error` takes on ``op`` for ``vectors`` unit vectors: below
    float64 2 (the operator's and a float64 or reordered one); for a finite-difference operator
    one more (at twice its step) and 2 per further vector; 0 for a float64 operator of the other
    backends (nothing to measure)."""
    difference = getattr(op, "backend", None) == "finite-difference"
    narrow = op.dtype != torch.float64
    return (narrow or difference) + narrow + (2 * vectors - 1 if difference else 0)


def product_error(
    op: CurvatureOperator,
    v: torch.Tensor,
    available: int | None,
    others: Sequence[torch.Tensor] = (),
) -> ProductError | None:
    """The error of ``op``'s products on the unit vector ``v``: below float64, by a float64
    product when its copy of the model fits in ``available`` bytes (:data:`FLOAT64_SHARE`), by
    the reordered proxy otherwise; for a finite-difference operator, plus the largest of its own
    Richardson estimates on ``v`` and on the unit vectors ``others``
    (:meth:`~sharpscope.curvature.HessianOperator.difference_error`: its error differs from
    vector to vector). On sharded vectors (:mod:`~sharpscope.curvature.shards`) the norms are
    summed over the ranks and a float32 operator's error is the reordered proxy's (a float64
    copy of a sharded model is not made). None where there is nothing to measure; the products
    (:func:`error_products`) count on ``op``."""
    if error_products(op) == 0:
        return None
    image = op.matvec(v)
    scale = max(norm(image, over_of(op)), torch.finfo(torch.float64).tiny)
    difference = getattr(op, "backend", None) == "finite-difference"
    estimated, fd = 0.0, None
    if difference:
        estimates = [op.difference_error(u, op.matvec(u)) for u in others]  # type: ignore[attr-defined]
        estimated = max([op.difference_error(v, image), *estimates])  # type: ignore[attr-defined]
        fd = estimated / scale
        op.check_smooth(fd)  # type: ignore[attr-defined]  # a kink's differences: refused
    if op.dtype == torch.float64:
        return ProductError(estimated, estimated / scale, "finite-difference", "float64", fd)
    op.n_products += 1
    measured, method = _measured(op, v, image, available)
    total = measured + estimated
    return ProductError(total, total / scale, method, _name(op.dtype), fd)


def _measured(
    op: CurvatureOperator, v: torch.Tensor, image: torch.Tensor, available: int | None
) -> tuple[float, str]:
    """‖(H_op − H₆₄)v‖ by a float64 product where it fits and runs (whole vectors only), else by
    the reordered proxy (each rank reorders its own batches), with the method's name."""
    if shards_of(op) is None and _float64_fits(op, available):
        try:
            return norm(image.double() - _wide(op).matvec(v.double())), "float64"
        except FAILURES:
            pass
    uncached = {"cache_graph": False} if "cache_graph" in op.settings else {}
    other = op.replace(op.objective.replace(batches=_reordered(op)), **uncached)
    return PROXY_FACTOR * norm((other.matvec(v) - image).double(), over_of(op)), "reordered"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _float64_fits(op: CurvatureOperator, available: int | None) -> bool:
    tensors = [*op.model.parameters(), *op.model.buffers()]
    wide = 8 * sum(t.numel() for t in tensors if t.is_floating_point())
    return available is None or FLOAT64_SHARE * wide <= available


def _wide(op: CurvatureOperator) -> CurvatureOperator:
    """The same operator on a float64 copy of the model (inputs are cast as they are placed)."""
    with warnings.catch_warnings():  # deep-copying a TorchScript module reads non-leaf .grad
        warnings.filterwarnings("ignore", "The .grad attribute of a Tensor that is not a leaf")
        model = copy.deepcopy(op.model).double()
    return op.replace(op.objective.replace(model=model), cache_graph=False)


def _reordered(op: CurvatureOperator) -> list[tuple[Any, Any]]:
    """The batches in reverse order, each cut in two halves unless BatchNorm uses batch
    statistics (whose function depends on the batch)."""
    reordered = []
    for inputs, targets in reversed(op.batches):
        samples = sample_count(inputs, "inputs")
        if op.batch_stats or samples < 2:
            reordered.append((inputs, targets))
            continue
        half = (samples + 1) // 2
        reordered += list(zip(split(inputs, half), split(targets, half), strict=True))
    return reordered

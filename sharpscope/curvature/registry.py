"""The curvature matrices by name, and the one way to build one from its name."""

from __future__ import annotations

from typing import Any

from sharpscope.curvature.gauss_newton import EmpiricalFisherOperator, FisherOperator, GGNOperator
from sharpscope.curvature.hvp import Backend, HessianOperator
from sharpscope.curvature.objective import Objective
from sharpscope.curvature.operator import CurvatureOperator
from sharpscope.errors import check_choice

CURVATURES: dict[str, type[CurvatureOperator]] = {
    op.curvature: op
    for op in (HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator)
}
"""Each curvature matrix by its name: ``hessian``, ``ggn``, ``fisher`` (labels drawn from the
model), ``empirical-fisher`` (the data's labels)."""


def curvature_operator(
    name: str,
    objective: Objective,
    *,
    backend: Backend = "double-backward",
    seed: int = 0,
    cache_graph: bool = True,
    validate: bool = True,
) -> CurvatureOperator:
    """The curvature matrix called ``name`` of ``objective``'s loss, given those of the settings
    that its kind takes (:attr:`~sharpscope.curvature.operator.CurvatureOperator.settings`).

    Args:
        name: A key of :data:`CURVATURES`: ``hessian``, ``ggn``, ``fisher``, ``empirical-fisher``.
        objective: The model, loss, data and parameters (:class:`Objective`).
        backend: How the Hessian's products are taken (the Hessian only).
        seed: The seed of the Fisher's label draws (the Fisher only).
        cache_graph: Keep what products reuse for all batches.
        validate: Run the model and the loss on the first batch when built.

    Returns:
        The operator, a :class:`~sharpscope.curvature.operator.CurvatureOperator`.

    Raises:
        InputError: ``name`` is no curvature's, or the Fisher is asked of a user's loss.

    Examples:
        >>> import torch
        >>> data = [(torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> objective = Objective(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy, data)
        >>> op = curvature_operator("ggn", objective)
        >>> op.curvature, op.shape
        ('ggn', (8, 8))
    """
    check_choice("curvature", name, CURVATURES)
    kind = CURVATURES[name]
    given: dict[str, Any] = {"backend": backend, "seed": seed, "cache_graph": cache_graph}
    own = {key: value for key, value in given.items() if key in kind.settings}
    return kind(objective, **own, validate=validate)

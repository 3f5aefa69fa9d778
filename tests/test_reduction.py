"""``reduction``: a summed loss gives the Hessian of the total loss for any batch split, and a loss
that does not reduce as declared is refused when the operator is built (dense float64 truth)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Problem, dense_hessian

from sharpscope.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator
from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss


def summed_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="sum")


def dense(op: HessianOperator) -> torch.Tensor:
    return torch.stack([op.matvec(e) for e in torch.eye(op.size, dtype=torch.float64)], 1)


@pytest.mark.parametrize("size", [1, 3, 7, None])
def test_sum_loss_is_the_hessian_of_the_total(mlp: Problem, size: int | None) -> None:
    data = mlp.batches if size is None else mlp.split(size)
    truth = dense_hessian(mlp.model, summed_ce, mlp.inputs, mlp.targets)
    op = HessianOperator(mlp.model, summed_ce, data, reduction="sum")
    assert torch.allclose(dense(op), truth, atol=1e-10 * truth.abs().max())
    with torch.no_grad():
        total = float(summed_ce(mlp.model(mlp.inputs), mlp.targets))
    assert op.loss() == pytest.approx(total, rel=1e-12)


def test_builtin_sum_is_the_mean_times_the_terms(mlp: Problem) -> None:
    """A built-in loss sums as asked; the GGN and the empirical Fisher follow."""
    n = len(mlp.targets)
    for kind in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        mean = kind(mlp.model, resolve_loss("ce"), mlp.split(5))
        total = kind(mlp.model, resolve_loss("ce", reduction="sum"), mlp.split(9), reduction="sum")
        v = torch.randn(mean.size, dtype=torch.float64)
        assert torch.allclose(total.matvec(v), n * mean.matvec(v), rtol=1e-10, atol=1e-12)


def test_a_sum_declared_mean_is_refused(mlp: Problem) -> None:
    with pytest.raises(InputError, match=r"returns the sum of a batch.*pass `reduction` sum"):
        HessianOperator(mlp.model, summed_ce, mlp.split(8))
    with pytest.raises(InputError, match=r"returns the mean of a batch.*pass `reduction` mean"):
        HessianOperator(mlp.model, mlp.loss_fn, mlp.split(8), reduction="sum")


def test_a_batch_of_one_is_probed_with_the_next(mlp: Problem) -> None:
    with pytest.raises(InputError, match="pass `reduction` sum"):
        HessianOperator(mlp.model, summed_ce, mlp.split(1))


def test_stated_reductions_are_trusted_and_checked(mlp: Problem) -> None:
    """torch's losses and the built-ins say how they reduce: no probe, a mismatch refused."""
    HessianOperator(
        mlp.model, torch.nn.CrossEntropyLoss(reduction="sum"), mlp.batches, reduction="sum"
    )
    with pytest.raises(InputError, match="pass `reduction` mean"):
        HessianOperator(mlp.model, resolve_loss("ce"), mlp.batches, reduction="sum")

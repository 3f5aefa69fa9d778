"""Sharded flat vectors in one process (sharpscope.curvature.shards): Lanczos on an operator
whose ``shards`` cut a whole vector as a permutation follows the whole operator's run step by
step (the same start vector, cut), and the estimators that do not reduce over ranks yet refuse
it. On 2 ranks: tests/distributed/test_sharded.py."""

from __future__ import annotations

import pytest
import torch

from sharpscope.curvature import (
    MatrixOperator,
    SolveSettings,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq,
)
from sharpscope.curvature.shards import Shards
from sharpscope.curvature.vectors import random_vectors
from sharpscope.errors import InputError

N = 12


def _matrix() -> torch.Tensor:
    a = torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return a + a.T


def _permuted() -> tuple[MatrixOperator, torch.Tensor]:
    """P H Pᵀ, whose vectors are "sharded" as the permutation P (one rank holds every piece)."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    op = MatrixOperator(_matrix()[order][:, order])
    op.shards = Shards(N, lambda whole: whole[order])  # type: ignore[attr-defined]
    return op, order


def test_lanczos_on_sharded_vectors_follows_the_whole_run():
    op, order = _permuted()
    settings = SolveSettings(tol=1e-10, max_iter=N)
    ours = lanczos(op, k=3, settings=settings)
    theirs = lanczos(MatrixOperator(_matrix()), k=3, settings=settings)
    torch.testing.assert_close(ours.eigenvalues, theirs.eigenvalues, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.eigenvectors, theirs.eigenvectors[:, order])
    first = [[x for step in r.history[:4] for x in step] for r in (ours, theirs)]  # 4 steps
    assert first[0] == pytest.approx(first[1], rel=1e-12)  # from the same start vector
    assert ours.n_products == theirs.n_products


def test_draw_is_the_whole_draw_cut():
    op, order = _permuted()
    whole = random_vectors(2, N, torch.empty(0), torch.Generator().manual_seed(3))
    drawn = op.shards.draw(2, torch.empty(0), torch.Generator().manual_seed(3))
    assert torch.equal(drawn, whole[:, order])


@pytest.mark.parametrize("estimator", [power_iteration, hutchinson, hutchpp, slq])
def test_estimators_without_reductions_refuse_sharded_vectors(estimator):
    op, _ = _permuted()
    with pytest.raises(InputError, match=r"sharded over ranks yet .*`shards`.*use lanczos"):
        estimator(op)

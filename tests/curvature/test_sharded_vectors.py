"""Sharded flat vectors in one process (sharpscope.curvature.shards): every estimator on an
operator whose ``shards`` cut a whole vector as a permutation follows the whole operator's run
step by step (the same random vectors, cut). On 2 ranks: tests/distributed/test_sharded.py."""

from __future__ import annotations

import pytest
import torch

from sharpscope.curvature import (
    MatrixOperator,
    SolveSettings,
    deflated_trace,
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_extremes,
    power_iteration,
    slq,
)
from sharpscope.curvature.power import rayleigh
from sharpscope.curvature.shards import Shards
from sharpscope.curvature.vectors import random_vectors

N = 12


def _matrix() -> torch.Tensor:
    a = torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return a + a.T


SCALE = 2**-0.5


class _TwoCopies(Shards):
    """Two ranks that hold the same pieces, each 1/√2 times the whole vector's: the sum over them
    doubles a rank's partial dot products (a reduction that skips it is off by 2)."""

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        return 2 * partial


def _permuted() -> tuple[MatrixOperator, torch.Tensor]:
    """P H Pᵀ, whose vectors are "sharded" as the permutation P, scaled by 1/√2 (two ranks hold
    the same pieces: :class:`_TwoCopies`); P H Pᵀ maps the pieces of v to those of Hv."""
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    op = MatrixOperator(_matrix()[order][:, order])
    op.shards = _TwoCopies(N, lambda whole: whole[order] * SCALE)  # type: ignore[attr-defined]
    return op, order


def test_lanczos_on_sharded_vectors_follows_the_whole_run():
    op, order = _permuted()
    settings = SolveSettings(tol=1e-10, max_iter=N)
    ours = lanczos(op, k=3, settings=settings)
    theirs = lanczos(MatrixOperator(_matrix()), k=3, settings=settings)
    torch.testing.assert_close(ours.eigenvalues, theirs.eigenvalues, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.eigenvectors, theirs.eigenvectors[:, order] * SCALE)
    first = [[x for step in r.history[:4] for x in step] for r in (ours, theirs)]  # 4 steps
    assert first[0] == pytest.approx(first[1], rel=1e-12)  # from the same start vector
    assert ours.n_products == theirs.n_products


def test_draw_is_the_whole_draw_cut():
    op, order = _permuted()
    float64 = torch.empty(0, dtype=torch.float64)
    whole = random_vectors(2, N, float64, torch.Generator().manual_seed(3))
    drawn = op.shards.draw(2, torch.empty(0), torch.Generator().manual_seed(3))
    assert torch.equal(drawn, (whole[:, order] * SCALE).float())  # cut in float64, then cast


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["largest", "smallest"])  # smallest: shifted, drawn again
def test_power_iteration_on_sharded_vectors_follows_the_whole_run(which):
    op, order = _permuted()
    settings = SolveSettings(tol=1e-8, max_iter=400)
    ours = power_iteration(op, k=2, which=which, settings=settings)
    theirs = power_iteration(MatrixOperator(_matrix()), k=2, which=which, settings=settings)
    _same(ours.eigenvalues, theirs.eigenvalues)
    _same(ours.eigenvectors, theirs.eigenvectors[:, order] * SCALE)
    _same(ours.residuals, theirs.residuals)
    assert ours.n_products == theirs.n_products


def test_rayleigh_on_sharded_vectors_equals_the_whole_one():
    op, order = _permuted()
    v = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours, theirs = rayleigh(op, v[order] * SCALE), rayleigh(MatrixOperator(_matrix()), v)
    _same(ours.eigenvalues, theirs.eigenvalues)
    _same(ours.residuals, theirs.residuals)


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_traces_on_sharded_vectors_equal_the_whole_ones(estimator):
    op, _ = _permuted()
    settings = SolveSettings(tol=1e-3, max_iter=30)
    ours, theirs = (
        estimator(op, settings=settings),
        estimator(MatrixOperator(_matrix()), settings=settings),
    )
    _same(ours.samples, theirs.samples)
    assert ours.estimate == pytest.approx(theirs.estimate, rel=1e-10)
    assert ours.std_error == pytest.approx(theirs.std_error, rel=1e-10)
    assert ours.n_products == theirs.n_products


def test_deflated_trace_on_sharded_vectors_equals_the_whole_one():
    found = []
    for op in (_permuted()[0], MatrixOperator(_matrix())):
        top, _ = lanczos_extremes(op, 2, settings=SolveSettings(max_iter=5), keep_subspace=True)
        found.append(deflated_trace(op, top.subspace, settings=SolveSettings(max_iter=30)))
    ours, theirs = found
    _same(ours.samples, theirs.samples)
    assert ours.estimate == pytest.approx(theirs.estimate, rel=1e-10)
    assert ours.std_error == pytest.approx(theirs.std_error, rel=1e-10)


def test_slq_on_sharded_vectors_equals_the_whole_one():
    op, _ = _permuted()
    ours, theirs = (
        slq(op, n_vectors=2, n_iter=6),
        slq(MatrixOperator(_matrix()), n_vectors=2, n_iter=6),
    )
    for a, b in zip(ours.nodes + ours.weights, theirs.nodes + theirs.weights, strict=True):
        _same(a, b)
    assert ours.size == theirs.size == N

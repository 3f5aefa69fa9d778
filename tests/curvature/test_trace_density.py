"""Trace estimators and stochastic Lanczos quadrature against the dense Hessian."""

from __future__ import annotations

import math

import pytest
import torch

from sharpscope.curvature import (
    HessianOperator,
    MatrixOperator,
    Objective,
    SolveSettings,
    hutchinson,
    hutchpp,
    lanczos_extremes,
    slq,
)
from sharpscope.curvature.trace import deflated_trace
from sharpscope.curvature.vectors import random_vectors


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_trace_within_three_standard_errors(problem, estimator):
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    result = estimator(op, settings=SolveSettings(tol=1e-3, max_iter=200, seed=3))
    exact = float(problem.hessian.trace())
    assert 0 < result.std_error < math.inf
    assert abs(result.estimate - exact) <= 3 * result.std_error
    assert result.n_products == op.n_products
    assert result.samples.numel() == result.n_samples


def test_hutchinson_standard_error_is_the_sample_standard_error(mlp):
    result = hutchinson(MatrixOperator(mlp.hessian), settings=SolveSettings(tol=0.0, max_iter=50))
    assert not result.converged
    assert result.n_samples == 50
    assert result.estimate == pytest.approx(float(result.samples.mean()), rel=1e-12)
    assert result.std_error == pytest.approx(float(result.samples.std()) / math.sqrt(50), rel=1e-12)


def test_trace_stops_once_the_standard_error_is_small(mlp):
    op = MatrixOperator(mlp.hessian)
    loose = hutchinson(op, min_samples=10, settings=SolveSettings(tol=0.5, max_iter=500))
    assert loose.converged
    assert loose.n_samples == 10
    assert loose.std_error <= 0.5 * abs(loose.estimate)


def test_hutchpp_is_exact_with_a_full_sketch(mlp):
    op = MatrixOperator(mlp.hessian)
    result = hutchpp(op, sketch=op.size, min_samples=2)
    assert result.estimate == pytest.approx(float(mlp.hessian.trace()), rel=1e-10)
    assert result.std_error == pytest.approx(0.0, abs=1e-10)


def test_hutchpp_has_lower_error_than_hutchinson_on_a_spiked_spectrum():
    """Hutch++ removes the outlier eigenvalues, which carry most of Hutchinson's variance."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    values = torch.cat(
        [
            torch.tensor([100.0, 60.0, 40.0]),
            0.1 * torch.rand(197, generator=gen, dtype=torch.float64),
        ]
    )
    op = MatrixOperator(q @ torch.diag(values) @ q.T)
    plain = hutchinson(op, settings=SolveSettings(tol=0.0, max_iter=40))
    sketched = hutchpp(op, sketch=10, settings=SolveSettings(tol=0.0, max_iter=20))
    assert sketched.n_products == plain.n_products
    assert sketched.std_error < plain.std_error / 10
    assert abs(sketched.estimate - float(values.sum())) <= 3 * sketched.std_error


def test_slq_moments_are_exact_quadrature(mlp):
    """m Lanczos steps integrate polynomials of degree < 2m exactly: Σ w θʲ = qᵀHʲq."""
    op = MatrixOperator(mlp.hessian)
    density = slq(op, n_vectors=2, n_iter=10, seed=5)
    gen = torch.Generator().manual_seed(5)
    like = torch.empty(0, dtype=torch.float64)
    for nodes, weights in zip(density.nodes, density.weights, strict=True):
        z = random_vectors(1, op.size, like, gen, "rademacher")[0]
        q = z / z.norm()
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
        power = q
        for degree in range(1, 8):
            power = mlp.hessian @ power
            assert float((weights * nodes**degree).sum()) == pytest.approx(
                float(q @ power), rel=1e-9, abs=1e-14
            )


def test_slq_mean_estimates_trace_over_n(problem):
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    density = slq(op, n_vectors=30, n_iter=20, seed=1)
    per_vector = torch.tensor(
        [
            float((w * t).sum()) * op.size
            for t, w in zip(density.nodes, density.weights, strict=True)
        ],
        dtype=torch.float64,
    )
    assert density.mean * op.size == pytest.approx(float(per_vector.mean()), rel=1e-12)
    error = float(per_vector.std()) / math.sqrt(len(per_vector))
    assert abs(density.mean * op.size - float(problem.hessian.trace())) <= 3 * error
    assert density.n_products == 30 * 20


def test_smoothed_density_integrates_to_one_and_covers_the_extremes(cnn):
    evals = torch.linalg.eigvalsh(cnn.hessian)
    density = slq(MatrixOperator(cnn.hessian), n_vectors=3, n_iter=40)
    grid, values = density.smoothed(points=4000)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)
    assert float(grid[0]) < float(evals[0]) and float(grid[-1]) > float(evals[-1])
    assert (values >= 0).all()


def test_slq_stops_at_an_invariant_subspace():
    op = MatrixOperator(torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0], dtype=torch.float64)))
    density = slq(op, n_vectors=1, n_iter=4)
    assert density.n_products == 2
    assert sorted(density.nodes[0].tolist()) == pytest.approx([1.0, 3.0])


def double_backward_hessian(problem) -> torch.Tensor:
    """The dense Hessian of the mean loss, a row per parameter by autograd double backward."""
    params = [p for p in problem.model.parameters() if p.requires_grad]
    loss = problem.loss_fn(problem.model(problem.inputs), problem.targets)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.autograd.grad(g, params, retain_graph=True) for g in grad]
    return torch.stack([torch.cat([r.reshape(-1) for r in row]) for row in rows]).detach()


@pytest.fixture(scope="module")
def mlp_hessian(mlp) -> torch.Tensor:
    return double_backward_hessian(mlp)


def test_the_krylov_basis_is_traced_exactly(mlp, mlp_hessian):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    top, bottom = lanczos_extremes(
        op, 5, k_smallest=1, keep_subspace=True, settings=SolveSettings(tol=1e-4)
    )
    basis = top.subspace.basis
    assert bottom.subspace is top.subspace and 0 < len(basis) < op.size
    assert top.subspace.trace == pytest.approx(float((basis @ mlp_hessian @ basis.T).trace()))
    torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis), dtype=basis.dtype))


def test_reusing_the_eigen_stage_takes_fewer_products_than_hutchpp(mlp, mlp_hessian):
    """Same standard-error target: the deflated remainder has less variance than Hutch++'s, and
    its exactly traced part costs no product (the eigen stage paid for it)."""
    exact = float(mlp_hessian.trace())
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    top, _ = lanczos_extremes(
        op, 5, k_smallest=1, keep_subspace=True, settings=SolveSettings(tol=1e-4)
    )
    reused = deflated_trace(
        op, top.subspace, settings=SolveSettings(tol=0.05, max_iter=200, seed=1)
    )
    plain = hutchpp(op, settings=SolveSettings(tol=0.05, max_iter=200, seed=1))
    assert reused.converged and plain.converged
    assert reused.n_products < plain.n_products / 2
    assert reused.std_error <= 0.05 * abs(reused.estimate)
    low, high = reused.interval
    assert low < exact < high
    fixed = deflated_trace(op, top.subspace, settings=SolveSettings(tol=0.0, max_iter=60, seed=2))
    sketched = hutchpp(op, sketch=10, settings=SolveSettings(tol=0.0, max_iter=40, seed=2))
    assert fixed.n_products == sketched.n_products == 60
    assert fixed.std_error < sketched.std_error / 1.3


def test_the_95_percent_interval_covers_the_exact_trace(mlp_hessian):
    """Over 100 seeds (a fresh Krylov basis and fresh probes each), the interval estimate ± t·SE
    of 20 samples holds the dense Hessian's trace at least 90 times (95 expected at least: the
    Gaussian-probe standard error bounds the Rademacher one)."""
    exact = float(mlp_hessian.trace())
    op = MatrixOperator(mlp_hessian)
    covered = 0
    for seed in range(100):
        top, _ = lanczos_extremes(
            op, 5, k_smallest=1, keep_subspace=True, settings=SolveSettings(tol=1e-2, seed=seed)
        )
        result = deflated_trace(
            op, top.subspace, settings=SolveSettings(tol=0.0, max_iter=20, seed=seed)
        )
        low, high = result.interval
        covered += low <= exact <= high
    assert covered >= 90


def test_stopping_on_the_standard_error_keeps_the_intervals_coverage():
    """A matrix with a known trace (3 outliers, 6 mid-size eigenvalues the basis misses, a bulk),
    probes stopped once SE ≤ 1 %: over 100 seeds the interval holds the trace ≥ 93 times. Stopping
    on the samples' own spread instead stops when it happens to be small and covers 180/200."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    values = torch.cat(
        [
            torch.tensor([50.0, 20.0, 10.0]),
            3 * torch.rand(6, generator=gen, dtype=torch.float64),
            0.3 * torch.rand(191, generator=gen, dtype=torch.float64),
        ]
    )
    op = MatrixOperator(q @ torch.diag(values) @ q.T)
    top, _ = lanczos_extremes(
        op, 3, k_smallest=1, keep_subspace=True, settings=SolveSettings(tol=1e-2)
    )
    exact, covered, stopped = float(values.sum()), 0, 0
    for seed in range(100):
        result = deflated_trace(
            op, top.subspace, settings=SolveSettings(tol=0.01, max_iter=60, seed=seed)
        )
        low, high = result.interval
        covered += low <= exact <= high
        stopped += result.converged and result.n_samples < 60
    assert stopped >= 90  # the stopping rule, not the budget, ended the runs
    assert covered >= 93


def test_the_standard_error_is_the_gaussian_probe_one(mlp_hessian):
    """SE² = 2·mean‖PHPz‖²/n: the variance of a Gaussian probe's quadratic form, which bounds the
    Rademacher one (the two differ by 2·Σ B_ii², B = PHP)."""
    op = MatrixOperator(mlp_hessian)
    top, _ = lanczos_extremes(op, 5, k_smallest=1, keep_subspace=True)
    result = deflated_trace(op, top.subspace, settings=SolveSettings(tol=0.0, max_iter=30, seed=4))
    basis = top.subspace.basis
    projector = torch.eye(op.size, dtype=basis.dtype) - basis.T @ basis
    deflated = projector @ mlp_hessian @ projector
    generator = torch.Generator().manual_seed(4)
    like = torch.empty(0, dtype=torch.float64)
    probes = random_vectors(30, op.size, like, generator, "rademacher")
    images = probes @ deflated
    torch.testing.assert_close(result.samples, (probes * images).sum(1))
    variance = 2 * float((images**2).sum(1).mean())
    assert result.std_error == pytest.approx(math.sqrt(variance / 30), rel=1e-6)
    gaussian = 2 * float((deflated**2).sum())
    rademacher = gaussian - 2 * float((deflated.diagonal() ** 2).sum())
    assert rademacher < gaussian < 3 * variance and variance < 3 * gaussian


def test_the_budget_stops_the_trace_unconverged(mlp_hessian):
    op = MatrixOperator(mlp_hessian)
    top, _ = lanczos_extremes(op, 5, k_smallest=1, keep_subspace=True)
    result = deflated_trace(op, top.subspace, settings=SolveSettings(tol=1e-6, max_iter=7))
    assert not result.converged
    assert result.n_products == result.n_samples == 7
    low, high = result.interval
    assert low < result.estimate < high and 0 < result.std_error < math.inf
    assert "not converged" in repr(result) and "95% interval" in repr(result)

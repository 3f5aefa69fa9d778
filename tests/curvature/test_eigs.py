"""Lanczos and power iteration against dense eigendecompositions."""

from __future__ import annotations

import importlib

import pytest
import torch
from ground_truth import Shared

from sharpscope.curvature import (
    HessianOperator,
    MatrixOperator,
    Objective,
    SolveSettings,
    hessian_eigs,
    lanczos,
    power_iteration,
)
from sharpscope.curvature.lanczos import LanczosProcess, lanczos_extremes
from sharpscope.curvature.power import rayleigh

lanczos_module = importlib.import_module("sharpscope.curvature.lanczos")  # not the function


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b).abs() / (a.norm() * b.norm()))


def _check_pairs(result, eigenvalues, eigenvectors, op_matrix, rel=1e-8):
    """Values to ``rel`` relative, vectors to |cos| > 1 − ``rel``, residuals honest."""
    for i, (value, vector) in enumerate(zip(eigenvalues, eigenvectors.T, strict=True)):
        assert abs(float(result.eigenvalues[i]) - float(value)) <= rel * abs(float(value)), i
        assert _cos(result.eigenvectors[i], vector) > 1 - rel, i
        y = result.eigenvectors[i]
        true_residual = float((op_matrix @ y - result.eigenvalues[i] * y).norm())
        assert true_residual == pytest.approx(float(result.residuals[i]), abs=1e-12)
    assert result.all_converged


def test_lanczos_top5_and_bottom2_match_dense(problem):
    evals, evecs = torch.linalg.eigh(problem.hessian)
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    top = lanczos(op, 5, settings=SolveSettings(tol=1e-10))
    _check_pairs(top, evals.flip(0)[:5], evecs.flip(1)[:, :5], problem.hessian)
    assert top.n_products == op.n_products  # the multiplicity check's products included
    assert top.n_products - top.multiplicity.products < op.size
    bottom = lanczos(op, 2, which="smallest", settings=SolveSettings(tol=1e-10))
    _check_pairs(bottom, evals[:2], evecs[:, :2], problem.hessian)
    assert bottom.eigenvalues[0] < 0


def test_lanczos_largest_magnitude(cnn):
    evals = torch.linalg.eigvalsh(cnn.hessian)
    expected = evals[torch.argsort(evals.abs(), descending=True)[:3]]
    result = lanczos(
        MatrixOperator(cnn.hessian), 3, which="magnitude", settings=SolveSettings(tol=1e-10)
    )
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-8, atol=0)
    assert (result.eigenvalues < 0).any()


def test_lanczos_is_deterministic_for_a_seed(mlp):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    a, b = (
        lanczos(op, 3, settings=SolveSettings(seed=7)),
        lanczos(op, 3, settings=SolveSettings(seed=7)),
    )
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.history == b.history
    assert len(a.history) == a.n_iterations == a.n_products - 3  # + one check per pair


def test_lanczos_reports_non_convergence(mlp):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    result = lanczos(op, 5, settings=SolveSettings(tol=1e-12, max_iter=6))
    assert result.n_iterations == 6 and result.n_products == 6 + 5  # + one check per pair
    assert not result.all_converged
    assert (result.residuals > 1e-12 * result.eigenvalues.abs().max()).any()


def test_lanczos_continues_past_an_invariant_subspace():
    """With 3 distinct eigenvalues the Krylov space is exhausted after 3 products; Lanczos restarts
    orthogonally and still returns k genuine, orthonormal eigenpairs (single-vector Lanczos cannot
    promise to find every copy of a repeated eigenvalue: see docs/engine.md)."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    values = torch.tensor([5.0, 5.0, 5.0, 2.0] + [1.0] * 26, dtype=torch.float64)
    matrix = q @ torch.diag(values) @ q.T
    result = lanczos(MatrixOperator(matrix), 4, settings=SolveSettings(tol=1e-10))
    assert result.n_products > 3
    assert float(result.eigenvalues[0]) == pytest.approx(5.0, rel=1e-12)
    for value, vector in zip(result.eigenvalues, result.eigenvectors, strict=True):
        assert float((matrix @ vector - value * vector).norm()) < 1e-10
        assert float(value) in (pytest.approx(5.0), pytest.approx(2.0), pytest.approx(1.0))
    gram = result.eigenvectors @ result.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("max_basis", [7, 12])
def test_thick_restarts_keep_the_dense_answer_in_a_bounded_basis(problem, max_basis):
    """With at most ``max_basis`` vectors held (k + 2 and more), top-5 and bottom-2 still match
    the dense eigendecomposition: values to 1e-8, vectors, honest residuals."""
    evals, evecs = torch.linalg.eigh(problem.hessian)
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    top = lanczos(op, 5, settings=SolveSettings(tol=1e-10, max_iter=2000, max_basis=max_basis))
    _check_pairs(top, evals.flip(0)[:5], evecs.flip(1)[:, :5], problem.hessian)
    bottom = lanczos(
        op,
        2,
        which="smallest",
        settings=SolveSettings(tol=1e-10, max_iter=2000, max_basis=max_basis),
    )
    _check_pairs(bottom, evals[:2], evecs[:, :2], problem.hessian)
    full = lanczos(op, 5, settings=SolveSettings(tol=1e-10))
    assert top.n_products > full.n_products  # restarts cost products, never accuracy


@pytest.mark.parametrize("max_basis", [None, 7])
def test_kept_images_verify_the_pairs_without_a_product(problem, max_basis):
    """With ``keep_images`` (kept through thick restarts too) each returned pair's Rayleigh
    quotient, true residual and image Hv come from the basis's products: one product fewer per
    pair than the verifying product, the same dense answer."""
    evals, evecs = torch.linalg.eigh(problem.hessian)
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    settings = SolveSettings(tol=1e-10, max_iter=2000, max_basis=max_basis)
    kept = lanczos(op, 5, settings=settings, keep_images=True)
    checked = lanczos(op, 5, settings=settings)
    assert kept.n_products == checked.n_products - 5 and checked.images is None
    _check_pairs(kept, evals.flip(0)[:5], evecs.flip(1)[:, :5], problem.hessian)
    expected = kept.eigenvectors @ problem.hessian  # H symmetric: rows H v
    torch.testing.assert_close(kept.images, expected, rtol=1e-9, atol=1e-12)


def test_rayleigh_is_one_lanczos_step_with_its_image(problem):
    """One product from v: the Rayleigh quotient, the true residual and Hv, as Lanczos returns
    them after one kept step; a short Lanczos run allocates only the rows it can use."""
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fast = rayleigh(op, 3 * v, tol=1e-10)
    step = lanczos(op, 1, v0=v, keep_images=True, settings=SolveSettings(tol=1e-10, max_iter=1))
    unit = v / v.norm()
    exact = float(unit @ problem.hessian @ unit)
    assert fast.n_products == step.n_products == 1
    assert float(fast.eigenvalues[0]) == pytest.approx(exact, rel=1e-12)
    true = float((problem.hessian @ unit - exact * unit).norm())
    assert float(fast.residuals[0]) == pytest.approx(true, rel=1e-10)
    assert not bool(fast.converged[0])
    for ours, theirs in [
        (fast.eigenvalues, step.eigenvalues),
        (fast.residuals, step.residuals),
        (fast.eigenvectors, step.eigenvectors),
        (fast.images, step.images),
    ]:
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    process = LanczosProcess(op, v, torch.Generator(), keep_images=True, limit=2)
    for _ in range(2):
        process.step()
    assert process.basis.shape[0] == process.images.shape[0] == 2


@pytest.mark.parametrize("slab", [1 << 20, 7])
def test_a_restarted_process_keeps_the_lanczos_relation(mlp, monkeypatch, slab):
    """After thick restarts, H Q = Q T + β q eᵀ holds with the dense H, Q stays orthonormal and
    no more than ``capacity`` rows are ever allocated; also when the in-place rewrite of the
    basis goes in many slabs of coordinates."""
    monkeypatch.setattr(lanczos_module, "RESTART_COLUMNS", slab)
    hessian = mlp.hessian
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(hessian.shape[0], generator=gen, dtype=torch.float64)
    process = LanczosProcess(MatrixOperator(hessian), start, gen, capacity=8)
    restarts = 0
    for _ in range(30):
        process.step()
        q, t = process.vectors, process.projected()
        last = torch.zeros(process.count, dtype=torch.float64)
        last[-1] = process.beta
        relation = hessian @ q.T - q.T @ t - torch.outer(process._next, last)
        assert float(relation.abs().max()) < 1e-10
        eye = torch.eye(process.count, dtype=torch.float64)
        torch.testing.assert_close(q @ q.T, eye, atol=1e-10, rtol=0)
        assert process.basis.shape[0] <= 8
        if process.count == 8:
            theta, _, _ = process.ritz()
            process.restart(torch.argsort(theta, descending=True)[:4])
            restarts += 1
    assert process.steps == 30 and restarts == 6


@pytest.mark.parametrize("max_basis", [None, 9, 14])
def test_both_ends_from_one_run_match_dense(problem, max_basis):
    """lanczos_extremes: top-5 and bottom-2 to 1e-8 from one run (bounded or not), in fewer
    products than two runs; both results report that run's products."""
    evals, evecs = torch.linalg.eigh(problem.hessian)
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    top, bottom = lanczos_extremes(
        op, 5, k_smallest=2, settings=SolveSettings(tol=1e-10, max_iter=2000, max_basis=max_basis)
    )
    _check_pairs(top, evals.flip(0)[:5], evecs.flip(1)[:, :5], problem.hessian)
    _check_pairs(bottom, evals[:2], evecs[:, :2], problem.hessian)
    assert top.n_products == bottom.n_products == op.n_products
    assert (top.which, bottom.which) == ("largest", "smallest")
    if max_basis is None:
        apart = lanczos(op, 5, settings=SolveSettings(tol=1e-10)).n_products
        apart += lanczos(op, 2, which="smallest", settings=SolveSettings(tol=1e-10)).n_products
        assert top.n_products < apart
    with pytest.raises(ValueError, match="max_basis must be at least 5 \\+ 2 \\+ 2 = 9"):
        lanczos_extremes(op, 5, k_smallest=2, settings=SolveSettings(max_basis=8))


def test_max_basis_below_k_plus_2_is_refused(mlp):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    with pytest.raises(ValueError, match="max_basis must be at least k \\+ 2 = 5"):
        lanczos(op, 3, settings=SolveSettings(max_basis=4))


def test_lanczos_warm_start_converges_at_once(mlp):
    evals, evecs = torch.linalg.eigh(mlp.hessian)
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    result = lanczos(op, 1, v0=evecs[:, -1], settings=SolveSettings(tol=1e-6))
    assert result.n_products <= 2
    assert float(result.eigenvalues[0]) == pytest.approx(float(evals[-1]), rel=1e-10)


def test_power_iteration_matches_dense(problem):
    evals, evecs = torch.linalg.eigh(problem.hessian)
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    result = power_iteration(op, 2, settings=SolveSettings(tol=1e-9, max_iter=3000))
    _check_pairs(result, evals.flip(0)[:2], evecs.flip(1)[:, :2], problem.hessian, rel=1e-8)


def test_power_iteration_largest_is_never_a_negative_dominant_eigenvalue():
    """The official Eigen-SAM code returns the largest-|λ| pair; ours shifts to find λ_max."""
    values = torch.tensor([-4.0, 1.5, 1.0, 0.5, -0.2], dtype=torch.float64)
    matrix = torch.diag(values)
    largest = power_iteration(
        MatrixOperator(matrix), 1, which="largest", settings=SolveSettings(tol=1e-10, max_iter=2000)
    )
    assert float(largest.eigenvalues[0]) == pytest.approx(1.5, rel=1e-9)
    magnitude = power_iteration(
        MatrixOperator(matrix),
        1,
        which="magnitude",
        settings=SolveSettings(tol=1e-10, max_iter=2000),
    )
    assert float(magnitude.eigenvalues[0]) == pytest.approx(-4.0, rel=1e-9)
    smallest = power_iteration(
        MatrixOperator(-matrix),
        1,
        which="smallest",
        settings=SolveSettings(tol=1e-10, max_iter=2000),
    )
    assert float(smallest.eigenvalues[0]) == pytest.approx(-1.5, rel=1e-9)


def test_power_iteration_reports_non_convergence():
    matrix = torch.diag(torch.tensor([1.0, 0.999, 0.5], dtype=torch.float64))
    result = power_iteration(
        MatrixOperator(matrix), 1, settings=SolveSettings(tol=1e-10, max_iter=20)
    )
    assert result.n_products == 20
    assert not result.all_converged
    assert float(result.residuals[0]) > 1e-10


@pytest.mark.parametrize("solver", [lanczos, power_iteration])
def test_bad_arguments(solver, mlp):
    op = MatrixOperator(mlp.hessian)
    with pytest.raises(ValueError, match="which"):
        solver(op, which="middle")
    with pytest.raises(ValueError, match="k must be"):
        solver(op, k=0)
    with pytest.raises(ValueError, match="v0"):
        solver(op, v0=torch.zeros(3, dtype=torch.float64))


# --- repeated eigenvalues: every copy, as a dense eigendecomposition has it ----------------------


def _symmetric(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, generator=g, dtype=torch.float64)
    return (a + a.T) / 2


def _close_to_dense(result, dense: torch.Tensor, k: int, which: str = "largest", rel=1e-10):
    """The ``k`` values at ``which`` end equal the dense ones (copies included) to ``rel``·‖H‖."""
    evals = torch.linalg.eigvalsh(dense)
    expected = evals.flip(0)[:k] if which == "largest" else evals[:k]
    scale = float(evals.abs().max())
    torch.testing.assert_close(result.eigenvalues, expected, rtol=0, atol=rel * scale)
    assert result.all_converged


def test_lanczos_finds_triple_eigenvalues_of_a_block_diagonal_operator():
    """blockdiag(A, A, A): every eigenvalue three times; one Krylov sequence holds one copy."""
    a = _symmetric(10, 0)
    matrix = torch.block_diag(a, a, a)
    op = MatrixOperator(matrix)
    top = lanczos(op, 7, settings=SolveSettings(tol=1e-10))
    _close_to_dense(top, matrix, 7)
    check = top.multiplicity
    assert check.complete and check.starts >= 3 and 0 < check.products < top.n_products
    assert str(check).startswith("multiplicity checked:")
    bottom = lanczos(op, 4, which="smallest", settings=SolveSettings(tol=1e-10))
    _close_to_dense(bottom, matrix, 4, "smallest")
    both = lanczos_extremes(op, 5, k_smallest=3, settings=SolveSettings(tol=1e-10, max_iter=2000))
    _close_to_dense(both[0], matrix, 5)
    _close_to_dense(both[1], matrix, 3, "smallest")


@pytest.mark.parametrize("max_basis", [9, 14])
def test_thick_restarts_keep_the_copies(max_basis):
    a = _symmetric(12, 1)
    matrix = torch.block_diag(a, a, a)
    top = lanczos(
        MatrixOperator(matrix),
        5,
        settings=SolveSettings(tol=1e-10, max_iter=3000, max_basis=max_basis),
    )
    _close_to_dense(top, matrix, 5)
    assert top.multiplicity.complete


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-7), (torch.float32, 1e-4)])
def test_near_multiplicities_come_out_with_their_copies(dtype, tol):
    """blockdiag(A, A + 1e-8·I, A + 2e-8·I): triples 1e-8 apart (one value in float32), each
    found three times to the tolerance (without the fresh starts: 32 % of λ₁ off in float64).
    A pair mixing a locked vector with a copy inherits the locked one's dropped coupling: its
    flag and residual stay the true ones (docs/engine.md, repeated eigenvalues)."""
    a = _symmetric(12, 0)
    eye = torch.eye(12, dtype=torch.float64)
    matrix = torch.block_diag(a, a + 1e-8 * eye, a + 2e-8 * eye)
    top = lanczos(MatrixOperator(matrix.to(dtype)), 6, settings=SolveSettings(tol=tol))
    expected = torch.linalg.eigvalsh(matrix).flip(0)[:6]
    scale = float(expected[0])
    torch.testing.assert_close(top.eigenvalues, expected, rtol=0, atol=tol * scale)
    assert top.multiplicity.complete and top.multiplicity.starts >= 1
    vectors = top.eigenvectors.double()
    true = (vectors @ matrix - top.eigenvalues[:, None] * vectors).norm(dim=1)
    torch.testing.assert_close(top.residuals, true, rtol=1e-3, atol=1e-6 * scale)
    assert bool((top.residuals <= 2 * tol * scale).all())
    assert torch.equal(top.converged, top.residuals <= tol * scale)


def _dense_block(model, loss_fn, inputs, targets, prefix: str) -> torch.Tensor:
    """The Hessian over the parameters named ``prefix``… by autograd double backward."""
    named = model.named_parameters()
    params = [p for n, p in named if n.startswith(prefix) and p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model(inputs), targets), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [torch.autograd.grad(g, params, retain_graph=True) for g in flat]
    return torch.stack([torch.cat([r.reshape(-1) for r in row]) for row in rows])


@pytest.mark.parametrize("outputs", [2, 3, 4])
def test_an_mse_head_has_every_eigenvalue_outputs_times(outputs):
    """The output Linear's block under MSE is (ΣxxT) ⊗ I_D: each eigenvalue D times."""
    torch.manual_seed(outputs)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, outputs)
    ).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, outputs, dtype=torch.float64)
    loss = torch.nn.functional.mse_loss
    dense = _dense_block(model, loss, x, y, "2.")
    settings = SolveSettings(tol=1e-10)
    top = hessian_eigs(Objective(model, loss, [(x, y)], "2.*"), k=5, settings=settings)
    _close_to_dense(top, dense, 5)
    assert top.multiplicity.complete
    assert torch.allclose(top.eigenvalues[0], top.eigenvalues[outputs - 1], rtol=1e-10)


def test_a_tied_weight_mlps_head_keeps_its_copies():
    """A layer applied twice (a shared weight); the MSE head's block repeats each value 3 times,
    and the whole Hessian's top-k matches too."""
    torch.manual_seed(0)
    model = Shared().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    loss = torch.nn.functional.mse_loss
    settings = SolveSettings(tol=1e-10)
    head = hessian_eigs(Objective(model, loss, [(x, y)], "head.*"), k=6, settings=settings)
    _close_to_dense(head, _dense_block(model, loss, x, y, "head."), 6)
    whole = hessian_eigs(Objective(model, loss, [(x, y)]), k=6, settings=settings)
    _close_to_dense(whole, _dense_block(model, loss, x, y, ""), 6)

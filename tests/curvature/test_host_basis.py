"""The Lanczos basis in host memory (``basis_device="host"``), streamed to the device a slab of
vectors at a time: on the CPU the same memory, but the same streamed code path, forced here to
slabs of 2 vectors, gives the device path's answers."""

from __future__ import annotations

import importlib

import pytest
import torch

from sharpscope.curvature import HessianOperator, Objective, SolveSettings, deflated_trace
from sharpscope.curvature.lanczos import lanczos_extremes
from sharpscope.curvature.vectors import combine, orthogonalize

lanczos_module = importlib.import_module("sharpscope.curvature.lanczos")  # not the function


def _solve(problem, basis_device: str, max_basis: int | None, keep_images: bool):
    op = HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches))
    settings = SolveSettings(
        tol=1e-10, max_iter=2000, max_basis=max_basis, basis_device=basis_device
    )
    top, bottom = lanczos_extremes(
        op, 3, k_smallest=2, settings=settings, keep_subspace=True, keep_images=keep_images
    )
    trace = deflated_trace(op, top.subspace, settings=SolveSettings(tol=1e-3, max_iter=20))
    return top, bottom, trace


@pytest.mark.parametrize("keep_images", [False, True])
@pytest.mark.parametrize("max_basis", [None, 9])
def test_a_streamed_host_basis_gives_the_device_paths_answers(
    mlp, monkeypatch, max_basis, keep_images
):
    """Slabs of 2 vectors, with and without thick restarts and kept images: the same eigenpairs
    to 1e-12 (float64; a vector up to its sign, which a restart's rounding may flip), products and
    deflated trace as the basis kept whole on the device."""
    device = _solve(mlp, "device", max_basis, keep_images)
    monkeypatch.setattr(lanczos_module, "HOST_SLAB_BYTES", 2 * mlp.hessian.shape[0] * 8)
    host = _solve(mlp, "host", max_basis, keep_images)
    assert host[0].subspace.rows == 2 and device[0].subspace.rows is None
    for streamed, whole in zip(host[:2], device[:2], strict=True):
        assert streamed.n_products == whole.n_products
        torch.testing.assert_close(streamed.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=0)
        signs = (streamed.eigenvectors * whole.eigenvectors).sum(1).sign()[:, None]  # ±v alike
        vectors = signs * streamed.eigenvectors
        torch.testing.assert_close(vectors, whole.eigenvectors, rtol=0, atol=1e-12)
        if keep_images:
            torch.testing.assert_close(signs * streamed.images, whole.images, rtol=0, atol=1e-12)
    assert host[2].estimate == pytest.approx(device[2].estimate, rel=1e-12)
    assert host[2].n_samples == device[2].n_samples


def test_streamed_projections_equal_whole_ones():
    """Projecting out and combining 5 orthonormal rows 2 at a time equals doing it at once."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 5, generator=generator, dtype=torch.float64)).Q.T
    w = torch.randn(40, generator=generator, dtype=torch.float64)
    weights = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        orthogonalize(w, basis, 2), orthogonalize(w, basis), rtol=0, atol=1e-14
    )
    assert float((basis @ orthogonalize(w, basis, 2)).abs().max()) < 1e-14
    torch.testing.assert_close(combine(weights, basis, 2), weights @ basis, rtol=0, atol=1e-14)


def test_an_unknown_basis_device_is_refused(mlp):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    with pytest.raises(ValueError, match="basis_device"):
        lanczos_extremes(op, 1, settings=SolveSettings(basis_device="gpu"))

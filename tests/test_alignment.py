"""SAM alignment figures on a quadratic model whose Hessian, gradient and v₁ are known by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpscope.analysis.alignment import Distribution, abs_cosine, subspace_share
from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.verdict import verdict
from sharpscope.optim.perturbations import eigen_sam_perturbation, sam_perturbation

A = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))


class Point(nn.Module):
    """Outputs its weight vector w for every sample, so the loss below is a quadratic in w."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1)


def quadratic(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ½ (w − c)ᵀ A (w − c): Hessian A, gradient A(w − mean c)."""
    diff = out - target
    return 0.5 * torch.einsum("bi,ij,bj->b", diff, A, diff).mean()


def test_perturbations_by_hand():
    g = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    torch.testing.assert_close(
        sam_perturbation(g, 0.1), torch.tensor([0.06, 0.08, 0.0], dtype=torch.float64)
    )
    # ĝ = (.6, .8, 0), <ĝ, v> = .48, s = +1, v⊥ = v − .48 ĝ = (−.288, .216, .8)
    expected = 0.1 * (torch.tensor([0.6, 0.8, 0.0]) + 0.2 * torch.tensor([-0.288, 0.216, 0.8]))
    torch.testing.assert_close(eigen_sam_perturbation(g, v, 0.1, 0.2), expected.double())
    # s flips with the sign of <g, v>, so the v⊥ term always points along +v's side of g
    flipped = 0.1 * (torch.tensor([0.6, 0.8, 0.0]) - 0.2 * torch.tensor([0.288, -0.216, -0.8]))
    torch.testing.assert_close(eigen_sam_perturbation(g, -v, 0.1, 0.2), flipped.double())
    with pytest.raises(ValueError, match="zero"):
        sam_perturbation(torch.zeros(3), 0.1)


def test_cosines_and_shares():
    a = torch.tensor([1.0, 1.0, 0.0])
    assert abs_cosine(a, torch.tensor([-1.0, 0.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    assert abs_cosine(a, torch.zeros(3)) == 0.0
    basis = torch.eye(3)[:1]
    assert subspace_share(a, basis) == pytest.approx(1 / math.sqrt(2))
    d = Distribution.of([0.0, 0.25, 0.5, 0.75, 1.0])
    assert (d.count, d.mean, d.min, d.max) == (5, 0.5, 0.0, 1.0)
    assert d.quantiles["q50"] == 0.5 and d.quantiles["q25"] == 0.25


def test_analysis_alignment_matches_hand_computed_values():
    w = [1.0, 2.0, -2.0]
    centres = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    batches = [(torch.zeros(4, 1), centres[i].expand(4, -1)) for i in range(2)]
    rho, alpha = 0.1, 0.2
    result = analyze(
        Point(w), quadratic, batches, AnalyzeConfig(k=2, tol=1e-10, rho=rho, alpha=alpha)
    )
    torch.testing.assert_close(
        result.top.eigenvalues, torch.tensor([4.0, 1.0], dtype=torch.float64)
    )
    assert float(result.bottom.eigenvalues[0]) == pytest.approx(0.5)
    assert result.trace.estimate == pytest.approx(5.5)
    # mean centre (0, 1, 0): g = A (w − c) = (4·1, 1·1, 0.5·−2) = (4, 1, −1)
    g = torch.tensor([4.0, 1.0, -1.0], dtype=torch.float64)
    g_hat = g / g.norm()
    assert result.grad_norm == pytest.approx(math.sqrt(18))
    a = result.alignment
    assert a.cos_full == pytest.approx(4 / math.sqrt(18))
    assert a.topk_share == pytest.approx(math.sqrt(17 / 18))
    curvature = float(g_hat @ A @ g_hat)
    assert a.sam_sharpness_quadratic == pytest.approx(0.5 * rho**2 * curvature)
    # the loss is exactly quadratic, so the second-order prediction is exact
    assert a.sam_sharpness == pytest.approx(
        rho * math.sqrt(18) + 0.5 * rho**2 * curvature, rel=1e-9
    )
    assert a.sam_sharpness_taylor == pytest.approx(a.sam_sharpness, rel=1e-9)
    v1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    eps = rho * (g_hat + alpha * (v1 - float(g_hat @ v1) * g_hat))
    assert a.eigen_sam_cos == pytest.approx(float(eps[0] / eps.norm()))
    assert a.eigen_sam_cos > a.cos_full
    # per batch: g₁ = A(w − 0) = (4, 2, −1), g₂ = A(w − (0,2,0)) = (4, 0, −1)
    cosines = sorted([4 / math.sqrt(21), 4 / math.sqrt(17)])
    assert a.cos_batches.count == 2
    assert a.cos_batches.min == pytest.approx(cosines[0])
    assert a.cos_batches.max == pytest.approx(cosines[1])
    assert a.cos_batches.mean == pytest.approx(sum(cosines) / 2)
    assert "well aligned" in verdict(result)


def test_poor_alignment_verdict_and_zero_gradient():
    w = [0.01, 0.0, 3.0]
    batch = [(torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.float64))]
    result = analyze(Point(w), quadratic, batch, AnalyzeConfig(k=1, tol=1e-10, trace=False))
    # g = (0.04, 0, 1.5): almost orthogonal to v₁ = e₁
    assert result.alignment.cos_full == pytest.approx(0.04 / math.hypot(0.04, 1.5))
    assert "poorly aligned" in verdict(result)
    assert result.trace is None
    flat = analyze(Point([0.0, 0.0, 0.0]), quadratic, batch, AnalyzeConfig(k=1, trace=False))
    assert flat.alignment is None
    assert "zero" in verdict(flat)

"""SAM alignment figures on a quadratic model whose Hessian, gradient and v₁ are known by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpscope.analysis.alignment import (
    MinibatchCosines,
    abs_cosine,
    minibatch_cosines,
    subspace_share,
)
from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.verdict import spread_notes, verdict
from sharpscope.curvature import HessianOperator, Objective
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
    d = MinibatchCosines.of([0.0, 0.25, 0.5, 0.75, 1.0], [1.0] * 5, 32)
    assert (d.count, d.mean, d.min, d.max, d.batch_size) == (5, 0.5, 0.0, 1.0, 32)
    assert d.quantiles["q50"] == 0.5 and d.quantiles["q25"] == 0.25
    assert d.std_error == pytest.approx(math.sqrt(0.15625 / 5))  # sample variance 0.625/4
    assert MinibatchCosines.of([0.3], [0.5], 32).std_error is None


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
    assert a.cos_batches.std_error == pytest.approx(abs(cosines[1] - cosines[0]) / 2)
    assert "well aligned" in verdict(result)
    assert "mean ± SE over 2 minibatches of 4" in verdict(result)


def test_poor_alignment_verdict_and_zero_gradient():
    w = [0.01, 0.0, 3.0]
    batch = [(torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.float64))]
    result = analyze(Point(w), quadratic, batch, AnalyzeConfig(k=1, tol=1e-10, trace=False))
    # g = (0.04, 0, 1.5): almost orthogonal to v₁ = e₁
    assert result.alignment.cos_full == pytest.approx(0.04 / math.hypot(0.04, 1.5))
    assert "poorly aligned" in verdict(result)
    # a single minibatch: the figure has no standard error, and the verdict says so
    one = result.alignment.cos_batches
    assert (one.count, one.std_error) == (1, None)
    assert one.mean == pytest.approx(result.alignment.cos_full, rel=1e-12)
    assert "one minibatch of 2: no standard error" in verdict(result)
    assert "±" not in verdict(result)
    assert spread_notes(result) == [
        "the alignment is of one minibatch of 2 samples, so how much it varies between SAM's "
        "minibatches is unknown: analyze at least 4 samples for a standard error"
    ]
    assert result.trace is None
    flat = analyze(Point([0.0, 0.0, 0.0]), quadratic, batch, AnalyzeConfig(k=1, trace=False))
    assert flat.alignment is None
    assert "zero" in verdict(flat)


class Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def _flat_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create: bool = False):
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=create)
    return torch.cat([g.reshape(-1) for g in grads])


def test_minibatch_alignment_equals_a_hand_computation():
    """Per full minibatch: |cos| of its gradient with v₁ of a dense Hessian (autograd double
    backward), then the mean and its SE over minibatches; the last, shorter batch is left out."""
    torch.manual_seed(0)
    model = Tanh().double()
    x, y = torch.randn(37, 4, dtype=torch.float64), torch.randint(0, 3, (37,))
    batches = list(zip(x.split(8), y.split(8), strict=True))  # 4 of 8, one of 5
    g = _flat_grad(model, x, y, create=True)
    hessian = torch.stack(
        [torch.cat([h.reshape(-1) for h in torch.autograd.grad(gi, list(model.parameters()),
                                                                retain_graph=True)])
         for gi in g]
    )  # fmt: skip
    v1 = torch.linalg.eigh(hessian).eigenvectors[:, -1]
    rho, alpha = 0.05, 0.3
    cosines, eigen = [], []
    for xb, yb in batches[:4]:
        gb = _flat_grad(model, xb, yb).detach()
        g_hat = gb / gb.norm()
        cosines.append(abs(float(g_hat @ v1)))
        along = float(g_hat @ v1)
        eps = rho * (g_hat + alpha * math.copysign(1.0, along) * (v1 - along * g_hat))
        eigen.append(abs(float(eps @ v1 / eps.norm())))
    mean = sum(cosines) / 4
    se = math.sqrt(sum((c - mean) ** 2 for c in cosines) / 3 / 4)
    op = HessianOperator(Objective(model, nn.functional.cross_entropy, batches))
    got = minibatch_cosines(op, v1, rho, alpha)
    assert (got.count, got.batch_size) == (4, 8)
    assert got.values == pytest.approx(cosines, abs=1e-12, rel=0)
    assert got.mean == pytest.approx(mean, abs=1e-12, rel=0)
    assert got.std_error == pytest.approx(se, abs=1e-12, rel=0)
    assert got.eigen_sam_mean == pytest.approx(sum(eigen) / 4, abs=1e-12, rel=0)
    # the analysis reads the same figure, with Lanczos's v₁, and its verdict quotes it
    result = analyze(model, nn.functional.cross_entropy, batches, AnalyzeConfig(k=1, tol=1e-10))
    b = result.alignment.cos_batches
    assert b.mean == pytest.approx(mean, abs=1e-8, rel=0)
    assert f"{b.mean:.2f} ± {b.std_error:.2g}, mean ± SE over 4 minibatches of 8" in verdict(result)


def test_the_note_asks_for_more_samples_only_when_the_se_could_change_the_verdict():
    def notes(values: list[float]) -> list[str]:
        cosines = MinibatchCosines.of(values, values, 64)
        alignment = type("A", (), {"cos_batches": cosines})()
        return spread_notes(type("R", (), {"alignment": alignment})())

    assert notes([0.3, 0.32, 0.31, 0.29]) == []  # 0.305 ± 2·0.0065: clear of 0.1 and 0.5
    (note,) = notes([0.3, 0.6, 0.35, 0.55])  # 0.45 ± 2·0.0736 crosses 0.5
    assert "crosses the cut-off 0.5" in note
    # 4 · (2·0.0736/0.05)² = 34.7 → 35 minibatches of 64
    assert "about 2,240 samples (35 minibatches of 64)" in note


def test_the_note_does_not_ask_for_more_samples_than_the_split_holds():
    def notes(values: list[float], split_size: int | None) -> list[str]:
        cosines = MinibatchCosines.of(values, values, 64)
        alignment = type("A", (), {"cos_batches": cosines})()
        return spread_notes(type("R", (), {"alignment": alignment})(), split_size)

    straddling = [0.3, 0.6, 0.35, 0.55]  # settling it takes 2,240 samples (above)
    (enough,) = notes(straddling, 2240)
    assert "about 2,240 samples (35 minibatches of 64) would settle it" in enough
    (short,) = notes(straddling, 2239)
    assert "crosses the cut-off 0.5" in short and "would settle" not in short
    assert "about 2,240 samples, more than the 2,239 the split holds" in short
    (one,) = notes([0.3], 127)
    assert "the split holds 127 samples, fewer than the 128 that two minibatches take" in one
    assert "analyze at least" not in one
    (one,) = notes([0.3], 128)
    assert one.endswith("analyze at least 128 samples for a standard error")

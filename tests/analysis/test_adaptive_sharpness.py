"""Worst- and average-case (adaptive) sharpness: invariance to function-preserving rescalings,
the trust-region closed form on a quadratic, the ascent keeping its best iterate, and weights and
buffers left exactly as they were."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.optimize import brentq
from torch import nn
from torch.nn import functional as F

from sharpscope.analysis.adaptive_sharpness import (
    AdaptiveSharpnessSettings,
    adaptive_sharpness,
    sharpness_of,
)
from sharpscope.curvature import HessianOperator, Objective, hessian_eigs
from sharpscope.errors import InputError
from sharpscope.optim.perturbations import asam_perturbation

D = torch.float64


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).to(D)


def _data(n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=generator, dtype=D)
    y = torch.randint(0, 3, (n,), generator=generator)
    return list(zip(x.split(16), y.split(16), strict=True))


def _rescaled(model: nn.Sequential, c1: float, c2: float) -> nn.Sequential:
    """The same function: layer 0 ×c1, layer 2's weight ×c2/c1 and bias ×c2, layer 4's ×1/c2."""
    other = _mlp()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other[0].weight.mul_(c1)
        other[0].bias.mul_(c1)
        other[2].weight.mul_(c2 / c1)
        other[2].bias.mul_(c2)
        other[4].weight.mul_(1 / c2)
    return other


MEASURES = [
    AdaptiveSharpnessSettings("worst", "l2", rho=0.5),
    AdaptiveSharpnessSettings("worst", "linf", rho=0.05),
    AdaptiveSharpnessSettings("average", "l2", rho=0.1, steps=8),
]


@pytest.mark.parametrize("settings", MEASURES, ids=lambda s: f"{s.kind}-{s.norm}")
def test_adaptive_figures_survive_a_function_preserving_rescaling(settings):
    batches = _data()
    model = _mlp()
    other = _rescaled(model, 3.0, 0.3)  # not powers of two: rounding differs
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(model(x), other(x), atol=1e-12)
    first = adaptive_sharpness(Objective(model, F.cross_entropy, batches), settings, shards=4)
    second = adaptive_sharpness(Objective(other, F.cross_entropy, batches), settings, shards=4)
    assert abs(first.value) > 1e-4
    assert second.value == pytest.approx(first.value, abs=1e-6, rel=1e-6)
    assert second.sampling == pytest.approx(first.sampling, abs=1e-6, rel=1e-6)
    if settings.kind == "average":
        assert second.std_error == pytest.approx(first.std_error, abs=1e-6, rel=1e-6)
    top = [
        float(hessian_eigs(Objective(m, F.cross_entropy, batches), k=1).eigenvalues[0])
        for m in (model, other)
    ]
    assert abs(top[1] - top[0]) > 0.1 * abs(top[0])  # the Hessian sees the rescaling
    plain = AdaptiveSharpnessSettings(settings.kind, settings.norm, settings.rho, adaptive=False)
    moved = [
        adaptive_sharpness(Objective(m, F.cross_entropy, batches), plain).value
        for m in (model, other)
    ]
    assert abs(moved[1] - moved[0]) > 0.1 * abs(moved[0])  # and so does the non-adaptive figure


def _quadratic() -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Least squares, exactly quadratic in the weights: L(w + δ) − L(w) = gᵀδ + ½δᵀHδ."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(48, 4, generator=generator, dtype=D) * torch.tensor(
        [2.0, 1.0, 0.7, 0.4], dtype=D
    )
    y = torch.randn(48, 1, generator=generator, dtype=D)
    model = nn.Linear(4, 1, bias=False).to(D)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.8, -1.3, 0.5, 2.0]], dtype=D))
    return model, list(zip(x.split(16), y.split(16), strict=True))


def _trust_region(g: torch.Tensor, h: torch.Tensor, rho: float) -> float:
    """max over ‖u‖ ≤ ρ of gᵀu + ½uᵀHu (H positive semi-definite): u = (μI − H)⁻¹g, μ > λ_max,
    with ‖u‖ = ρ (the secular equation, solved by Brent's method in H's eigenbasis)."""
    lam, q = torch.linalg.eigh(h)
    b = q.T @ g

    def excess(mu: float) -> float:
        return float(((b / (mu - lam)) ** 2).sum().sqrt()) - rho

    top = float(lam[-1])
    mu = brentq(excess, top + 1e-12, top + float(g.norm()) / rho + 1e-3, xtol=1e-15)
    u = q @ (b / (mu - lam))
    return float(g @ u + 0.5 * u @ h @ u)


@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_l2_equals_the_trust_region_solution_on_a_quadratic(adaptive):
    model, batches = _quadratic()
    op = HessianOperator(Objective(model, F.mse_loss, batches), cache_graph=False)
    g, h = op.gradient(), torch.stack([op.matvec(e) for e in torch.eye(4, dtype=D)])
    t = model.weight.detach().reshape(-1).abs() if adaptive else torch.ones(4, dtype=D)
    rho = 0.3 if adaptive else 0.5
    expected = _trust_region(t * g, t[:, None] * h * t[None, :], rho)
    settings = AdaptiveSharpnessSettings("worst", "l2", rho=rho, adaptive=adaptive, steps=200)
    found = adaptive_sharpness(Objective(model, F.mse_loss, batches), settings, shards=0)
    assert found.value == pytest.approx(expected, rel=1e-8)
    assert found.perturbation_norm == pytest.approx(rho, rel=1e-12)
    short = adaptive_sharpness(
        Objective(model, F.mse_loss, batches), AdaptiveSharpnessSettings(rho=rho, adaptive=adaptive)
    )
    assert 0.9 * expected < short.value <= expected * (1 + 1e-12)  # 20 steps: within 10 %


def test_worst_case_linf_reaches_the_best_vertex_of_a_quadratic():
    """A convex function's maximum over a box is at a vertex: enumerate all 16."""
    model, batches = _quadratic()
    op = HessianOperator(Objective(model, F.mse_loss, batches), cache_graph=False)
    rho = 0.2
    best = (
        max(
            op.loss(rho * torch.tensor(signs, dtype=D))
            for signs in itertools.product((-1, 1), repeat=4)
        )
        - op.loss()
    )
    settings = AdaptiveSharpnessSettings("worst", "linf", rho=rho, adaptive=False)
    found = adaptive_sharpness(Objective(model, F.mse_loss, batches), settings, shards=0)
    assert found.value == pytest.approx(best, rel=1e-10)
    assert found.perturbation_norm == pytest.approx(rho, rel=1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_ascent_never_ends_below_its_starting_perturbation(norm):
    model, batches = _mlp(), _data()
    op = HessianOperator(Objective(model, F.cross_entropy, batches), cache_graph=False)
    generator = torch.Generator().manual_seed(3)
    for trial in range(3):
        start = torch.randn(op.size, generator=generator, dtype=D)
        settings = AdaptiveSharpnessSettings("worst", norm, rho=0.3, steps=1 + trial, step_size=5.0)
        found = sharpness_of(op, settings, 0, start)
        scale = torch.cat([p.detach().reshape(-1) for p in op.space.params]).abs()
        projected = (
            start * min(1.0, 0.3 / float(start.norm())) if norm == "l2" else start.clamp(-0.3, 0.3)
        )
        assert found.history[0] == pytest.approx(op.loss(scale * projected) - op.loss(), abs=1e-12)
        assert found.value >= found.history[0]
        assert found.value == max(found.history)


def test_the_first_step_is_asams_perturbation():
    model, batches = _mlp(), _data()
    op = HessianOperator(Objective(model, F.cross_entropy, batches), cache_graph=False)
    w = torch.cat([p.detach().reshape(-1) for p in op.space.params])
    epsilon = asam_perturbation(op.gradient(), w, 0.4, 0.01)
    settings = AdaptiveSharpnessSettings("worst", "l2", rho=0.4, steps=1, eta=0.01)
    found = sharpness_of(op, settings, 0)
    assert found.history[1] == pytest.approx(op.loss(epsilon) - op.loss(), rel=1e-10)
    assert found.n_gradients == 1


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("batch_stats", [False, True])
@pytest.mark.parametrize("kind", ["worst", "average"])
def test_weights_buffers_and_modes_are_left_exactly_as_they_were(kind, batch_stats):
    torch.manual_seed(4)
    model = BatchNormNet().to(D)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = AdaptiveSharpnessSettings(kind, rho=0.2, steps=5)
    found = adaptive_sharpness(
        Objective(model, F.cross_entropy, _data(), batch_stats=batch_stats), settings
    )
    assert found.value != 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert all(m.training for m in model.modules())


def test_average_case_is_seeded_and_carries_its_monte_carlo_error():
    model, batches = _mlp(), _data()
    settings = AdaptiveSharpnessSettings("average", rho=0.2, steps=16)
    first = adaptive_sharpness(Objective(model, F.cross_entropy, batches), settings)
    again = adaptive_sharpness(Objective(model, F.cross_entropy, batches), settings)
    other = adaptive_sharpness(
        Objective(model, F.cross_entropy, batches),
        AdaptiveSharpnessSettings("average", rho=0.2, steps=16, seed=1),
    )
    assert first.value == again.value and first.value != other.value
    assert len(first.history) == 16 and first.value == pytest.approx(sum(first.history) / 16)
    assert 0 < first.std_error < abs(first.value)
    assert first.shards == 8 and first.sampling > 0  # each batch cut into 8 chunks
    low, high = first.interval
    assert low < first.value < high


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "best"),
        ("norm", "l1"),
        ("rho", 0.0),
        ("steps", 0),
        ("step_size", -1.0),
        ("eta", -1.0),
    ],
)
def test_bad_settings_name_their_parameter(field, value):
    with pytest.raises(InputError, match=f"`{field}`"):
        AdaptiveSharpnessSettings(**{field: value})


@pytest.mark.parametrize(("kind", "expected"), [("worst", 3), ("average", 4)])
def test_progress_hears_of_each_step_or_draw(kind, expected):
    heard: list[tuple[str, int, int]] = []
    settings = AdaptiveSharpnessSettings(kind, steps=expected)
    adaptive_sharpness(
        Objective(_mlp(), F.cross_entropy, _data()), settings, progress=lambda *a: heard.append(a)
    )
    assert heard == [("adaptive sharpness", i, expected) for i in range(1, expected + 1)]


@pytest.mark.parametrize(("kind", "forwards"), [("worst", 1 + 3 + 1 + 1), ("average", 1 + 3)])
def test_the_shards_losses_cost_one_forward_per_batch(kind, forwards):
    """Per batch, however many shards: the shards' losses at w (shared by the ascent), then the
    worst case's 3 gradients, its last iterate and the shards' losses at the found δ, or the
    average case's at its 3 draws."""
    model, calls = _mlp(), []
    model.register_forward_hook(lambda *_: calls.append(1))
    settings = AdaptiveSharpnessSettings(kind, steps=3)
    adaptive_sharpness(Objective(model, F.cross_entropy, _data()), settings, shards=8)
    # 4 batches of 16, each cut into 8 shards of 2; and the operator's check of the first batch
    # when built (whole and halves: F.cross_entropy does not state its reduction)
    assert len(calls) == 3 + forwards * 4

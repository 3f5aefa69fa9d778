"""SAM, ASAM and Eigen-SAM against formulas computed by hand, on tiny float64 models."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable

import pytest
import torch
from ground_truth import dense_hessian
from refined_spy import spied_refined
from torch import nn

import sharpscope.optim.eigen_sam as eigen_sam_module
from sharpscope.errors import InputError
from sharpscope.optim import (
    ASAM,
    SAM,
    EigenEstimate,
    EigenSAM,
    asam_perturbation,
    frozen_batchnorm_stats,
)

F64 = torch.float64
CE = nn.CrossEntropyLoss()


class Quadratic(nn.Module):
    """Every sample's loss is ½ wᵀAw: Hessian A, gradient Aw."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.w @ self.a @ self.w).expand(len(x))


def mean(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out.mean()


QUAD_BATCH = (torch.zeros(2, 1, dtype=F64), torch.zeros(2, dtype=F64))


def quadratic(eigenvalues: list[float], seed: int = 0) -> tuple[Quadratic, torch.Tensor]:
    """A quadratic with the given spectrum in a random basis; returns the model and the basis."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=F64)
    )
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T
    w = torch.randn(len(eigenvalues), generator=gen, dtype=F64)
    return Quadratic(a, w), q


def mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    norm = nn.BatchNorm1d(5) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(3, 5), norm, nn.Tanh(), nn.Linear(5, 2)).double()


def batches(count: int = 4, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 3, generator=gen, dtype=F64),
            torch.randint(0, 2, (size,), generator=gen),
        )
        for _ in range(count)
    ]


def closure_for(model: nn.Module, loss_fn: Callable, batch: tuple) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        return loss.detach()

    return closure


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def first_step_delta(
    opt: SAM, model: nn.Module, batch: tuple, loss_fn: Callable = CE
) -> tuple[torch.Tensor, ...]:
    """(g, w, ε) of one first step; the weights are left at w + ε."""
    w = flat(model.parameters())
    closure_for(model, loss_fn, batch)()
    g = flat(p.grad for p in model.parameters())
    opt.first_step()
    return g, w, flat(model.parameters()) - w


def two_groups(model: nn.Module, lr: float = 0.1, **kwargs) -> torch.optim.SGD:
    """SGD over two param groups; the second sets its own SAM ρ = 0.1."""
    first, *_, last = model.children()
    groups = [{"params": first.parameters()}, {"params": last.parameters(), "sam_rho": 0.1}]
    return torch.optim.SGD(groups, lr=lr, **kwargs)


def rho_per_element(model: nn.Module) -> torch.Tensor:
    first, *_, last = model.children()
    sizes = [sum(p.numel() for p in m.parameters()) for m in (first, last)]
    return torch.cat(
        [torch.full((sizes[0],), 0.05, dtype=F64), torch.full((sizes[1],), 0.1, dtype=F64)]
    )


def test_asam_perturbation_by_hand():
    g = torch.tensor([3.0, 4.0], dtype=F64)
    w = torch.tensor([1.0, -0.5], dtype=F64)
    t = torch.tensor([1.01, 0.51], dtype=F64)  # |w| + η
    norm = (3.03**2 + 2.04**2) ** 0.5  # ‖Tg‖
    expected = 0.5 * torch.tensor([1.01**2 * 3.0, 0.51**2 * 4.0], dtype=F64) / norm
    torch.testing.assert_close(asam_perturbation(g, w, 0.5, 0.01), expected)
    torch.testing.assert_close(expected, 0.5 * t**2 * g / torch.linalg.vector_norm(t * g))


@pytest.mark.parametrize("kind", ["sam", "asam", "eigen"])
def test_perturbations_by_hand_on_a_model(kind: str):
    """ε per parameter group (global norm, ρ per group), then w restored exactly by second_step."""
    model = mlp()
    batch = batches(1)[0]
    rho = rho_per_element(model)
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(3)
    v = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in model.named_parameters()}
    base = two_groups(model, lr=0.0)
    if kind == "sam":
        opt = SAM(base)
    elif kind == "asam":
        opt = ASAM(base, rho=0.05, eta=0.01)
    else:
        opt = EigenSAM(base, alpha=0.2, model=model, loss_fn=CE)
        opt.set_eigenvector(v)
    g, w, eps = first_step_delta(opt, model, batch)
    g_hat = g / g.norm()
    if kind == "sam":
        expected = rho * g_hat
    elif kind == "asam":
        t = w.abs() + 0.01
        expected = rho * t * t * g / (t * g).norm()
    else:
        u = flat(v[n] for n in names)
        u = u / u.norm()
        along = g_hat @ u
        expected = rho * (g_hat + 0.2 * torch.sign(along) * (u - along * g_hat))
        assert opt.alignment == pytest.approx(float(along.abs()), rel=1e-12)
    torch.testing.assert_close(eps, expected, rtol=1e-12, atol=1e-15)
    closure_for(model, CE, batch)()
    opt.second_step()
    assert torch.equal(flat(model.parameters()), w)  # lr = 0: w restored bit for bit


def test_sam_gradient_on_a_quadratic_is_the_closed_form():
    model, _ = quadratic([3.0, 1.0, -0.5, 0.2])
    a, w = model.a, model.w.detach().clone()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
    loss = opt.step(closure_for(model, mean, QUAD_BATCH))
    aw = a @ w
    expected = w - 0.1 * a @ (w + 0.05 * aw / aw.norm())
    torch.testing.assert_close(model.w.detach(), expected, rtol=1e-13, atol=1e-15)
    assert float(loss) == pytest.approx(float(0.5 * w @ aw), rel=1e-13)
    assert opt.global_step == 1


def test_eigen_sam_orthogonal_part_with_a_known_vector():
    v = torch.tensor([1.0, 2.0, -2.0], dtype=F64) / 3.0
    deltas = []
    for sign in (1.0, -1.0):
        model, _ = quadratic([3.0, 1.0, 0.5])
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = EigenSAM(base, 0.1, 0.2, model=model, loss_fn=mean)
        opt.set_eigenvector({"w": sign * v})
        g, _, eps = first_step_delta(opt, model, QUAD_BATCH, mean)
        g_hat = g / g.norm()
        along = float(g_hat @ v)
        orthogonal = eps - 0.1 * g_hat
        expected = 0.1 * 0.2 * (1.0 if along > 0 else -1.0) * (v - along * g_hat)
        torch.testing.assert_close(orthogonal, expected, rtol=1e-12, atol=1e-15)
        assert float(orthogonal @ g_hat) == pytest.approx(0.0, abs=1e-15)
        assert opt.alignment == pytest.approx(abs(along), rel=1e-12)
        deltas.append(eps)
    assert torch.equal(deltas[0], deltas[1])  # s makes v and -v the same perturbation


def run(opt: SAM, model: nn.Module, loss_fn: Callable, data: list, steps: int) -> list:
    """``steps`` closure steps cycling over ``data``; returns the weights after each."""
    trajectory = []
    for t in range(steps):
        batch = data[t % len(data)]
        if isinstance(opt, EigenSAM):
            opt.refresh(*batch)
        opt.step(closure_for(model, loss_fn, batch))
        trajectory.append(flat(model.parameters()))
    return trajectory


def test_plain_sam_until_the_first_eigenvector():
    sam_model, _ = quadratic([3.0, 1.0, -0.5, 0.2])
    eigen_model, _ = quadratic([3.0, 1.0, -0.5, 0.2])
    sam = SAM(torch.optim.SGD(sam_model.parameters(), lr=0.1), rho=0.05)
    eigen = EigenSAM(
        torch.optim.SGD(eigen_model.parameters(), lr=0.1),
        rho=0.05,
        model=eigen_model,
        loss_fn=mean,
        eig_every=3,
    )
    plain = run(sam, sam_model, mean, [QUAD_BATCH], 4)
    for t in range(3):
        eigen.refresh(*QUAD_BATCH)
        eigen.step(closure_for(eigen_model, mean, QUAD_BATCH))
        assert torch.equal(flat(eigen_model.parameters()), plain[t])
        assert eigen.estimate is None and eigen.alignment is None and eigen.eigenvector is None
    eigen.refresh(*QUAD_BATCH)
    eigen.step(closure_for(eigen_model, mean, QUAD_BATCH))
    assert eigen.estimate is not None and eigen.estimate.step == 3
    assert eigen.alignment is not None
    assert not torch.allclose(flat(eigen_model.parameters()), plain[3])


def test_refresh_cadence_on_global_steps_and_warm_start(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[int, torch.Tensor | None]] = []
    real = eigen_sam_module.lanczos

    def spy(op, **kwargs):
        v0 = kwargs["v0"]
        calls.append((opt.global_step, None if v0 is None else v0.clone()))
        return real(op, **kwargs)

    monkeypatch.setattr(eigen_sam_module, "lanczos", spy)
    model, _ = quadratic([3.0, 2.5, 1.0, -0.5, 0.2, 0.1])
    opt = EigenSAM(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model=model,
        loss_fn=mean,
        eig_every=3,
        eig_steps=2,
    )
    vectors = {}
    for _ in range(10):
        opt.refresh(*QUAD_BATCH)
        opt.step(closure_for(model, mean, QUAD_BATCH))
        if opt.estimate is not None:
            vectors[opt.estimate.step] = opt.eigenvector["w"].clone()
    assert [step for step, _ in calls] == [3, 6, 9]
    assert opt.global_step == 10 and opt.estimate.step == 9
    assert opt.estimate.n_products == 2
    assert calls[0][1] is None
    assert torch.equal(calls[1][1], vectors[3]) and torch.equal(calls[2][1], vectors[6])


def test_refresh_finds_the_largest_eigenvalue_not_the_largest_magnitude():
    model, q = quadratic([-5.0, 2.0, 1.0, 0.5])
    opt = EigenSAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=mean, eig_steps=4
    )
    estimate = opt.refresh_eigenvector(QUAD_BATCH)
    assert estimate.eigenvalue == pytest.approx(2.0, rel=1e-10)
    assert estimate.converged and estimate.residual < 1e-8
    assert abs(float(opt.eigenvector["w"] @ q[:, 1])) == pytest.approx(1.0, rel=1e-10)


def test_a_due_refresh_must_be_made_before_the_step():
    model, _ = quadratic([3.0, 1.0])
    opt = EigenSAM(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=mean, eig_every=1
    )
    opt.step(closure_for(model, mean, QUAD_BATCH))  # step 0 never refreshes
    assert opt.refresh_due
    with pytest.raises(ValueError, match=r"call refresh\(inputs, targets\)"):
        opt.step(closure_for(model, mean, QUAD_BATCH))
    assert opt.refresh(*QUAD_BATCH) is not None and not opt.refresh_due


@pytest.mark.parametrize("training", [True, False])
def test_refresh_restores_the_model_mode_and_buffers(training: bool):
    model = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2)
    ).double()
    model.train(training)
    buffers = [b.clone() for b in model.buffers()]
    opt = EigenSAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=CE)
    opt.refresh_eigenvector(batches(1)[0])
    assert all(m.training == training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


class Heads(nn.Module):
    """A body and a head; optionally an unused head registered first (a positional pairing of
    the eigenvector with the parameters that have gradients would shift everything)."""

    def __init__(self, unused: bool) -> None:
        super().__init__()
        if unused:
            self.unused = nn.Linear(5, 2)
        self.body = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_a_parameter_without_gradient_changes_nothing():
    torch.manual_seed(0)
    plain, extra = Heads(False).double(), Heads(True).double()
    extra.load_state_dict(plain.state_dict(), strict=False)
    unused = flat(extra.unused.parameters())
    gen = torch.Generator().manual_seed(5)
    v = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in extra.named_parameters()}
    runs = []
    for model in (plain, extra):
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        opt = EigenSAM(base, model=model, loss_fn=CE, eig_every=1000)
        opt.set_eigenvector({n: t for n, t in v.items() if hasattr(model, n.split(".")[0])})
        run(opt, model, CE, batches(), 3)
        runs.append((opt, {n: p.detach() for n, p in model.named_parameters()}))
    (plain_opt, plain_w), (extra_opt, extra_w) = runs
    for name, w in plain_w.items():
        torch.testing.assert_close(extra_w[name], w, rtol=0, atol=1e-13)
    assert torch.equal(flat(extra.unused.parameters()), unused)
    assert extra_opt.alignment == pytest.approx(plain_opt.alignment, rel=1e-10)
    # a refresh with the unused head: its part of v is zero and λ is the same
    for opt in (plain_opt, extra_opt):
        opt.eig_steps = 64
    estimates = [opt.refresh_eigenvector(batches(1)[0]) for opt, _ in runs]
    assert estimates[1].eigenvalue == pytest.approx(estimates[0].eigenvalue, rel=1e-9)
    leftover = flat(extra_opt.eigenvector[n] for n in ("unused.weight", "unused.bias"))
    assert float(leftover.norm()) < 1e-4  # what the warm start put there, shrunk to the tolerance


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model[1].buffers()]


@pytest.mark.parametrize("api", ["closure", "two-step", "manual"])
def test_batchnorm_statistics_update_once_per_step(api: str):
    batch = batches(1)[0]
    reference = mlp(batchnorm=True)
    closure_for(reference, CE, batch)()  # one plain step's forward at w
    model = mlp(batchnorm=True)
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), model=None if api == "manual" else model)
    if api == "closure":
        opt.step(closure_for(model, CE, batch))
    else:
        closure_for(model, CE, batch)()
        opt.first_step(zero_grad=True)
        with frozen_batchnorm_stats(model) if api == "manual" else contextlib.nullcontext():
            closure_for(model, CE, batch)()
        opt.second_step(zero_grad=True)
    for a, b in zip(bn_buffers(model), bn_buffers(reference), strict=True):
        assert torch.equal(a, b)
    assert model[1].num_batches_tracked.item() == 1 and model[1].track_running_stats


def test_frozen_batchnorm_stats_keeps_outputs():
    model = mlp(batchnorm=True)
    x = batches(1)[0][0]
    before = bn_buffers(model)
    with frozen_batchnorm_stats(model):
        frozen = model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_buffers(model), strict=True))
    assert torch.equal(frozen, model(x))  # the same batch statistics normalise both


def test_closure_step_equals_the_two_step_api():
    data = batches()
    models = [mlp(), mlp()]
    opts = [ASAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)) for m in models]
    run(opts[0], models[0], CE, data, 3)
    for t in range(3):
        closure_for(models[1], CE, data[t])()
        opts[1].first_step(zero_grad=True)
        closure_for(models[1], CE, data[t])()
        opts[1].second_step(zero_grad=True)
    assert torch.equal(flat(models[0].parameters()), flat(models[1].parameters()))


def make_eigen(seed: int) -> tuple[nn.Module, EigenSAM, torch.optim.lr_scheduler.LRScheduler]:
    model = mlp(seed, batchnorm=True)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = EigenSAM(base, 0.1, 0.2, model=model, loss_fn=CE, eig_every=3, eig_steps=3)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)


def train(model: nn.Module, opt: EigenSAM, scheduler, steps: range, data: list) -> None:
    for t in steps:
        opt.refresh(*data[t % len(data)])
        opt.step(closure_for(model, CE, data[t % len(data)]))
        scheduler.step()


def opt_estimate_at(state: dict) -> EigenEstimate:
    return EigenEstimate(**state["sam"]["estimate"])


def test_state_dict_round_trip_continues_bit_identically():
    data = batches()
    model, opt, scheduler = make_eigen(0)
    train(model, opt, scheduler, range(4), data)  # refreshes at step 3
    buffer = io.BytesIO()
    torch.save([model.state_dict(), opt.state_dict(), scheduler.state_dict()], buffer)
    saved = opt.state_dict()
    assert set(saved["sam"]["eigenvector"]) == {n for n, _ in model.named_parameters()}
    assert saved["sam"]["global_step"] == 4 and saved["sam"]["estimate"]["step"] == 3
    assert all("momentum_buffer" in s for s in saved["state"].values())
    assert (
        saved["param_groups"][0]["sam_rho"] == 0.1 and saved["param_groups"][0]["sam_alpha"] == 0.2
    )
    train(model, opt, scheduler, range(4, 9), data)  # refreshes at step 6

    buffer.seek(0)
    model_state, opt_state, scheduler_state = torch.load(buffer, weights_only=True)
    resumed, resumed_opt, resumed_scheduler = make_eigen(1)
    resumed.load_state_dict(model_state)
    resumed_opt.load_state_dict(opt_state)
    resumed_scheduler.load_state_dict(scheduler_state)
    assert resumed_opt.estimate == opt_estimate_at(saved)
    train(resumed, resumed_opt, resumed_scheduler, range(4, 9), data)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed_opt.estimate == opt.estimate and resumed_opt.global_step == 9
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_scheduler_drives_the_wrapper():
    model = mlp()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for t in range(4):
            closure_for(model, CE, data[t])()
            opt.first_step(zero_grad=True)
            closure_for(model, CE, data[t])()
            opt.second_step(zero_grad=True)
            scheduler.step()
            expected = 0.05 * (1 + torch.cos(torch.tensor((t + 1) * torch.pi / 4)).item())
            assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_misuse_is_refused_and_a_zero_gradient_does_not_perturb():
    model, _ = quadratic([1.0, 2.0])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError):
        SAM(model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rho"):
        SAM(sgd, rho=-1.0)
    opt = SAM(sgd)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match="not in the model"):
        EigenSAM(torch.optim.SGD(model.parameters(), lr=0.1), model=nn.Linear(2, 2), loss_fn=mean)
    eigen = EigenSAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=mean)
    with pytest.raises(KeyError, match="nope"):
        eigen.set_eigenvector({"nope": torch.ones(2)})
    with torch.no_grad():
        model.w.zero_()
    g, _, eps = first_step_delta(opt, model, QUAD_BATCH, mean)
    assert not g.any() and not eps.any()


def test_param_groups_added_through_the_wrapper_reach_the_base():
    model = mlp()
    first, *_, last = model.children()
    base = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    opt = SAM(base, rho=0.05)
    opt.add_param_group({"params": last.parameters(), "lr": 0.01})
    assert opt.param_groups is base.param_groups and len(base.param_groups) == 2
    added = base.param_groups[1]
    assert (added["lr"], added["momentum"], added["sam_rho"]) == (0.01, 0.9, 0.05)
    run(opt, model, CE, batches(), 1)
    assert len(base.state) == len(list(model.parameters()))  # every parameter got momentum


def test_eigen_sam_by_finite_differences_refreshes_to_the_dense_top_pair(
    monkeypatch: pytest.MonkeyPatch,
):
    """backend finite-difference: the refresh's pair is the dense float64 Hessian's top one as
    double backward's is (to the differences' error), its solve through refined (the step
    chosen again on v); an unknown backend (auto is a run's choice, not the optimizer's) is
    refused naming `backend`."""
    solves = spied_refined(monkeypatch, eigen_sam_module)
    model = mlp()
    x, y = batches(count=1, size=16)[0]
    values, vectors = torch.linalg.eigh(dense_hessian(model, CE, x, y))
    found = {}
    for backend in ("double-backward", "finite-difference"):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = EigenSAM(sgd, model=model, loss_fn=CE, eig_steps=32, backend=backend)
        found[backend] = opt.refresh_eigenvector((x, y))
        v = torch.cat([opt.eigenvector[n].reshape(-1) for n, _ in model.named_parameters()])
        assert abs(float(v @ vectors[:, -1])) == pytest.approx(1.0, abs=1e-8), backend
    exact, differences = found["double-backward"], found["finite-difference"]
    assert solves == [("double-backward", 1e-4), ("finite-difference", 1e-4)]
    for estimate in (exact, differences):
        assert estimate.eigenvalue == pytest.approx(float(values[-1]), rel=1e-7)
    assert differences.eigenvalue != exact.eigenvalue  # other products: differences of gradients
    with pytest.raises(InputError, match="unknown `backend` 'auto'"):
        EigenSAM(
            torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=CE, backend="auto"
        )

"""Hessian-vector products against the dense Hessian, and what a product must leave untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from ground_truth import EXACT_BACKENDS, Shared
from torch import nn
from torch.func import functional_call

from sharpscope.curvature import BACKENDS, HessianOperator, Objective, select_params


def _random(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("cache_graph", [True, False])
def test_products_match_dense_hessian(problem, backend, cache_graph):
    op = HessianOperator(
        Objective(problem.model, problem.loss_fn, problem.batches),
        backend=backend,
        cache_graph=cache_graph,
    )
    for seed in range(3):
        v = _random(op.size, seed)
        torch.testing.assert_close(op.matvec(v), problem.hessian @ v, rtol=0, atol=1e-12)
    assert op.n_products == 3


def test_backends_agree_on_split_batches(cnn):
    v = _random(cnn.hessian.shape[0])
    results = [
        HessianOperator(Objective(cnn.model, cnn.loss_fn, cnn.split(7)), backend=b).matvec(v)
        for b in EXACT_BACKENDS
    ]
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-12)


def test_one_batch_equals_uneven_batches():
    """256 samples as one batch or as four of 64 (or uneven pieces) give the same product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    x = torch.randn(256, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (256,))
    loss = nn.CrossEntropyLoss()
    v = _random(sum(p.numel() for p in model.parameters()))
    whole = HessianOperator(Objective(model, loss, [(x, y)])).matvec(v)
    for sizes in ([64] * 4, [100, 100, 56], [1, 255]):
        pieces = list(zip(x.split(sizes), y.split(sizes), strict=True))
        for backend in EXACT_BACKENDS:
            got = HessianOperator(Objective(model, loss, pieces), backend=backend).matvec(v)
            torch.testing.assert_close(got, whole, rtol=0, atol=1e-10)


def test_gradient_and_loss_are_the_full_data_mean(mlp):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.split(10)))
    loss = mlp.loss_fn(mlp.model(mlp.inputs), mlp.targets)
    expected = torch.autograd.grad(loss, list(mlp.model.parameters()))
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in expected]))
    assert op.loss() == pytest.approx(float(loss.detach()), rel=1e-12)
    assert all(p.grad is None for p in mlp.model.parameters())


def _state(model: nn.Module) -> tuple[list[bool], dict[str, torch.Tensor], list]:
    modes = [m.training for m in model.modules()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return modes, buffers, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_stats", [False, True])
def test_mode_buffers_and_grad_untouched(cnn, backend, batch_stats):
    model = cnn.model
    model.train()
    model.fc.eval()  # a mixed state must come back as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = _state(model)
    op = HessianOperator(
        Objective(model, cnn.loss_fn, cnn.split(16), batch_stats=batch_stats), backend=backend
    )
    op.matvec(_random(op.size))
    op.gradient()
    after = _state(model)
    assert after[0] == before[0]
    for name, buf in before[1].items():
        assert torch.equal(after[1][name], buf), name
    for g0, g1 in zip(before[2], after[2], strict=True):
        assert torch.equal(g0, g1)
    model.eval()
    for p in model.parameters():
        p.grad = None


def test_batch_stats_uses_batch_statistics(cnn):
    """Train-mode BatchNorm gives a different Hessian than eval mode, and its own is exact.

    The truth is a copy whose BatchNorm keeps no running statistics, differentiated by
    ``torch.autograd.functional.hessian`` (``torch.func.hessian`` returns an asymmetric matrix
    for batch-statistics BatchNorm in torch 2.13).
    """
    twin = copy.deepcopy(cnn.model)
    twin.bn.train()
    twin.bn.track_running_stats = False
    twin.bn.running_mean = twin.bn.running_var = None
    space = select_params(twin)
    flat = torch.cat([p.detach().reshape(-1) for p in space.params])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return cnn.loss_fn(functional_call(twin, space.unflatten(w), (cnn.inputs,)), cnn.targets)

    truth = torch.autograd.functional.hessian(loss_of, flat)
    v = _random(flat.numel())
    for backend in EXACT_BACKENDS:
        op = HessianOperator(
            Objective(cnn.model, cnn.loss_fn, cnn.batches, batch_stats=True), backend=backend
        )
        hv = op.matvec(v)
        torch.testing.assert_close(hv, truth @ v, rtol=0, atol=1e-12)
    assert not torch.allclose(hv, cnn.hessian @ v)


def test_parameter_subset_by_glob(mlp):
    space = select_params(mlp.model)
    sub = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches, params=["2.*"]))
    assert sub.space.names == ("2.weight", "2.bias")
    offsets = torch.cumsum(torch.tensor((0, *space.numels)), 0)
    start = int(offsets[2])
    block = mlp.hessian[start:, start:]
    v = _random(sub.size)
    torch.testing.assert_close(sub.matvec(v), block @ v, rtol=0, atol=1e-12)


def test_frozen_and_shared_parameters_are_listed_once():
    space = select_params(Shared())
    assert space.names == ("shared.weight", "shared.bias", "head.weight", "head.bias")


def test_flatten_unflatten_round_trip(mlp):
    space = select_params(mlp.model)
    v = _random(space.size)
    parts = space.unflatten(v)
    assert list(parts) == [n for n, _ in mlp.model.named_parameters()]
    assert parts["0.weight"].shape == (8, 5)
    assert torch.equal(space.flatten(parts), v)
    assert torch.equal(space.flatten(space.split(v)), v)
    with pytest.raises(KeyError, match=r"0\.bias"):
        space.flatten({k: t for k, t in parts.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="length"):
        space.unflatten(v[:-1])


def test_bad_input_is_refused(mlp):
    with pytest.raises(ValueError, match="no data"):
        HessianOperator(Objective(mlp.model, mlp.loss_fn, []))
    with pytest.raises(ValueError, match="unknown backend"):
        HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches), backend="magic")
    with pytest.raises(ValueError, match="no trainable parameters matching"):
        HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches, params="nope.*"))
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    with pytest.raises(ValueError, match="flat vector of length 75"):
        op.matvec(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="scalar"):  # when built: the first batch is run
        HessianOperator(
            Objective(
                mlp.model,
                lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
                mlp.batches,
            )
        )


def test_float32_products_are_close(mlp):
    model = mlp.model.float()
    try:
        op = HessianOperator(Objective(model, mlp.loss_fn, mlp.batches))
        assert op.dtype == torch.float32
        v = _random(op.size)
        hv = op.matvec(v)
        assert hv.dtype == torch.float32
        torch.testing.assert_close(hv.double(), mlp.hessian @ v, rtol=1e-4, atol=1e-5)
    finally:
        mlp.model.double()


def test_loss_at_shifted_weights_restores_them_exactly(mlp):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.split(20)))
    v = _random(op.size)
    before = [p.detach().clone() for p in mlp.model.parameters()]
    hv = op.matvec(v)
    shifted = op.loss(0.01 * v)
    with torch.no_grad():
        for p, d in zip(mlp.model.parameters(), op.space.split(0.01 * v), strict=True):
            p.add_(d)
        expected = float(mlp.loss_fn(mlp.model(mlp.inputs), mlp.targets))
        for p, b in zip(mlp.model.parameters(), before, strict=True):
            p.copy_(b)
    assert shifted == pytest.approx(expected, rel=1e-12)
    for p, b in zip(mlp.model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    torch.testing.assert_close(op.matvec(v), hv, rtol=0, atol=1e-12)

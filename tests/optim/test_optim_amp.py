"""SAM, ASAM and Eigen-SAM with gradient accumulation, bf16 autocast and a GradScaler (CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from sharpscope.optim import ASAM, SAM, EigenSAM, micro_batch_closure

CE = nn.functional.cross_entropy
KINDS = ("sgd", "sam", "asam", "eigen-sam")


def mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def data(steps: int, size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 6, generator=gen, dtype=dtype),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(steps)
    ]


def optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    base = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    if kind == "sgd":
        return base
    if kind == "sam":
        return SAM(base, rho=0.1, model=model)
    if kind == "asam":
        return ASAM(base, rho=0.5, model=model)
    return EigenSAM(base, rho=0.1, alpha=0.5, model=model, loss_fn=CE, eig_every=2, eig_steps=4)


def chunks(batch: tuple[torch.Tensor, torch.Tensor], n: int) -> list[tuple[Any, Any]]:
    return list(zip(batch[0].chunk(n), batch[1].chunk(n), strict=True))


def step(opt: torch.optim.Optimizer, model: nn.Module, micro: list, **kw: Any) -> Any:
    """One step over the micro-batches: Eigen-SAM refreshes on them all, SGD zeroes first."""
    closure = micro_batch_closure(lambda b: CE(model(b[0]), b[1]), micro, scaler=kw.get("scaler"))
    if isinstance(opt, EigenSAM):
        opt.refresh_batches(micro)
    if isinstance(opt, SAM):
        return opt.step(closure, **kw)
    opt.zero_grad()
    return opt.step(closure)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", ["sgd", "sam", "eigen-sam"])
def test_four_micro_batches_equal_one_batch_four_times_as_large(kind: str):
    """Float64: the perturbation (and Eigen-SAM's refresh) use the accumulated gradient."""
    weights = []
    for n in (1, 4):
        model = mlp(torch.float64)
        opt = optimizer(kind, model)
        for batch in data(6, 32, torch.float64):
            step(opt, model, chunks(batch, n))
        weights.append(flat(model))
        if kind == "eigen-sam":
            assert opt.estimate is not None and opt.estimate.step == 6 - 2
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-10)
    assert not torch.equal(weights[0], flat(mlp(torch.float64)))


def bf16(loss_of: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    def under_autocast(batch: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_of(batch)

    return under_autocast


class Poisoned:
    """The loss of ``model``, made infinite in the passes listed in ``at`` (pass counter)."""

    def __init__(self, model: nn.Module, at: set[int]) -> None:
        self.model, self.at, self.calls = model, at, 0

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        loss = CE(self.model(batch[0]), batch[1])
        return loss * float("inf") if self.calls in self.at else loss


def scaled_run(kind: str, poison: set[int], batches: list) -> dict[str, Any]:
    """Train under bf16 autocast with a CPU GradScaler; record weights, scales and skips."""
    model = mlp(torch.float32)
    opt = optimizer(kind, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    loss_of = Poisoned(model, poison)
    out: dict[str, Any] = {"weights": [flat(model)], "scales": [], "skipped": []}
    for batch in batches:
        closure = micro_batch_closure(bf16(loss_of), chunks(batch, 2), scaler=scaler)
        if isinstance(opt, EigenSAM):
            opt.refresh_batches(chunks(batch, 2))
        if isinstance(opt, SAM):
            opt.step(closure, scaler=scaler)
            out["skipped"].append(opt.skipped)
        else:
            opt.zero_grad()
            closure()
            scale = scaler.get_scale()
            scaler.step(opt)
            out["skipped"].append(None)
            out["scale_before"] = scale
        scaler.update()
        out["scales"].append(scaler.get_scale())
        out["weights"].append(flat(model))
    out["state"] = opt.state_dict()
    out["global_step"] = getattr(opt, "global_step", None)
    return out


@pytest.mark.parametrize("kind", ["sam", "asam", "eigen-sam"])
def test_scaled_bf16_steps_skip_on_inf_exactly_as_plain_training(kind: str):
    """Two micro-batches a pass: call 5 is step 2's first pass at w (no second pass), call 13
    step 4's second pass at w + ε. Those steps leave weights, momentum and the step count as they
    were; the scale backs off exactly as plain SGD's scaler does on the same steps; every other
    step equals unscaled bf16 training that leaves those two batches out."""
    batches = data(7, 16, torch.float32)
    run = scaled_run(kind, {5, 13}, batches)
    plain = scaled_run("sgd", {3, 7}, batches)  # SGD: one pass per step, calls 3 and 7
    assert run["skipped"] == [False, True, False, True, False, False, False]
    assert run["scales"] == plain["scales"]
    assert run["scales"][:4] == [2.0**12, 2.0**11, 2.0**11, 2.0**10]
    for i in (1, 3):
        assert torch.equal(run["weights"][i + 1], run["weights"][i])
    assert run["global_step"] == 5
    # the same training without a scaler, without the skipped steps (Eigen-SAM's refresh before
    # a skipped step stays: it was made at the weights the next step starts from)
    model = mlp(torch.float32)
    opt = optimizer(kind, model)
    loss_of = bf16(lambda b: CE(model(b[0]), b[1]))
    for i, batch in enumerate(batches):
        if isinstance(opt, EigenSAM):
            opt.refresh_batches(chunks(batch, 2))
        if i not in (1, 3):
            opt.step(micro_batch_closure(loss_of, chunks(batch, 2)))
    torch.testing.assert_close(flat(model), run["weights"][-1], rtol=0, atol=1e-6)
    reference = opt.state_dict()
    for key, value in reference["state"].items():
        torch.testing.assert_close(run["state"]["state"][key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("unscale", [False, True])
@pytest.mark.parametrize("kind", ["sam", "eigen-sam"])
def test_scaler_step_after_first_step_equals_the_closure_step(kind: str, unscale: bool):
    """A loop of one's own: the pass at w, ``first_step(scaler=)``, the pass at w + ε, then
    ``scaler.step(optimizer)`` (after ``scaler.unscale_`` for clipping, or leaving the unscaling to
    the step): GradScaler calls ``step()`` even on inf, which restores w. The same skips, scales
    and weights as ``step(closure, scaler=)``, bit for bit."""
    batches = data(7, 16, torch.float32)
    reference = scaled_run(kind, {5, 13}, batches)
    model = mlp(torch.float32)
    opt = optimizer(kind, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    loss_of = Poisoned(model, {5, 13})
    skipped, scales, weights = [], [], [flat(model)]
    for batch in batches:
        closure = micro_batch_closure(bf16(loss_of), chunks(batch, 2), scaler=scaler)
        if isinstance(opt, EigenSAM):
            opt.refresh_batches(chunks(batch, 2))
        opt.zero_grad()
        closure()
        opt.first_step(zero_grad=True, scaler=scaler)
        if not opt.skipped:
            closure()
            if unscale:
                scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        skipped.append(opt.skipped)
        scales.append(scaler.get_scale())
        weights.append(flat(model))
    assert skipped == reference["skipped"] == [False, True, False, True, False, False, False]
    assert scales == reference["scales"]
    for mine, theirs in zip(weights, reference["weights"], strict=True):
        assert torch.equal(mine, theirs)
    assert opt.global_step == reference["global_step"] == 5


def test_the_scaler_is_exact_when_nothing_overflows():
    """Power-of-two scales commute with every floating-point operation: scaled bf16 SAM equals
    unscaled bf16 SAM bit for bit."""
    batches = data(5, 16, torch.float32)
    scaled = scaled_run("sam", set(), batches)
    model = mlp(torch.float32)
    opt = optimizer("sam", model)
    for batch in batches:
        opt.step(micro_batch_closure(bf16(lambda b: CE(model(b[0]), b[1])), chunks(batch, 2)))
    assert not any(scaled["skipped"])
    assert scaled["scales"][-1] > 2.0**12  # grew: the path really scaled
    assert torch.equal(flat(model), scaled["weights"][-1])


def test_eigen_sam_refresh_under_bf16_autocast_stays_in_float32():
    model = mlp(torch.float32)
    batch = data(1, 16, torch.float32)[0]
    estimates = []
    for autocast in (False, True):
        opt = optimizer("eigen-sam", model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            estimates.append(opt.refresh_eigenvector(batch))
    assert estimates[1].dtype == "float32"
    assert estimates[1] == estimates[0]


def test_a_step_without_closure_completes_the_first_step_and_cancel_restores():
    model = mlp(torch.float64)
    opt = optimizer("sam", model)
    batch = data(1, 8, torch.float64)[0]
    w = flat(model)
    CE(model(batch[0]), batch[1]).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(flat(model), w)
    opt.cancel_step()
    assert torch.equal(flat(model), w) and opt.global_step == 0
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    CE(model(batch[0]), batch[1]).backward()
    opt.first_step(zero_grad=True)
    CE(model(batch[0]), batch[1]).backward()
    opt.step()
    assert opt.global_step == 1
    with pytest.raises(ValueError, match="empty"):
        micro_batch_closure(lambda b: b, [])

"""What the finite-difference backend and Lanczos hold, counted in model-sized vectors from the
allocator's own events (torch's profiler): a product holds its result and one parameter's
gradient beside the weights, a gradient likewise, and a top-1 Lanczos solve with a basis of 4
holds about two vectors beside it; the lean step search (``lean=True``) holds one product's
buffer, as a later product does. The model is one large layer, so that a parameter's gradient
is a whole vector and activations are negligible."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.profiler import profile

from sharpscope.analysis import plan
from sharpscope.curvature import (
    HessianOperator,
    Objective,
    SolveSettings,
    hvp,
    lanczos,
    power_iteration,
    weight_shift,
)
from sharpscope.curvature.hvp import refined


def peak_vectors(fn: Callable[[], object], size: int) -> float:
    """The most bytes ``fn`` had allocated at once, in vectors of ``size`` float32."""
    with profile(profile_memory=True) as prof:
        fn()
    now = top = 0
    for event in sorted(prof.function_events, key=lambda e: e.time_range.start):
        now += event.self_cpu_memory_usage
        top = max(top, now)
    return top / (4 * size)


def _operator(lean: bool | None) -> HessianOperator:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(500, 500), torch.nn.Tanh(), torch.nn.Linear(500, 1))
    data = [(torch.randn(4, 500), torch.randn(4, 1))]
    objective = Objective(model, F.mse_loss, data)
    return HessianOperator(objective, backend="finite-difference", lean=lean)


@pytest.fixture
def op(monkeypatch: pytest.MonkeyPatch) -> HessianOperator:
    monkeypatch.setattr(weight_shift, "SHIFT_SLAB", 1 << 14)  # a move's scratch stays small
    return _operator(lean=False)


def test_a_product_holds_its_result_and_one_parameter_s_gradient(op):
    v = torch.randn(op.size)
    assert peak_vectors(lambda: op.matvec(v), op.size) <= 4.1  # the step search: a pair, 1 made
    assert peak_vectors(lambda: op.matvec(v), op.size) <= 2.1
    assert peak_vectors(op.gradient, op.size) <= 2.1


def test_a_top_1_lanczos_solve_holds_its_basis_and_two_vectors(op):
    op.matvec(torch.randn(op.size))  # the step is chosen
    settings = SolveSettings(max_iter=8, max_basis=4)
    assert peak_vectors(lambda: lanczos(op, 1, settings=settings), op.size) <= 4 + 3.1


def test_a_solve_done_again_does_not_hold_the_last_one(op, monkeypatch):
    op.matvec(torch.randn(op.size))
    settings = SolveSettings(max_iter=8, max_basis=4)
    once = peak_vectors(lambda: lanczos(op, 1, settings=settings), op.size)
    changed = iter([True, False])  # the step is chosen again once: one more solve
    monkeypatch.setattr(op, "refine_step", lambda v, tol: next(changed))
    again = peak_vectors(
        lambda: refined(op, lambda: lanczos(op, 1, settings=settings), 1e-3), op.size
    )
    assert again <= once + 0.1


def test_power_iteration_holds_its_vector_and_the_product(op):
    op.matvec(torch.randn(op.size))
    settings = SolveSettings(max_iter=6)
    assert peak_vectors(lambda: power_iteration(op, 1, settings=settings), op.size) <= 3.1


def test_the_lean_step_search_holds_one_product(monkeypatch):
    """First product, the step chosen again and the Richardson estimate on a held product: each
    holds one product's buffer and one parameter's gradient, as a later product does (the
    search with two products held: 4 vectors, 3 choosing again)."""
    monkeypatch.setattr(weight_shift, "SHIFT_SLAB", 1 << 14)
    op = _operator(lean=True)
    v = torch.randn(op.size)
    assert peak_vectors(lambda: op.matvec(v), op.size) <= 2.1
    u = v / v.norm()
    assert peak_vectors(lambda: op.refine_step(u, 1e-12), op.size) <= 2.1  # the whole search
    image = op.matvec(v)
    assert peak_vectors(lambda: op.difference_error(v, image), op.size) <= 2.1


@pytest.mark.parametrize(("free", "lean"), [(None, False), (0, False), (-1, True)])
def test_the_step_search_runs_lean_when_one_more_vector_would_not_fit(monkeypatch, free, lean):
    """``lean=None`` decides at the first product from the free memory: lean when it is below
    ``LEAN_MARGIN`` vectors (``free`` bytes more than that), not when it is unknown."""
    op = _operator(lean=None)
    if free is not None:
        free += int(plan.LEAN_MARGIN * op.size * 4)
    monkeypatch.setattr(hvp, "available_memory", lambda device: free)
    op.matvec(torch.randn(op.size))
    assert op.fd_lean is lean

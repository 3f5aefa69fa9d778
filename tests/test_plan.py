"""The cost stated before the long stages of an analysis, and the Lanczos bound chosen when the
whole basis would not fit in memory."""

from __future__ import annotations

import pytest
import torch

import sharpscope.analysis.analyze as pipeline
from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.plan import Plan
from sharpscope.analysis.sampling import TRACE_PROBES
from sharpscope.report.plan_line import duration, plan_line, sizes


def _run(mlp, config, monkeypatch=None, free=None):
    if monkeypatch is not None:
        monkeypatch.setattr(pipeline, "available_memory", lambda device: free)
    plans: list[Plan] = []
    seen: list[str] = []

    def progress(task: str, done: int, total: int) -> None:
        seen.append(task)

    def on_plan(plan: Plan) -> None:
        assert not seen, "the plan came after a long stage had started"
        plans.append(plan)

    result = analyze(mlp.model, mlp.loss_fn, mlp.batches, config, progress, on_plan)
    (plan,) = plans
    return result, plan


@pytest.mark.parametrize("bias", [False, True])
def test_the_plan_comes_first_and_bounds_the_run(mlp, bias):
    config = AnalyzeConfig(k=3, tol=1e-8, density=True, density_iter=10, bias=bias)
    result, plan = _run(mlp, config)
    assert plan.num_params == mlp.hessian.shape[0] == result.num_params
    assert plan.products == {
        "eigenpairs": 200 + 3 + 1,
        "trace": 100,
        "density": 40,
        "sampling": 3 + 1 + TRACE_PROBES,  # one per eigenvector and probe, over the shards
        **({"bias": 200} if bias else {}),  # opt-in: a Lanczos run of λ_max and λ_min per shard
    }
    assert result.n_products <= plan.most_products + 2 + 1  # + the plan's two, the SAM one
    assert plan.seconds_per_product > 0
    assert plan.vector_bytes == plan.num_params * 8 and plan.vectors == 201
    assert plan.chosen_max_basis is None


def test_a_basis_that_does_not_fit_is_bounded_with_the_same_answers(mlp, monkeypatch):
    config = AnalyzeConfig(k=3, tol=1e-10, max_iter=400, trace=False)
    full, _ = _run(mlp, config)
    vector = mlp.hessian.shape[0] * 8
    bounded, plan = _run(mlp, config, monkeypatch, free=2 * 12 * vector)  # room for 12 vectors
    assert plan.chosen_max_basis == 12 and plan.vectors == 12
    torch.testing.assert_close(bounded.top.eigenvalues, full.top.eigenvalues, rtol=1e-8, atol=0)
    assert any("`max_basis` 12 was chosen" in note for note in bounded.notes)
    assert "`max_basis` 12 is used" in plan_line(plan)


def test_a_given_bound_or_unknown_memory_is_left_alone(mlp, monkeypatch):
    _, given = _run(mlp, AnalyzeConfig(k=2, max_basis=9, trace=False), monkeypatch, free=1)
    assert given.chosen_max_basis is None and given.vectors == 9
    _, unknown = _run(mlp, AnalyzeConfig(k=2, trace=False), monkeypatch, free=None)
    assert unknown.chosen_max_basis is None and unknown.available_bytes is None
    assert "free" not in plan_line(unknown)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.000123, "0.12 ms"), (0.62, "620 ms"), (1.3, "1.3 s"), (250, "4.2 min"), (7300, "2 h")],
)
def test_durations(seconds, text):
    assert duration(seconds) == text


def test_the_line_says_sizes_products_and_time(mlp):
    _, plan = _run(mlp, AnalyzeConfig(k=2))
    line = plan_line(plan)
    for part in [
        f"{plan.num_params:,} parameters",
        "64 samples",
        f"at most {203 + 100 + 3 + TRACE_PROBES} products",  # no bias re-solve by default
    ]:
        assert part in line
    assert f"solver vectors ≤ {sizes(plan.basis_bytes)}" in line

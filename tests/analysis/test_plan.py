"""The cost stated before the long stages of an analysis, and the Lanczos bound chosen when the
whole basis would not fit in memory."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

import sharpscope.analysis.analyze as pipeline
from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.plan import Plan, basis_home, sizes
from sharpscope.analysis.sampling import TRACE_PROBES
from sharpscope.report.plan_line import duration, plan_line

lanczos_module = importlib.import_module("sharpscope.curvature.lanczos")  # not the function


def _run(mlp, config, monkeypatch=None, free=None):
    if monkeypatch is not None:
        monkeypatch.setattr(pipeline, "available_memory", lambda device: free)
    plans: list[Plan] = []
    seen: list[str] = []

    def progress(task: str, done: int, total: int) -> None:
        seen.append(task)

    def on_plan(plan: Plan) -> None:
        assert set(seen) <= {"loss and gradient"}, "the plan came after a long stage had started"
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


def _plan(products: dict[str, int], typical: dict[str, int], seconds: float) -> Plan:
    return Plan(64, 64, 1, products, typical, seconds, 8, 10, None)


def test_the_line_shows_the_typical_time_apart_from_the_bound():
    bound = {"eigenpairs": 206, "trace": 100, "sampling": 16}
    typical = {"eigenpairs": 50, "trace": 40, "sampling": 16}
    plan = _plan(bound, typical, 0.015)  # a fake timing: 15 ms per product
    assert plan.typical_seconds == pytest.approx(106 * 0.015)
    assert plan.most_seconds == pytest.approx(322 * 0.015)
    assert "≈ 15 ms each on 1 CPU thread: typically ≈ 1.6 s, at most 4.8 s;" in plan_line(plan)
    assert "thread: at most 4.8 s;" in plan_line(_plan(bound, bound, 0.015))  # no typical known


def test_the_line_of_a_sharded_run_gives_rank_0s_bytes():
    plan = replace(_plan({"eigenpairs": 10}, {"eigenpairs": 10}, 0.01), shard_bytes=4000)
    line = plan_line(plan)  # 10 vectors of 8 bytes: rank 0's pieces of a gradient
    assert "per rank: parameter shards 4 kB, a gradient's shard 8 B, solver vectors ≤ 80 B" in line
    assert "(10 × 8 B)" in line
    assert "per rank" not in plan_line(_plan({"eigenpairs": 10}, {"eigenpairs": 10}, 0.01))


@pytest.mark.parametrize(
    ("eigen", "trace"),
    [(52, 42), (47, 38), (57, 46), (30, 24)],  # measured: the digits MLP (k 5, 10), the CNN
)
def test_the_typical_estimate_is_within_twice_the_products_runs_took(eigen, trace):
    # the time per product is measured before the run: the estimate is off by the products only
    bound = {"eigenpairs": 206, "trace": 100, "sampling": 16}  # the defaults' (k = 5)
    typical = pipeline.typical_products(bound, pipeline.solver("lanczos"), 100)
    plan = _plan(bound, typical, 1.0)
    taken = 2 + eigen + trace + 16  # the plan's two products, the stages, the spread
    assert taken / 2 <= plan.typical_products <= 2 * taken < plan.most_products


def test_the_typical_count_is_lanczos_own_and_never_above_the_bound(mlp):
    result, plan = _run(mlp, AnalyzeConfig(k=2))
    assert all(plan.typical[stage] <= plan.products[stage] for stage in plan.products)
    assert plan.typical["eigenpairs"] == 50 and plan.typical["trace"] == 40
    assert result.n_products / 2 <= plan.typical_products <= 2 * result.n_products
    _, power = _run(mlp, AnalyzeConfig(k=2, method="power", max_iter=20, trace=False))
    assert power.typical == power.products  # no typical count known: the bound


def test_power_iteration_keeps_to_the_products_the_plan_bounds(mlp):
    # a tolerance it cannot reach: every pair runs to --max-iter
    config = AnalyzeConfig(k=2, method="power", tol=1e-14, max_iter=20, trace=False, shards=0)
    result, plan = _run(mlp, config)
    assert plan.products["eigenpairs"] == 20 * 3  # max_iter for each of the top 2 and λ_min
    assert result.stage_products["eigenvalues"] == plan.products["eigenpairs"]


GB = 10**9


@pytest.mark.parametrize(
    ("setting", "device", "device_free", "host_free", "home"),
    [
        ("auto", "cuda", 1 * GB, 100 * GB, "host"),  # device small, host large
        ("auto", "cuda", 1 * GB, 2 * GB, "device"),  # both small: bounded on the device
        ("auto", "cuda", 1 * GB, None, "device"),  # the host's free memory unknown
        ("auto", "cuda", 100 * GB, 100 * GB, "device"),  # device large
        ("auto", "cuda", None, 100 * GB, "device"),  # the device's free memory unknown
        ("auto", "cpu", 1 * GB, 100 * GB, "device"),  # the host is the device
        ("host", "cuda", 100 * GB, 1 * GB, "host"),  # named: as named
        ("device", "cuda", 1 * GB, 100 * GB, "device"),
    ],
)
def test_auto_puts_the_basis_on_the_host_only_when_it_fits_there_and_not_on_the_device(
    setting, device, device_free, host_free, home
):
    wanted, vector = 200, 20 * 10**6  # 4 GB of vectors
    assert basis_home(setting, torch.device(device), vector, wanted, device_free, host_free) == home


def test_a_host_basis_gives_the_same_answers_and_says_so(mlp, monkeypatch):
    """``basis_device="host"`` (forced on the CPU, streamed 2 vectors at a time): the plan says
    where the basis lies, the answers are the device path's; ``auto``'s choice is a note."""
    config = AnalyzeConfig(k=3, tol=1e-10, max_iter=400, trace=False)
    whole, _ = _run(mlp, config)
    monkeypatch.setattr(lanczos_module, "HOST_SLAB_BYTES", 2 * mlp.hessian.shape[0] * 8)
    host, plan = _run(mlp, replace(config, basis_device="host"), monkeypatch, free=10 * GB)
    assert plan.host_bytes == 10 * GB and plan.chosen_max_basis is None
    assert "in host memory, streamed to the device (10 GB free there" in plan_line(plan)
    torch.testing.assert_close(host.top.eigenvalues, whole.top.eigenvalues, rtol=1e-12, atol=0)
    assert not any("host" in note for note in host.notes)  # named, not chosen
    monkeypatch.setattr(pipeline, "basis_home", lambda *args: "host")  # as auto on a small GPU
    streamed: list[int | None] = []

    class Recording(lanczos_module.LanczosProcess):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            streamed.append(self.rows)

    monkeypatch.setattr(lanczos_module, "LanczosProcess", Recording)
    chosen, _ = _run(mlp, config)
    assert streamed and set(streamed) == {2}  # every solve kept its basis on the host
    assert any("it was kept in the host's" in note for note in chosen.notes)
    monkeypatch.undo()
    _, device = _run(mlp, config)  # on the CPU, auto keeps the basis where it is
    assert device.host_bytes is None and "host" not in plan_line(device)

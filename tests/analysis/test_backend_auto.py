"""``--backend auto`` (issue 23, item 2): double backward when its cached graph, estimated before
it is built, fits the free memory, finite differences otherwise; the plan line and the report
say which and why."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from sharpscope.analysis import analyze as analyze_module
from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.plan import GRAPH_SAFETY, LEAN_MARGIN, Plan
from sharpscope.curvature import hvp
from sharpscope.report.document import Inputs, Report
from sharpscope.report.plan_line import plan_line
from sharpscope.report.schema import schema_problem

CONFIG = {"k": 1, "trace": False, "density": False, "shards": 0, "slices": False}


def _problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, [(torch.randn(32, 4), torch.randint(0, 3, (32,))) for _ in range(2)]


def _run(monkeypatch: pytest.MonkeyPatch, free: int | None) -> tuple[object, list[Plan]]:
    monkeypatch.setattr(analyze_module, "available_memory", lambda device: free)
    plans: list[Plan] = []
    model, batches = _problem()
    config = AnalyzeConfig(backend="auto", **CONFIG)
    result = analyze(model, nn.functional.cross_entropy, batches, config, on_plan=plans.append)
    return result, plans


def test_auto_takes_finite_differences_when_the_graph_would_not_fit(monkeypatch):
    result, [plan] = _run(monkeypatch, 1000)
    choice = result.backend
    assert choice is not None and choice.backend == "finite-difference"
    assert choice.graph_bytes > 1000 / GRAPH_SAFETY and choice.available_bytes == 1000
    assert result.product_error is not None and result.product_error.finite_difference is not None
    line = plan_line(plan)
    assert "`backend` finite-difference: the double-backward graph ≈" in line
    assert "would not fit in 1 kB free" in line and "lean" not in line
    document = json.loads(Report.from_analysis(result, Inputs(dtype="float32")).dumps())
    assert schema_problem(document) is None
    assert document["results"]["backend"]["backend"] == "finite-difference"
    assert "would not fit" in document["results"]["backend"]["reason"]


def test_the_plan_says_when_the_step_search_is_lean(monkeypatch):
    """Where one more vector would not fit either, the step search holds one product's buffer
    (:func:`~sharpscope.analysis.plan.lean_search`), and the plan line says so."""
    monkeypatch.setattr(hvp, "available_memory", lambda device: LEAN_MARGIN * 4 * 16)
    result, [plan] = _run(monkeypatch, 1000)
    assert result.backend is not None and result.backend.backend == "finite-difference"
    assert plan.lean_search
    assert "the finite-difference step search is lean: one product's buffer" in plan_line(plan)


@pytest.mark.parametrize("free", [10**12, None])
def test_auto_takes_double_backward_when_it_fits(monkeypatch, free):
    result, [plan] = _run(monkeypatch, free)
    assert result.backend is not None and result.backend.backend == "double-backward"
    assert result.product_error is None or result.product_error.finite_difference is None
    assert "`backend` double-backward: the double-backward graph ≈" in plan_line(plan)
    model, batches = _problem()
    named = analyze(model, nn.functional.cross_entropy, batches, AnalyzeConfig(**CONFIG))
    assert torch.equal(named.top.eigenvalues, result.top.eigenvalues)
    assert named.backend is None


def test_auto_is_the_hessians_choice_only(monkeypatch):
    monkeypatch.setattr(analyze_module, "available_memory", lambda device: 1000)
    model, batches = _problem()
    config = AnalyzeConfig(backend="auto", curvature="ggn", **CONFIG)
    result = analyze(model, nn.functional.cross_entropy, batches, config)
    assert result.backend is None and not any("`backend`" in note for note in result.notes)


MEASURE = """
import gc, torch
from torch import nn
from sharpscope.curvature import HessianOperator, Objective

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.GELU(),
                      nn.Linear(512, 10))
data = [(torch.randn(2048, 64), torch.randint(0, 10, (2048,))) for _ in range(2)]
op = HessianOperator(Objective(model, nn.functional.cross_entropy, data))
gc.collect()
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here
v = torch.randn(op.size)
op.matvec(v)
op.matvec(v)
print(status("VmRSS:") - base, status("VmHWM:") - base, op.graph_bytes())
"""


@pytest.mark.integration
def test_the_estimate_is_within_the_safety_factor_of_the_measured_peak():
    """In a fresh process (no reused heap): the graph held after two products is 1 to 4 times
    the estimate (1.4–2.6 idle, 3.1 beside other jobs), the peak while it was built at most
    :data:`GRAPH_SAFETY` times."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True, timeout=300
    )
    held, peak, estimate = map(int, out.stdout.split())
    assert estimate <= held <= 4 * estimate
    assert held <= peak <= GRAPH_SAFETY * estimate

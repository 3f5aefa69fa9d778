"""SharpnessTracker: its figures against dense float64 Hessians, warm starts, its logs, and a
training state it leaves exactly as it found it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ground_truth import batches_hessian
from refined_spy import spied_refined
from torch import nn
from typer.testing import CliRunner

import sharpscope.training.tracking as tracking_module
from sharpscope import SharpnessTracker
from sharpscope.analysis.critical_sharpness import critical_sharpness
from sharpscope.cli.app import app
from sharpscope.curvature import FisherOperator, GGNOperator, Objective, SolveSettings, lanczos
from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss
from sharpscope.optim import EigenSAM
from sharpscope.training.metrics import read_rows
from sharpscope.training.sinks import JsonlLog, TensorBoardLog
from sharpscope.training.tracking import tracker_for

CE = nn.functional.cross_entropy


def problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 MLP with BatchNorm and dropout, and two probe batches."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, [(x[:24], y[:24]), (x[24:], y[24:])]


def test_figures_match_the_dense_hessian():
    model, batches = problem()
    tracker = SharpnessTracker(
        Objective(model, CE, batches),
        lambda_min=True,
        trace=True,
        tol=1e-8,
        products=None,
        max_iter=200,
        trace_samples=40,
    )
    m = tracker.measure(step=0)
    eigenvalues = torch.linalg.eigvalsh(batches_hessian(model, CE, batches))
    assert abs(m.lambda_max - float(eigenvalues[-1])) <= m.lambda_max_residual + 1e-12
    assert abs(m.lambda_min - float(eigenvalues[0])) <= m.lambda_min_residual + 1e-12
    assert m.lambda_max_converged and m.lambda_min_converged
    assert abs(m.trace - float(eigenvalues.sum())) <= 4 * m.trace_error
    assert m.n_products == m.eigen_products + 40 and m.product_dtype == "float64"
    assert 0 <= m.alignment <= 1 and not m.warm_start


def dense_ggn(model: nn.Module, batches: list) -> torch.Tensor:
    """The float64 GGN ``Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i / n`` of the mean cross-entropy, each
    row of the logits' Jacobian J by autograd, in eval mode."""
    params = list(model.parameters())
    was = model.training
    model.eval()
    x = torch.cat([x for x, _ in batches])
    logits = model(x)
    jac = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(z, params, retain_graph=True)])
            for z in logits.reshape(-1)
        ]
    ).reshape(*logits.shape, -1)
    p = logits.detach().softmax(-1)
    out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    model.train(was)
    return torch.einsum("nap,nab,nbq->pq", jac, out, jac) / len(x)


def test_the_ggn_tracker_measures_the_ggn_operator_s_lambda_max():
    model, batches = problem()
    tracked = SharpnessTracker(
        Objective(model, CE, batches), curvature="ggn", tol=1e-10, products=None, max_iter=200
    )
    m = tracked.measure(step=3)
    reference = lanczos(
        GGNOperator(Objective(model, CE, batches)),
        1,
        settings=SolveSettings(tol=1e-10, max_iter=200, seed=1),
    )
    dense = float(torch.linalg.eigvalsh(dense_ggn(model, batches))[-1])
    assert m.curvature == "ggn" and m.row()["curvature"] == "ggn" and m.lambda_max_converged
    assert m.lambda_max == pytest.approx(float(reference.eigenvalues[0]), rel=1e-9, abs=1e-12)
    assert abs(m.lambda_max - dense) <= m.lambda_max_residual + 1e-12
    hessian = SharpnessTracker(
        Objective(model, CE, batches), tol=1e-10, products=None, max_iter=200
    )
    assert abs(hessian.measure().lambda_max - m.lambda_max) > 1e-6  # another matrix: 2e-4 apart


def test_the_fisher_tracker_draws_its_labels_with_its_seed():
    model, batches = problem()
    settings = dict(tol=1e-10, max_iter=200)
    ce = resolve_loss("cross-entropy")  # the fisher's draws need a built-in loss
    fisher = dict(curvature="fisher", products=None, **settings)
    m = SharpnessTracker(Objective(model, ce, batches), seed=5, **fisher).measure()  # type: ignore[arg-type]
    other = SharpnessTracker(Objective(model, ce, batches), seed=6, **fisher).measure()  # type: ignore[arg-type]
    seeded = FisherOperator(Objective(model, ce, batches), seed=5)
    reference = float(lanczos(seeded, 1, settings=SolveSettings(**settings)).eigenvalues[0])
    assert m.curvature == "fisher"
    assert m.lambda_max == pytest.approx(reference, rel=1e-9)
    assert abs(other.lambda_max - m.lambda_max) > 1e-6  # other draws, another matrix
    empirical = SharpnessTracker(
        Objective(model, CE, batches), curvature="empirical-fisher"
    ).measure()
    assert empirical.curvature == "empirical-fisher" and empirical.lambda_max > 0
    with pytest.raises(InputError, match="unknown `curvature` 'gauss-newton'"):
        SharpnessTracker(Objective(model, CE, batches), curvature="gauss-newton")


def test_measuring_leaves_the_training_state_untouched():
    """Mode, BatchNorm buffers, .grad, parameters and the random stream, inside autocast."""
    model, batches = problem()
    model.train()
    CE(model(batches[0][0]), batches[0][1]).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    tracker = SharpnessTracker(Objective(model, CE, batches), lambda_min=True, trace=True, every=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tracker(1) is None  # not a tracking step
        m = tracker(2)
    assert m is not None and m.product_dtype == "float64"  # products outside autocast
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    outside = SharpnessTracker(Objective(model, CE, batches), lambda_min=True).measure()
    assert outside.lambda_max == pytest.approx(m.lambda_max, rel=1e-9)


@pytest.mark.parametrize("lambda_min", [False, True], ids=["top", "both-ends"])
def test_a_warm_start_takes_fewer_products_than_a_cold_one(lambda_min: bool):
    model, batches = problem()
    model.eval()  # no dropout: plain gradient descent on the probe loss
    options = dict(lambda_min=lambda_min, tol=1e-6, products=None, max_iter=200)
    warm = SharpnessTracker(Objective(model, CE, batches), **options)
    cold = SharpnessTracker(Objective(model, CE, batches), warm_start=False, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    warm.measure(0)
    for step in range(1, 4):
        optimizer.zero_grad()
        sum(CE(model(x), y) for x, y in batches).backward()
        optimizer.step()
        w, c = warm.measure(step), cold.measure(step)
        assert w.warm_start and not c.warm_start
        assert w.lambda_max_converged and c.lambda_max_converged
        assert w.eigen_products < c.eigen_products, step
        assert abs(w.lambda_max - c.lambda_max) <= w.lambda_max_residual + c.lambda_max_residual


@pytest.mark.parametrize(("products", "measurements"), [(1, 150), (2, 40)])
def test_a_budget_refines_lambda_max_across_measurements_to_the_dense_one(
    products: int, measurements: int
):
    """A fixed model measured again and again with 1 or 2 products each: every figure's
    residual is the true ‖Hv − λv‖ of the dense float64 Hessian, and λ_max reaches the dense
    λ_max."""
    model, batches = problem()
    hessian = batches_hessian(model, CE, batches)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    exact = float(eigenvalues[-1])
    tracker = SharpnessTracker(Objective(model, CE, batches), products=products, tol=1e-6)
    measured = []
    for step in range(measurements):
        m = tracker.measure(step)
        v = tracker._top
        true = float(torch.linalg.vector_norm(hessian @ v - m.lambda_max * v))
        assert m.lambda_max == pytest.approx(float(v @ hessian @ v), rel=1e-12)
        assert m.lambda_max_residual == pytest.approx(true, rel=1e-6, abs=1e-13)
        assert m.eigen_products <= products and m.n_products == m.eigen_products
        assert float((eigenvalues - m.lambda_max).abs().min()) <= m.lambda_max_residual + 1e-12
        assert m.lambda_max <= exact + 1e-12  # a Rayleigh quotient: never above λ_max
        measured.append(m)
    assert not measured[0].lambda_max_converged  # from a random start
    assert measured[-1].lambda_max_converged and measured[-1].warm_start
    assert abs(measured[-1].lambda_max - exact) <= 1e-9 * exact
    errors = [abs(m.lambda_max - exact) for m in measured]
    assert errors[-1] < 1e-6 * errors[0]


def test_one_product_by_budget_or_by_max_iter_is_the_same_measurement():
    """``products=1`` and a solve capped at ``max_iter=1`` (finetune's ``--track-iters 1``) take
    the same one-product path: identical rows, measurement after measurement."""
    model, batches = problem()
    budget = SharpnessTracker(Objective(model, CE, batches), products=1)
    capped = SharpnessTracker(Objective(model, CE, batches), products=None, max_iter=1)
    for step in range(3):
        a, b = budget.measure(step).row(), capped.measure(step).row()
        del a["seconds"], b["seconds"]
        assert a == b and a["eigen_products"] == 1


def test_a_budget_tracks_both_ends_with_true_residuals():
    model, batches = problem()
    hessian = batches_hessian(model, CE, batches)
    tracker = SharpnessTracker(Objective(model, CE, batches), products=3, lambda_min=True)
    for step in range(3):
        m = tracker.measure(step)
        assert m.eigen_products <= 3 and m.lambda_min is not None
        for value, residual, v in [
            (m.lambda_max, m.lambda_max_residual, tracker._top),
            (m.lambda_min, m.lambda_min_residual, tracker._bottom),
        ]:
            true = float(torch.linalg.vector_norm(hessian @ v - value * v))
            assert residual == pytest.approx(true, rel=1e-6, abs=1e-13)
    with pytest.raises(ValueError, match="`products` must be at least 1"):
        SharpnessTracker(Objective(model, CE, batches), products=0)


@pytest.mark.parametrize("products", [None, 2], ids=["solve", "budget"])
def test_a_resumed_tracker_measures_as_an_uninterrupted_one(products: int | None):
    model, batches = problem()
    straight = SharpnessTracker(Objective(model, CE, batches), products=products)
    straight.measure(0)
    resumed = SharpnessTracker(Objective(model, CE, batches), products=products)
    resumed.load_state_dict(straight.state_dict())
    with torch.no_grad():
        model[0].weight.mul_(1.01)
    again, reference = resumed.measure(1).row(), straight.measure(1).row()
    del again["seconds"], reference["seconds"]
    assert again == reference and again["warm_start"]


def test_eigen_sam_alignment_is_one_for_the_measured_eigenvector():
    model, batches = problem()
    optimizer = EigenSAM(torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=CE)
    tracker = SharpnessTracker(
        Objective(model, CE, batches), eigen_sam=optimizer, tol=1e-10, products=None, max_iter=200
    )
    assert tracker.measure().esam_v1_alignment is None  # no estimate yet
    names = [n for n, _ in model.named_parameters()]
    v1 = tracker._top
    sizes = [p.numel() for p in model.parameters()]
    parts = torch.split(-v1, sizes)  # the sign does not matter
    optimizer.set_eigenvector(
        {n: t.reshape(p.shape) for n, t, p in zip(names, parts, model.parameters(), strict=True)}
    )
    assert tracker.measure().esam_v1_alignment == pytest.approx(1.0, abs=1e-9)


def test_rows_go_to_lists_jsonl_tensorboard_and_callables(tmp_path: Path):
    model, batches = problem()
    rows: list[dict] = []
    seen: list[dict] = []
    path = tmp_path / "logs" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text(
        '{"step": 0, "lambda_max": 1.0}\n{"step": 1, "lam'
    )  # a killed writer's cut line
    scalars: list[tuple[str, float, int]] = []

    class Writer:
        def add_scalar(self, name: str, value: float, step: int) -> None:
            scalars.append((name, value, step))

        def flush(self) -> None: ...

        def close(self) -> None: ...

    tracker = SharpnessTracker(
        Objective(model, CE, batches), every=1, log=(rows, str(path), Writer(), seen.append)
    )
    tracker(3)
    tracker(4)
    tracker.close()
    assert [r["step"] for r in rows] == [3, 4] and rows == seen
    assert rows[0]["lambda_min"] is None and rows[0]["trace"] is None  # not measured: None, not 0
    assert [r["step"] for r in read_rows(path)] == [0, 3, 4]
    assert json.loads(path.read_text().splitlines()[-1])["lambda_max"] == rows[1]["lambda_max"]
    names = {name for name, _, _ in scalars}
    assert "sharpness/lambda_max" in names and "sharpness/lambda_min" not in names
    assert (
        "sharpness/product_dtype" not in names
        and ("sharpness/lambda_max", rows[1]["lambda_max"], 4) in scalars
    )
    board = TensorBoardLog(tmp_path / "board")
    board({"step": 1, "lambda_max": 2.0})
    board.close()
    assert list((tmp_path / "board").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="a file log must be a"):
        SharpnessTracker(Objective(model, CE, batches), log=str(tmp_path / "log.txt"))
    JsonlLog(tmp_path / "new" / "m.jsonl").close()  # makes its folder
    assert (tmp_path / "new" / "m.jsonl").read_text() == ""


@pytest.mark.integration
def test_importing_sharpscope_imports_no_training_framework():
    code = (
        "import sys, sharpscope, sharpscope.cli.app; sharpscope.SharpnessTracker; "
        "import sharpscope.integrations; "
        "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning', "
        "'tensorboard', 'accelerate') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_callbacks_tracker_routes_objective_fields_to_the_objective():
    """tracker_for (both training callbacks) sends ``params`` and ``batch_stats`` to the
    Objective and the rest to the tracker: the same figures as the tracker built by hand."""
    model, batches = problem()
    options = dict(params="0.*", batch_stats=True, products=None, tol=1e-10, max_iter=200)
    made = tracker_for(model, CE, batches, 3, **options)
    by_hand = SharpnessTracker(
        Objective(model, CE, batches, params="0.*", batch_stats=True),
        3,
        products=None,
        tol=1e-10,
        max_iter=200,
    )
    assert made.every == 3 and made.objective.params == "0.*" and made.objective.batch_stats
    assert made.measure().lambda_max == by_hand.measure().lambda_max
    everything = SharpnessTracker(Objective(model, CE, batches), products=None, tol=1e-10)
    assert abs(everything.measure().lambda_max - made.measure().lambda_max) > 1e-6


def test_the_critical_measure_follows_the_last_update_without_a_product():
    """``critical``: λ_c along the step's own update (Δw/lr, here SGD with momentum) when told of
    the step, else along −g; no product, so no λ_max; ``both`` measures both; the training state
    is as it was."""
    model, batches = problem()
    objective = Objective(model, CE, batches)
    rows: list[dict] = []
    tracker = SharpnessTracker(objective, every=1, measure="critical", log=rows)
    first = tracker.measure(step=0)
    assert (first.lambda_c_direction, first.n_products, first.lambda_max) == ("-gradient", 0, None)
    assert first.lambda_c_low <= first.lambda_c <= first.lambda_c_high
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in (1, 2):
        tracker.step_started(step, optimizer.param_groups[0]["lr"])
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        CE(model(batches[0][0]), batches[0][1]).backward()
        optimizer.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        measured = tracker(step)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    change = zip(model.parameters(), before, strict=True)
    update = torch.cat([(p.detach() - q).reshape(-1) for p, q in change])
    expected = critical_sharpness(objective, update / 0.1, eta=0.1)
    assert measured.lambda_c_direction == "update" and measured.lambda_c_passes > 0
    assert (measured.lambda_c_low, measured.lambda_c_high) == pytest.approx(
        (expected.low, expected.high), rel=0.06
    )  # the same search from the last η_c, bracketed to 1.05 each
    assert [r["lambda_c_direction"] for r in rows] == ["-gradient", "update", "update"]
    both = SharpnessTracker(objective, measure="both").measure()
    assert both.lambda_max is not None and both.lambda_c is not None and both.n_products > 0
    with pytest.raises(InputError, match="`measure`"):
        SharpnessTracker(objective, measure="lambda_c")
    with pytest.raises(ValueError, match="`lambda_min`"):
        SharpnessTracker(objective, measure="critical", lambda_min=True)


def test_a_finetune_run_tracks_the_critical_sharpness_every_interval(
    finetune_files: dict[str, Path], tmp_path: Path
):
    run = tmp_path / "run"
    args = [
        *("finetune", str(finetune_files["checkpoint"]), "--data", str(finetune_files["data"])),
        *("--batch-size", "32", "--lr", "0.05", "--probe-size", "64", "--steps", "6"),
        *("--track-every", "2", "--track-measure", "critical", "--out", str(run), "--quiet"),
        *("--device", "cpu"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert all(r["lambda_c_low"] > 0 and r["lambda_c_high"] is not None for r in rows)
    assert [r["lambda_c_direction"] for r in rows] == ["-gradient"] + ["update"] * 3
    assert all(r["lambda_max"] is None for r in rows)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lambda_c", "lambda_c_low", "lambda_c_high", "lambda_c_direction"} <= set(header)
    assert json.loads((run / "config.json").read_text())["track_measure"] == "critical"


def test_a_finite_difference_tracker_measures_the_dense_lambda_max_and_refines_its_step(
    monkeypatch: pytest.MonkeyPatch,
):
    """backend finite-difference reaches the tracker's products (the callbacks' tracker_for
    too), its λ_max is the dense Hessian's to the products' error, and its solve goes through
    refined (the step chosen again on v₁), as analyze's does."""
    model, batches = problem()
    top = float(torch.linalg.eigvalsh(batches_hessian(model, CE, batches))[-1])
    solves = spied_refined(monkeypatch, tracking_module)
    options = dict(products=None, tol=1e-8, max_iter=200)
    exact = SharpnessTracker(Objective(model, CE, batches), **options).measure()
    differences = tracker_for(model, CE, batches, 1, backend="finite-difference", **options)
    measured = differences.measure()
    assert solves == [("double-backward", 1e-8), ("finite-difference", 1e-8)]
    assert measured.lambda_max == pytest.approx(top, rel=1e-7)
    assert measured.lambda_max != exact.lambda_max  # other products: differences of gradients
    with pytest.raises(InputError, match="`backend`"):
        SharpnessTracker(Objective(model, CE, batches), backend="auto")

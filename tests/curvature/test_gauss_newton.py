"""The GGN and the Fisher operators against dense float64 references built from the output
Jacobian (one backward per output entry) and from per-sample gradients; their batch-split
invariance; every estimator on them; ``--curvature`` end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_hf import bert
from torch import nn
from typer.testing import CliRunner

from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.gate import GateInput, Reading, Thresholds, gate
from sharpscope.batches import logits_of
from sharpscope.cli.app import app
from sharpscope.curvature import (
    CURVATURES,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    Objective,
    SolveSettings,
    deflated_trace,
    hutchpp,
    lanczos,
    lanczos_extremes,
    power_iteration,
    select_params,
    slq,
)
from sharpscope.curvature.label_draws import per_sample_draw, sample_seeds
from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss
from sharpscope.structures import call_model

CE, MSE = resolve_loss("cross-entropy"), resolve_loss("mse")


def _dense(op) -> torch.Tensor:
    return torch.stack([op.matvec(e) for e in torch.eye(op.size, dtype=torch.float64)])


def _jacobian(model: nn.Module, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (N, C) and their Jacobian (N, C, P) in the trainable parameters, by one
    first-order backward per logit."""
    params = select_params(model).params
    z = logits_of(call_model(model.eval(), inputs))
    rows = []
    for entry in z.reshape(-1):
        grads = torch.autograd.grad(entry, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return z.detach(), torch.stack(rows).reshape(*z.shape, -1)


def _softmax_hessian(z: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z, dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def _ggn_reference(model, inputs) -> torch.Tensor:
    """Σ_n J_nᵀ (diag p − ppᵀ) J_n / N: the GGN of the mean cross-entropy."""
    z, jac = _jacobian(model, inputs)
    return torch.einsum("ncp,ncd,ndq->pq", jac, _softmax_hessian(z), jac) / len(z)


def _fisher_reference(model, inputs, labels) -> torch.Tensor:
    """Σ_n g_n g_nᵀ / N with g_n the gradient of sample n's cross-entropy at ``labels``."""
    z, jac = _jacobian(model, inputs)
    residual = torch.softmax(z, dim=1) - nn.functional.one_hot(labels, z.shape[1])
    grads = torch.einsum("nc,ncp->np", residual, jac)
    return grads.T @ grads / len(z)


def _drawn(model, inputs, targets, seed=0) -> torch.Tensor:
    """The labels the Fisher draws for these samples."""
    z = logits_of(call_model(model.eval(), inputs)).detach()
    return CE.sample_targets(
        z, targets, per_sample_draw(sample_seeds(inputs, targets, seed), z.device)
    )


def _top(matrix: torch.Tensor, k: int = 5) -> torch.Tensor:
    return torch.linalg.eigvalsh(matrix).flip(0)[:k]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_ggn_and_fisher_match_dense_references(name, mlp, cnn):
    problem = {"mlp": mlp, "cnn": cnn}[name]
    model, x, y = problem.model, problem.inputs, problem.targets
    references = {
        GGNOperator: _ggn_reference(model, x),
        EmpiricalFisherOperator: _fisher_reference(model, x, y),
        FisherOperator: _fisher_reference(model, x, _drawn(model, x, y)),
    }
    for kind, reference in references.items():
        op = kind(Objective(model, CE, problem.split(20)))
        torch.testing.assert_close(_dense(op), reference, rtol=0, atol=1e-12)
        found = lanczos(op, 5, settings=SolveSettings(tol=1e-10, max_iter=op.size)).eigenvalues
        torch.testing.assert_close(found, _top(reference), rtol=1e-8, atol=0)


def test_the_drawn_labels_are_the_models_not_the_data(mlp):
    drawn = _drawn(mlp.model, mlp.inputs, mlp.targets)
    assert drawn.shape == mlp.targets.shape and 0 < int((drawn != mlp.targets).sum()) < len(drawn)
    again = _drawn(mlp.model, mlp.inputs, mlp.targets, seed=1)
    assert not torch.equal(drawn, again)


def test_ggn_equals_the_hessian_of_a_linear_model_with_mse():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    batches = list(zip(x.split(8), y.split(8), strict=True))
    ggn = _dense(GGNOperator(Objective(model, MSE, batches)))
    torch.testing.assert_close(
        ggn, _dense(HessianOperator(Objective(model, MSE, batches))), rtol=0, atol=1e-14
    )
    assert torch.linalg.eigvalsh(ggn).min() > 0


@pytest.mark.parametrize("kind", [GGNOperator, FisherOperator, EmpiricalFisherOperator])
def test_batch_splits_and_caching_leave_the_operator_unchanged(kind, cnn):
    v = torch.randn(select_params(cnn.model).size, generator=torch.Generator().manual_seed(3))
    v = v.double()
    whole = kind(Objective(cnn.model, CE, cnn.batches)).matvec(v)
    for size, cache in ((7, True), (16, False), (1, True)):
        op = kind(Objective(cnn.model, CE, cnn.split(size)), cache_graph=cache)
        torch.testing.assert_close(op.matvec(v), whole, rtol=0, atol=1e-13)
        torch.testing.assert_close(op.matvec(v), whole, rtol=0, atol=1e-13)
        assert op.n_products == 2


def test_token_losses_weight_tokens_not_batches():
    """A causal LM's GGN and Fisher over ignored (-100) tokens: batches of different numbers of
    labelled tokens weigh by their tokens, as the Hessian does."""
    model = nn.Sequential(nn.Embedding(7, 5), nn.Tanh(), nn.Linear(5, 7)).double()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (6, 5), generator=gen)
    labels = ids.clone()
    labels[:2, 2:] = -100
    loss = resolve_loss("causal-lm")
    pieces = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    v = torch.randn(select_params(model).size, generator=gen, dtype=torch.float64)
    for kind in (GGNOperator, FisherOperator, EmpiricalFisherOperator):
        whole = kind(Objective(model, loss, [(ids, labels)])).matvec(v)
        torch.testing.assert_close(
            kind(Objective(model, loss, pieces)).matvec(v), whole, rtol=0, atol=1e-13
        )
    # the GGN of a model linear in its (output-layer) weights is that block's Hessian
    ggn = GGNOperator(Objective(model, loss, pieces, "2.*"))
    torch.testing.assert_close(
        _dense(ggn),
        _dense(HessianOperator(Objective(model, loss, pieces, "2.*"))),
        rtol=0,
        atol=1e-14,
    )


def test_ggn_of_a_dict_input_transformer_matches_its_dense_reference():
    model = bert(num_labels=3, attn_implementation="eager").double()
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, 24, (4, 6), generator=gen),
        "attention_mask": torch.tensor([[1] * 6, [1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]]),
    }
    targets = torch.tensor([0, 2, 1, 2])
    params = ["classifier.*", "bert.pooler.*", "bert.encoder.layer.0.output.*"]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(g[:-1]) for g in params))
    reference = _ggn_reference(model, inputs)
    op = GGNOperator(Objective(model, CE, [(inputs, targets)]))
    torch.testing.assert_close(_dense(op), reference, rtol=0, atol=1e-12)
    found = lanczos(op, 5, settings=SolveSettings(tol=1e-10, max_iter=op.size)).eigenvalues
    torch.testing.assert_close(found, _top(reference), rtol=1e-8, atol=0)


@pytest.mark.parametrize("kind", [HessianOperator, GGNOperator, FisherOperator])
def test_every_estimator_works_on_every_operator(kind, mlp):
    op = kind(Objective(mlp.model, CE, mlp.split(32)))
    dense = _dense(op)
    exact = torch.linalg.eigvalsh(dense)
    top, bottom = lanczos_extremes(
        op, 3, keep_subspace=True, settings=SolveSettings(tol=1e-9, max_iter=op.size)
    )
    torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:3], rtol=1e-7, atol=0)
    assert abs(float(bottom.eigenvalues[0]) - float(exact[0])) < 1e-8 * float(exact[-1])
    power = power_iteration(op, 1, settings=SolveSettings(tol=1e-7, max_iter=2000)).eigenvalues[0]
    assert abs(float(power) - float(exact[-1])) < 1e-5 * float(exact[-1])
    trace = float(dense.trace())
    for estimate in (
        hutchpp(op, settings=SolveSettings(tol=1e-3, max_iter=100)),
        deflated_trace(op, top.subspace, settings=SolveSettings(tol=1e-3, max_iter=100)),
    ):
        low, high = estimate.interval
        assert low <= trace <= high or abs(estimate.estimate - trace) < 1e-6 * trace
    density = slq(op, n_vectors=2, n_iter=op.size)
    assert abs(density.mean - trace / op.size) < 0.5 * trace / op.size
    if kind is not HessianOperator:
        assert float(exact[0]) > -1e-12 * float(exact[-1])  # positive semi-definite


def test_the_true_fisher_needs_a_builtin_loss(mlp):
    with pytest.raises(Exception, match="built-in `loss`"):
        FisherOperator(Objective(mlp.model, nn.functional.cross_entropy, mlp.batches))
    # the empirical Fisher takes any per-sample loss
    plain = EmpiricalFisherOperator(Objective(mlp.model, nn.functional.cross_entropy, mlp.batches))
    torch.testing.assert_close(_dense(plain), _fisher_reference(mlp.model, mlp.inputs, mlp.targets))


def test_restricted_keeps_the_kind_and_its_settings(mlp):
    op = FisherOperator(Objective(mlp.model, CE, mlp.split(16)), seed=3)
    part = op.replace(
        op.objective.replace(batches=mlp.split(16)[:2], params=["2.*"]), cache_graph=False
    )
    assert type(part) is FisherOperator and part.seed == 3 and not part.cache_graph
    assert set(CURVATURES) == {"hessian", "ggn", "fisher", "empirical-fisher"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sharpscope.io.architectures import mlp
    from sharpscope.io.checkpoints import save_checkpoint
    from sharpscope.io.models import ModelSpec

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ggn") / "mlp.safetensors"
    spec = ModelSpec("mlp", {"hidden": (8,)})
    save_checkpoint(path, mlp(hidden=(8,)), spec)
    return path


FAST = ["--data", "digits", "--samples", "64", "--batch-size", "32", "--top-k", "2", "--quiet"]


def test_the_curvature_flag_names_the_operator_in_the_report(checkpoint):
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", str(checkpoint), *FAST, "--curvature", "ggn", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["results"]["curvature"] == "ggn" and doc["inputs"]["config"]["curvature"] == "ggn"
    lam_min = doc["results"]["lambda_min"]
    assert lam_min["value"] >= -(lam_min["residual"] + 1e-6 * doc["results"]["lambda_max"])
    table = runner.invoke(app, ["analyze", str(checkpoint), *FAST, "--curvature", "fisher"])
    assert table.exit_code == 0, table.stderr
    assert "Top Fisher eigenvalues" in table.stdout and "positive semi-definite" in table.stdout
    checked = runner.invoke(
        app,
        [
            "check",
            str(checkpoint),
            *FAST,
            "--curvature",
            "empirical-fisher",
            "--max-eigenvalue",
            "1e9",
        ],
    )
    assert checked.exit_code == 0, checked.stderr


def test_a_bad_curvature_is_one_line_and_exit_2(checkpoint):
    result = CliRunner().invoke(app, ["analyze", str(checkpoint), *FAST, "--curvature", "gnn"])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--curvature" in lines[0] and "ggn" in lines[0], result.stderr


def test_a_baseline_of_another_curvature_is_refused():
    reading = {"lambda_max": Reading(2.0, 1e-6, None)}
    report = GateInput(reading, 2, 1, (), {}, curvature="ggn")
    baseline = GateInput(reading, 2, 1, (), {})
    with pytest.raises(InputError, match=r"baseline.s figures are of the hessian .* the ggn"):
        gate(report, Thresholds(max_increase=0.1), baseline, allow_different_data=True)
    assert gate(report, Thresholds(max_increase=0.1), replace(baseline, curvature="ggn"))


def test_masked_lm_ggn_and_fisher_over_labelled_tokens_match_dense_references():
    """Token cross-entropy with ignored positions: Σ over labelled tokens of Jₜᵀ(diag p − ppᵀ)Jₜ
    (and rₜrₜᵀ for the empirical Fisher) over T, in batches of different token counts."""
    model = nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Linear(4, 7)).double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (5, 4), generator=gen)
    labels = torch.where(torch.rand(5, 4, generator=gen) < 0.4, -100, ids)
    loss = resolve_loss("masked-lm")
    z, jac = _jacobian(model, ids)  # (5, 4, 7) logits, (5, 4, 7, P)
    keep = labels != -100
    z, jac, y = z[keep], jac[keep], labels[keep]  # the labelled tokens
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, _softmax_hessian(z), jac) / len(y)
    residual = torch.softmax(z, dim=1) - nn.functional.one_hot(y, 7)
    grads = torch.einsum("nc,ncp->np", residual, jac)
    pieces = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    torch.testing.assert_close(
        _dense(GGNOperator(Objective(model, loss, pieces))), ggn, rtol=0, atol=1e-13
    )
    fisher = _dense(EmpiricalFisherOperator(Objective(model, loss, pieces)))
    torch.testing.assert_close(fisher, grads.T @ grads / len(y), rtol=0, atol=1e-13)


def test_pyhessian_refuses_another_curvature(mlp):
    config = AnalyzeConfig(method="pyhessian", curvature="ggn", shards=0, trace=False)
    with pytest.raises(InputError, match="pyhessian computes the Hessian only, not the ggn"):
        analyze(mlp.model, CE, mlp.batches, config)

"""One Objective that every curvature operator takes, ``replace`` to derive an operator on another
objective or with other settings, ``curvature_operator`` to build one by name, and estimators
that take their precision as a keyword-only SolveSettings."""

from __future__ import annotations

import pytest
import torch
from ground_truth import Problem

from sharpscope.curvature import (
    CURVATURES,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    Objective,
    SolveSettings,
    curvature_operator,
    hutchinson,
    lanczos,
)
from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss


def _random(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _block(problem: Problem, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat indices of the parameters named ``prefix``*, and the dense Hessian's block."""
    offsets, start = [], 0
    for name, p in problem.model.named_parameters():
        if name.startswith(prefix):
            offsets += range(start, start + p.numel())
        start += p.numel()
    index = torch.tensor(offsets)
    return index, problem.hessian[index][:, index]


def test_replace_on_other_parameters_is_the_dense_hessians_block(mlp: Problem):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.split(16)))
    block = op.replace(op.objective.replace(params="2.*"))
    index, dense = _block(mlp, "2.")
    assert block.size == len(index) and block.space.names == ("2.weight", "2.bias")
    v = _random(block.size)
    torch.testing.assert_close(block.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)
    assert op.size == mlp.hessian.shape[0]  # the original is unchanged


def test_replace_on_other_batches_is_the_operator_of_those_batches(mlp: Problem):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.split(16)[:1]))
    whole = op.replace(op.objective.replace(batches=mlp.split(16)))
    v = _random(whole.size, 1)
    torch.testing.assert_close(whole.matvec(v), mlp.hessian @ v, rtol=1e-10, atol=1e-12)
    assert (op.num_samples, whole.num_samples) == (16, 64)


def test_replace_keeps_each_kinds_own_settings(mlp: Problem):
    """The backend, the seed of the label draws and the graph caching carry over unless given."""
    objective = Objective(mlp.model, resolve_loss("cross-entropy"), mlp.split(32))
    hessian = HessianOperator(objective, backend="forward-over-reverse")
    assert hessian.replace().backend == "forward-over-reverse"
    fisher = FisherOperator(objective, seed=3, cache_graph=False)
    again = fisher.replace()
    assert (again.seed, again.cache_graph) == (3, False)
    v = _random(fisher.size, 2)
    torch.testing.assert_close(again.matvec(v), fisher.matvec(v), rtol=0, atol=0)
    assert fisher.replace(cache_graph=True).cache_graph and fisher.replace(seed=4).seed == 4
    assert {k.settings for k in (GGNOperator, EmpiricalFisherOperator)} == {("cache_graph",)}


def test_the_operator_holds_its_objective_resolved(mlp: Problem):
    op = GGNOperator(Objective(mlp.model, mlp.loss_fn, iter(mlp.split(32)), exclude="0.bias"))
    resolved = op.objective
    assert resolved.params == ("0.weight", "2.weight", "2.bias") and resolved.exclude is None
    assert (resolved.input_style, resolved.distributed) == ("kwargs", False)
    assert len(op.batches) == 2 and op.model is mlp.model


@pytest.mark.parametrize("name", sorted(CURVATURES))
def test_curvature_operator_passes_each_kind_only_its_own_settings(mlp: Problem, name: str):
    objective = Objective(mlp.model, resolve_loss("cross-entropy"), mlp.batches)
    op = curvature_operator(name, objective, backend="forward-over-reverse", seed=5)
    assert type(op) is CURVATURES[name] and op.curvature == name
    own = {
        "backend": "forward-over-reverse",
        "seed": 5,
        "cache_graph": op.cache_graph,
        "lean": getattr(op, "lean", None),
    }
    direct = CURVATURES[name](objective, **{k: own[k] for k in CURVATURES[name].settings})
    v = _random(op.size, 3)
    torch.testing.assert_close(op.matvec(v), direct.matvec(v), rtol=0, atol=0)


def test_the_fishers_seed_reaches_it_through_the_factory(mlp: Problem):
    objective = Objective(mlp.model, resolve_loss("cross-entropy"), mlp.batches)
    v = _random(mlp.hessian.shape[0], 4)
    five, six = (curvature_operator("fisher", objective, seed=s).matvec(v) for s in (5, 6))
    assert not torch.allclose(five, six)


def test_unknown_names_and_reductions_are_one_input_error(mlp: Problem):
    objective = Objective(mlp.model, mlp.loss_fn, mlp.batches)
    with pytest.raises(InputError, match="unknown `curvature` 'kfac'; choose one of hessian"):
        curvature_operator("kfac", objective)
    with pytest.raises(InputError, match="unknown `reduction` 'max'; choose one of mean, sum"):
        objective.replace(reduction="max")


def test_estimators_take_their_precision_keyword_only(mlp: Problem):
    op = HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches))
    with pytest.raises(TypeError):
        lanczos(op, 3, "largest")  # type: ignore[misc]
    with pytest.raises(TypeError):
        hutchinson(op, 1e-2)  # type: ignore[misc]
    found = lanczos(op, 3, settings=SolveSettings(tol=1e-10))
    exact = torch.linalg.eigvalsh(mlp.hessian).flip(0)[:3]
    torch.testing.assert_close(found.eigenvalues, exact, rtol=1e-8, atol=0)

"""Cross-check against PyHessian 0.1, the reference implementation users compare us with."""

from __future__ import annotations

import copy

import pytest
import torch

from sharpscope.curvature import HessianOperator, Objective, SolveSettings, hutchinson, lanczos

pyhessian = pytest.importorskip("pyhessian")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_top_eigenvalue_agrees_with_pyhessian(name, request):
    problem = request.getfixturevalue(name)
    model = copy.deepcopy(problem.model).float()
    inputs = problem.inputs.float()
    torch.manual_seed(0)
    theirs = pyhessian.hessian(model, problem.loss_fn, data=(inputs, problem.targets), cuda=False)
    values, _ = theirs.eigenvalues(maxIter=1000, tol=1e-6, top_n=2)
    ours = lanczos(
        HessianOperator(Objective(problem.model, problem.loss_fn, problem.batches)),
        2,
        settings=SolveSettings(tol=1e-8),
    )
    truth = torch.linalg.eigvalsh(problem.hessian).flip(0)[:2]
    for i in range(2):
        # PyHessian stops on a 1e-6 relative change of λ in float32; 1e-4 is well inside that.
        assert values[i] == pytest.approx(float(ours.eigenvalues[i]), rel=1e-4)
        assert float(ours.eigenvalues[i]) == pytest.approx(float(truth[i]), rel=1e-10)


def test_trace_agrees_with_pyhessian(mlp):
    model = copy.deepcopy(mlp.model).float()
    torch.manual_seed(0)
    theirs = pyhessian.hessian(
        model, mlp.loss_fn, data=(mlp.inputs.float(), mlp.targets), cuda=False
    )
    samples = theirs.trace(maxIter=200, tol=0.0)
    ours = hutchinson(
        HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.batches)),
        settings=SolveSettings(tol=0.0, max_iter=200),
    )
    theirs_error = float(torch.tensor(samples).std()) / len(samples) ** 0.5
    combined = (theirs_error**2 + ours.std_error**2) ** 0.5
    assert abs(sum(samples) / len(samples) - ours.estimate) <= 3 * combined

"""``reduction``: a summed loss gives the Hessian of the total loss for any batch split, and a loss
that does not reduce as declared is refused when the operator is built (dense float64 truth)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ground_truth import Problem, dense_hessian

from sharpscope.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator, Objective
from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss


def summed_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="sum")


def dense(op: HessianOperator) -> torch.Tensor:
    return torch.stack([op.matvec(e) for e in torch.eye(op.size, dtype=torch.float64)], 1)


@pytest.mark.parametrize("size", [1, 3, 7, None])
def test_sum_loss_is_the_hessian_of_the_total(mlp: Problem, size: int | None) -> None:
    data = mlp.batches if size is None else mlp.split(size)
    truth = dense_hessian(mlp.model, summed_ce, mlp.inputs, mlp.targets)
    op = HessianOperator(Objective(mlp.model, summed_ce, data, reduction="sum"))
    assert torch.allclose(dense(op), truth, atol=1e-10 * truth.abs().max())
    with torch.no_grad():
        total = float(summed_ce(mlp.model(mlp.inputs), mlp.targets))
    assert op.loss() == pytest.approx(total, rel=1e-12)


def test_builtin_sum_is_the_mean_times_the_terms(mlp: Problem) -> None:
    """A built-in loss sums as asked; the GGN and the empirical Fisher follow."""
    n = len(mlp.targets)
    for kind in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        mean = kind(Objective(mlp.model, resolve_loss("ce"), mlp.split(5)))
        total = kind(
            Objective(mlp.model, resolve_loss("ce", reduction="sum"), mlp.split(9), reduction="sum")
        )
        v = torch.randn(mean.size, dtype=torch.float64)
        assert torch.allclose(total.matvec(v), n * mean.matvec(v), rtol=1e-10, atol=1e-12)


def test_a_sum_declared_mean_is_refused(mlp: Problem) -> None:
    with pytest.raises(InputError, match=r"returns the sum of a batch.*pass `reduction` sum"):
        HessianOperator(Objective(mlp.model, summed_ce, mlp.split(8)))
    with pytest.raises(InputError, match=r"returns the mean of a batch.*pass `reduction` mean"):
        HessianOperator(Objective(mlp.model, mlp.loss_fn, mlp.split(8), reduction="sum"))


def test_a_batch_of_one_is_probed_with_the_next(mlp: Problem) -> None:
    with pytest.raises(InputError, match="pass `reduction` sum"):
        HessianOperator(Objective(mlp.model, summed_ce, mlp.split(1)))


def test_stated_reductions_are_trusted_and_checked(mlp: Problem) -> None:
    """torch's losses and the built-ins say how they reduce: no probe, a mismatch refused."""
    HessianOperator(
        Objective(
            mlp.model, torch.nn.CrossEntropyLoss(reduction="sum"), mlp.batches, reduction="sum"
        )
    )
    with pytest.raises(InputError, match="pass `reduction` mean"):
        HessianOperator(Objective(mlp.model, resolve_loss("ce"), mlp.batches, reduction="sum"))


LOSSES = (
    "import torch.nn.functional as F\n"
    "def summed(outputs, targets):\n    return F.cross_entropy(outputs, targets, reduction='sum')\n"
)


@pytest.fixture
def cli_case(tmp_path, monkeypatch):
    """A checkpoint of ``mlp(hidden=(6,))`` on digits, a module with a summed loss, and the dense
    float64 Hessian of the total loss over the 14 samples analyzed."""
    from sharpscope.io.architectures import mlp as make_mlp
    from sharpscope.io.checkpoints import save_checkpoint
    from sharpscope.io.data import load_data
    from sharpscope.io.models import ModelSpec

    (tmp_path / "sumloss.py").write_text(LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = make_mlp(hidden=(6,))
    save_checkpoint(tmp_path / "m.safetensors", model, ModelSpec("mlp", {"hidden": (6,)}))
    data = load_data("digits", samples=14, seed=0)
    inputs = data.inputs.double()
    truth = dense_hessian(model.double(), summed_ce, inputs, data.targets)
    return tmp_path / "m.safetensors", float(torch.linalg.eigvalsh(truth)[-1])


@pytest.mark.parametrize("size", ["1", "3", "7", "14"])
def test_cli_sum_loss_equals_the_dense_hessian(cli_case, size: str) -> None:
    import json

    from typer.testing import CliRunner

    from sharpscope.cli.app import app

    path, truth = cli_case
    args = ["analyze", str(path), "--data", "digits", "--samples", "14", "--batch-size", size]
    args += ["--loss", "sumloss:summed", "--reduction", "sum", "--dtype", "float64", "--top-k", "1"]
    args += ["--tol", "1e-10", "--shards", "0", "--no-trace", "--json", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["results"]["eigenvalues"]["values"][0] == pytest.approx(truth, rel=1e-9)
    assert doc["inputs"]["config"]["reduction"] == "sum"
    refused = CliRunner().invoke(app, [a for a in args if a not in ("--reduction", "sum")])
    assert refused.exit_code == 2
    assert refused.stderr.startswith("error: ") and len(refused.stderr.splitlines()) == 1
    assert "the --loss returns the sum of a batch" in refused.stderr
    assert "pass --reduction sum" in refused.stderr


def test_landscape_of_a_sum_is_the_total(mlp: Problem) -> None:
    from sharpscope.analysis.landscape import LandscapeConfig, landscape

    config = LandscapeConfig(points=3, grid=3, reduction="sum")
    found = landscape(mlp.model, summed_ce, mlp.split(5), config)
    with torch.no_grad():
        total = float(summed_ce(mlp.model(mlp.inputs), mlp.targets))
    assert found.centre_loss == pytest.approx(total, rel=1e-12)


def test_a_model_of_one_batch_size_skips_the_halves(mlp: Problem) -> None:
    """An exported model runs at its batch size only: the halves are not tried, the first batch
    is (and a model that cannot take it still fails)."""

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = mlp.model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != 8:
                raise RuntimeError(f"exported for batch size 8, got {x.shape[0]}")
            return self.inner(x)

    op = HessianOperator(Objective(Fixed(), summed_ce, mlp.split(8), reduction="sum"))
    assert op.loss() > 0
    with pytest.raises(InputError, match="cannot run on the first batch"):
        HessianOperator(Objective(Fixed(), summed_ce, mlp.split(4), reduction="sum"))

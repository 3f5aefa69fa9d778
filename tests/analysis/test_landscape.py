"""Loss-landscape slices: the centre is the model's loss, the curvature along v₁ and v₂ is the
eigenvalue (against a dense float64 Hessian by double backward), filter normalisation, exact
restoration of the weights, and the ``landscape`` command's files and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import torch.nn.functional as F
from ground_truth import batches_hessian
from torch import nn
from typer.testing import CliRunner, Result

import sharpscope.cli.landscape as landscape_module
from sharpscope.analysis.landscape import LandscapeConfig, landscape, random_directions
from sharpscope.cli.app import app
from sharpscope.curvature import select_params
from sharpscope.errors import InputError
from sharpscope.io.architectures import mlp
from sharpscope.io.load_spec import LoadSpec
from sharpscope.report.landscape_document import landscape_schema

RUNNER = CliRunner()
MLP16 = ["--model", "mlp", "--model-arg", "hidden=(16,)"]
FAST = ["--samples", "64", "--batch-size", "24", "--points", "5", "--grid", "3", "--quiet"]


def tiny() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 tanh MLP and 40 samples in uneven batches (16, 16, 8)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    inputs, targets = torch.randn(40, 5, dtype=torch.float64), torch.arange(40) % 3
    return model, list(zip(inputs.split(16), targets.split(16), strict=True))


def test_the_centre_is_the_models_loss_over_all_the_data():
    model, batches = tiny()
    result = landscape(model, F.cross_entropy, batches, LandscapeConfig(points=5, grid=3))
    inputs, targets = (torch.cat(parts) for parts in zip(*batches, strict=True))
    with torch.no_grad():
        expected = float(F.cross_entropy(model(inputs), targets))
    assert result.centre_loss == pytest.approx(expected, rel=1e-14)
    assert result.line[2] == result.centre_loss == result.surface[1][1]
    assert result.line_steps == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert result.evaluations == 1 + 5 + 9 and result.num_samples == 40
    assert len({result.line[0], result.line[4], result.surface[0][2]}) == 3  # the points moved


def test_the_curvature_along_v1_and_v2_is_their_eigenvalue():
    model, batches = tiny()
    eigenvalues = torch.linalg.eigvalsh(batches_hessian(model, F.cross_entropy, batches))
    h = 1e-3
    config = LandscapeConfig(directions="eigen", span=h, points=3, grid=3, tol=1e-10)
    result = landscape(model, F.cross_entropy, batches, config)
    line, grid = result.line, result.surface
    along_v1 = (line[0] - 2 * line[1] + line[2]) / h**2
    grid_v1 = (grid[0][1] - 2 * grid[1][1] + grid[2][1]) / h**2
    grid_v2 = (grid[1][0] - 2 * grid[1][1] + grid[1][2]) / h**2
    lam1, lam2 = float(eigenvalues[-1]), float(eigenvalues[-2])
    assert lam1 > 1.2 * lam2 > 0  # distinct, so v₁ and v₂ are well defined
    assert along_v1 == pytest.approx(lam1, rel=1e-2)
    assert grid_v1 == pytest.approx(lam1, rel=1e-2)
    assert grid_v2 == pytest.approx(lam2, rel=1e-2)
    assert result.directions.eigenvalues == pytest.approx([lam1, lam2], rel=1e-8)
    random = landscape(model, F.cross_entropy, batches, LandscapeConfig(span=h, points=3, grid=3))
    r = random.line
    assert abs((r[0] - 2 * r[1] + r[2]) / h**2 - lam1) > 0.05 * lam1  # the test can fail


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_filter_normalisation_gives_each_filter_its_weights_norm():
    torch.manual_seed(1)
    model = ConvBN().double()
    space = select_params(model)
    first = random_directions(space, seed=3).vectors
    assert torch.equal(first, random_directions(space, seed=3).vectors)
    assert not torch.equal(first, random_directions(space, seed=4).vectors)
    assert not torch.allclose(first[0], first[1])
    for d in first:
        for name, part, weight in zip(space.names, space.split(d), space.params, strict=True):
            if weight.ndim == 1:  # conv and linear biases, BatchNorm's weight and bias
                assert torch.count_nonzero(part) == 0, name
                continue
            norms = part.reshape(part.shape[0], -1).norm(dim=1)
            wanted = weight.detach().reshape(weight.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(norms, wanted, rtol=1e-9, atol=0)
            assert not torch.allclose(part, weight.detach()), name  # rescaled, not the weights


@pytest.mark.parametrize("kind", ["random", "eigen"])
@pytest.mark.parametrize("batch_stats", [False, True])
def test_the_model_is_restored_bit_for_bit(kind, batch_stats):
    torch.manual_seed(2)
    model = ConvBN().double().train()
    with torch.no_grad():
        model(torch.randn(8, 2, 4, 4, dtype=torch.float64))  # running statistics of their own
    batches = [(torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.arange(6) % 3)] * 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LandscapeConfig(directions=kind, points=3, grid=3, batch_stats=batch_stats)
    result = landscape(model, F.cross_entropy, batches, config)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(
            value.reshape(-1).view(torch.uint8), after[name].reshape(-1).view(torch.uint8)
        ), name
    assert result.line[0] != result.centre_loss


def test_params_globs_move_only_those_parameters():
    model, batches = tiny()
    result = landscape(model, F.cross_entropy, batches, LandscapeConfig(params=["2.*"], grid=3))
    assert result.param_names == ("2.weight", "2.bias") and result.num_params == 24


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("points", 4, "`points` must be odd and at least 3, got 4"),
        ("grid", 1, "`grid` must be odd and at least 3, got 1"),
        ("span", 0.0, "`span` must be positive"),
        ("directions", "pca", "unknown `directions` 'pca'"),
    ],
)
def test_bad_settings_name_their_parameter(field, value, message):
    with pytest.raises(InputError, match=message.replace("(", "\\(")):
        LandscapeConfig(**{field: value})


# --- the command ---------------------------------------------------------------------------------


def cli(*args: object) -> Result:
    return RUNNER.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("landscape") / "mlp.pt"
    torch.manual_seed(0)
    torch.save(mlp(hidden=(16,)).state_dict(), path)
    return path


def error_line(result: Result) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output} {result.exception!r}"
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_command_writes_the_png_and_the_schemad_json(checkpoint, tmp_path):
    out = tmp_path / "land"
    done = cli("landscape", checkpoint, "--data", "digits", *MLP16, *FAST, "--out", out)
    assert done.exit_code == 0, done.output
    assert (out / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "landscape.json").read_text(encoding="utf-8"))
    jsonschema.validate(document, landscape_schema())
    assert document["directions"] == {
        **dict(kind="random", seed=0, normalization="filter"),
        **dict(eigenvalues=None, residuals=None, hessian_products=0),
    }
    assert document["evaluations"] == 1 + 5 + 9 and document["num_samples"] == 64
    assert (
        len(document["grid"]["loss"]) == 3
        and document["line"]["loss"][2] == document["centre_loss"]
    )
    assert document["inputs"]["config"]["points"] == 5
    assert document["inputs"]["data"]["num_samples"] == 64
    assert f"wrote {out / 'landscape.json'}" in done.stderr
    assert "15 evaluations" in done.stderr


def test_an_existing_output_is_refused_unless_forced(checkpoint, tmp_path):
    out = tmp_path / "land"
    out.mkdir()
    (out / "landscape.json").write_text("mine", encoding="utf-8")
    (out / "notes.txt").write_text("also mine", encoding="utf-8")
    line = error_line(cli("landscape", checkpoint, "--data", "digits", *MLP16, "--out", out))
    assert f"--out {out} already holds landscape.json" in line and "--force" in line
    assert (out / "landscape.json").read_text(encoding="utf-8") == "mine"
    done = cli("landscape", checkpoint, "--data", "digits", *MLP16, *FAST, "--out", out, "--force")
    assert done.exit_code == 0, done.output
    assert json.loads((out / "landscape.json").read_text(encoding="utf-8"))["evaluations"] == 15
    assert (out / "notes.txt").read_text(encoding="utf-8") == "also mine"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--points", "4"], "--points must be odd and at least 3, got 4"),
        (["--directions", "pca"], "unknown --directions 'pca'; choose one of random, eigen"),
        (["--span", "-1"], "--span must be positive"),
        (["--data", "absent.npz"], "data not found: no file or folder absent.npz"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, extra, expected):
    args = ["landscape", checkpoint, "--data", "digits", *MLP16, "--out", tmp_path / "o", *extra]
    assert expected in error_line(cli(*args))
    assert not (tmp_path / "o").exists()


def test_every_option_reaches_the_library(monkeypatch, tmp_path):
    seen: dict[str, Any] = {}

    def load(spec: LoadSpec, **kwargs: Any) -> None:
        seen["load"] = spec

    def run(loaded: Any, config: LandscapeConfig, quiet: bool) -> None:
        seen["config"] = config
        raise InputError("stop")

    monkeypatch.setattr("sharpscope.cli.loading.load_inputs", load)
    monkeypatch.setattr(landscape_module, "run_landscape", run)
    options = [
        *["--directions", "eigen", "--span", "0.3", "--points", "7", "--grid", "5"],
        *["--tol", "1e-6", "--max-iter", "17", "--params", "a.*", "--exclude", "a.b*"],
        *["--batch-stats", "--seed", "4", "--model", "mlp", "--model-arg", "hidden=(8,)"],
        *["--trust-pickle", "--trust-code", "--split", "test", "--samples", "7"],
        *["--batch-size", "5", "--reduction", "sum", "--input-style", "single"],
        *["--state-prefix", "net."],
        *["--text-field", "t", "--label-field", "c", "--max-length", "33", "--loss", "mse"],
        *["--device", "cpu", "--dtype", "float64", "--out", str(tmp_path / "o")],
    ]
    result = cli("landscape", "model.pt", "--data", "digits", *options)
    assert result.exit_code == 2 and "stop" in result.stderr, result.stderr
    assert seen["config"] == LandscapeConfig(
        **dict(directions="eigen", span=0.3, points=7, grid=5, seed=4, tol=1e-6, max_iter=17),
        **dict(params=["a.*"], exclude=["a.b*"], batch_stats=True, reduction="sum"),
    )
    assert seen["load"] == LoadSpec(
        Path("model.pt"),
        "digits",
        **dict(model="mlp", model_args=["hidden=(8,)"], trust_pickle=True, trust_code=True),
        **dict(split="test"),
        **dict(state_prefix="net."),
        **dict(samples=7, batch_size=5, seed=4, loss="mse", device="cpu", dtype="float64"),
        **dict(text_field="t", label_field="c", max_length=33),
        **dict(reduction="sum", input_style="single"),
    )
    defaults = LandscapeConfig()
    assert all(
        getattr(seen["config"], name) != getattr(defaults, name)
        for name in defaults.__dataclass_fields__
    )

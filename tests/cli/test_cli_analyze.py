"""``sharpscope analyze`` and ``sharpscope demo`` end to end, through the command line.

Most runs go through Typer's ``CliRunner`` (stdout and stderr captured apart); a few run
``python -m sharpscope`` in a subprocess to prove the exit codes and that no traceback reaches
stderr. Every run is tiny: an MLP with one hidden layer of 16 on 64 digits, two eigenpairs. Top
eigenvalues are checked against a float64 Lanczos reference computed here with
``sharpscope.HessianOperator`` on the same weights and data.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import platform
import re
import shlex
import stat
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner, Result

import sharpscope
import sharpscope.io.losses
from sharpscope.cli.app import app
from sharpscope.curvature import Objective, SolveSettings
from sharpscope.errors import InputError
from sharpscope.io.architectures import mlp
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.data import load_data
from sharpscope.io.eigenvectors import load_eigenvectors
from sharpscope.io.models import ModelSpec
from sharpscope.report.schema import report_schema

RUNNER = CliRunner()  # this typer's runner keeps stdout and stderr apart (result.stdout/.stderr)
HIDDEN = "hidden=(16,)"
MLP16 = ["--model", "mlp", "--model-arg", HIDDEN]
FAST = ["--samples", "64", "--batch-size", "32", "--top-k", "2"]
PARAM_NAMES = ["1.weight", "1.bias", "3.weight", "3.bias"]  # mlp(hidden=(16,)): Flatten, 1, ReLU, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REL = 1e-4

# PyHessian's power iteration calls backward(create_graph=True), which torch warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph:UserWarning")


# --- helpers -------------------------------------------------------------------------------------


def cli(*args: object) -> Result:
    return RUNNER.invoke(app, [str(a) for a in args])


def analyze(
    checkpoint: object, *extra: object, data: object = "digits", quiet: bool = True
) -> Result:
    """``sharpscope analyze CHECKPOINT --data DATA`` with the fast settings, then ``extra`` (later
    options win, so ``extra`` may override any of the fast ones)."""
    return cli("analyze", checkpoint, "--data", data, *FAST, *(["--quiet"] * quiet), *extra)


def succeed(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr} {result.exception!r}"
    assert "Traceback" not in result.output
    return result


def report(checkpoint: object, *extra: object, data: object = "digits") -> dict[str, Any]:
    """The ``--json`` report of a successful run; nothing but the JSON document on stdout."""
    result = succeed(analyze(checkpoint, *extra, "--json", data=data))
    text = result.stdout
    assert text.lstrip().startswith("{") and text.rstrip().endswith("}")
    return json.loads(text)  # raises on anything after the document


def error_line(result: Result) -> str:
    """The one ``error:`` line of a refused run (exit 2, no traceback, nothing on stdout)."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output} {result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def top_eigenvalue(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The reference: float64 Lanczos on the mean cross-entropy over all the samples."""
    model = copy.deepcopy(model).double()
    batch = [(inputs.double(), targets)]
    op = sharpscope.HessianOperator(Objective(model, nn.functional.cross_entropy, batch))
    return float(
        sharpscope.lanczos(op, 1, settings=SolveSettings(tol=1e-9, max_iter=400)).eigenvalues[0]
    )


def close(value: float, reference: float, rel: float = REL) -> bool:
    return abs(value - reference) <= rel * abs(reference)


def lambda_max(doc: dict[str, Any]) -> float:
    return doc["results"]["eigenvalues"]["values"][0]


def without_timings(value: Any) -> Any:
    """A report section with every ``seconds`` field dropped."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m sharpscope``: no forced colours, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every command from an empty folder (no pyproject.toml or sharpscope.toml above it),
    without forced colours (rich would put escape codes in stdout and stderr)."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


# --- checkpoints: one model in every format ------------------------------------------------------


@dataclass
class Made:
    folder: Path
    model: nn.Module
    reference: float
    """Top Hessian eigenvalue on the 64 digits that ``--samples 64 --seed 0`` picks."""

    def __truediv__(self, name: str) -> Path:
        return self.folder / name


def digits64() -> tuple[torch.Tensor, torch.Tensor]:
    bundle = load_data("digits", split="train", samples=64, seed=0)
    return bundle.inputs, bundle.targets


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = mlp(hidden=(16,)).eval()
    state = model.state_dict()
    assert list(state) == PARAM_NAMES
    torch.save(state, folder / "state_dict.pt")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7},
        folder / "wrapped.pt",
    )
    save_checkpoint(folder / "ours.safetensors", model, ModelSpec("mlp", {"hidden": (16,)}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "plain.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(copy.deepcopy(model)), str(folder / "scripted.pt"))
    program = torch.export.export(
        copy.deepcopy(model),
        (torch.zeros(4, 1, 8, 8),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    torch.export.save(program, str(folder / "exported.pt2"))
    torch.save(model, folder / "pickled.pt")
    return Made(folder, model, top_eigenvalue(model, *digits64()))


FORMATS = [
    pytest.param("state_dict.pt", "state_dict", MLP16, id="state-dict-pt"),
    pytest.param("wrapped.pt", "state_dict", MLP16, id="wrapped-module-prefix"),
    pytest.param("ours.safetensors", "safetensors", [], id="safetensors-with-spec"),
    pytest.param("plain.safetensors", "safetensors", MLP16, id="plain-safetensors"),
    pytest.param("scripted.pt", "torchscript", ["--trust-code"], id="torchscript-trusted"),
    pytest.param("exported.pt2", "export", [], id="torch-export-pt2"),
    pytest.param("pickled.pt", "module", ["--trust-pickle"], id="pickled-module-trusted"),
]


@pytest.mark.parametrize(("name", "fmt", "extra"), FORMATS)
def test_every_checkpoint_format_end_to_end(made, name, fmt, extra):
    doc = report(made / name, *extra, "--no-trace")
    assert doc["inputs"]["checkpoint"]["format"] == fmt
    assert (
        doc["inputs"]["checkpoint"]["sha256"]
        == hashlib.sha256((made / name).read_bytes()).hexdigest()
    )
    assert doc["results"]["num_params"] == 1210
    assert close(lambda_max(doc), made.reference), (lambda_max(doc), made.reference)


def test_pickled_module_is_refused_without_trust_pickle(made):
    line = error_line(analyze(made / "pickled.pt", "--no-trace"))
    assert "--trust-pickle" in line and "pickled.pt" in line
    assert "torch.nn.modules.container.Sequential" in line


def test_lightning_ckpt_analyzes_as_its_bare_state_dict(tmp_path):
    """A lightning.Trainer .ckpt of a module holding the MLP as ``self.net``: the same report as
    the network's own state dict; with an EMA copy beside it, ``--state-prefix`` picks one."""
    pytest.importorskip("lightning")
    from lightning_ckpt import lightning_checkpoint

    inputs, targets = digits64()
    torch.manual_seed(2)
    module = lightning_checkpoint(
        tmp_path / "last.ckpt", [(inputs[:32], targets[:32])], net=mlp(hidden=(16,))
    )
    torch.save(module.net.state_dict(), tmp_path / "bare.pt")
    ckpt, bare = (report(tmp_path / n, *MLP16) for n in ("last.ckpt", "bare.pt"))
    assert ckpt["inputs"]["checkpoint"]["format"] == "state_dict"
    assert without_timings(ckpt["results"]) == without_timings(bare["results"])

    both = {f"ema.{k}": v for k, v in mlp(hidden=(16,)).state_dict().items()}
    both.update({f"net.{k}": v for k, v in module.net.state_dict().items()})
    torch.save({"state_dict": both}, tmp_path / "ema.ckpt")
    line = error_line(analyze(tmp_path / "ema.ckpt", *MLP16))
    assert "under each of the key prefixes ema., net." in line and "--state-prefix" in line
    chosen = report(tmp_path / "ema.ckpt", *MLP16, "--state-prefix", "net.")
    assert without_timings(chosen["results"]) == without_timings(bare["results"])


# --- data specs ----------------------------------------------------------------------------------

DATA_FUNCTION = """
import torch
from torch.utils.data import TensorDataset


def make():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(40, 64, generator=g), torch.arange(40) % 10)
"""


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(root: Path, per_batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 folder in the python-pickle layout (as tests/loading/test_data.py builds one);
    returns the training split's uint8 pixels (N x 3072) and labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_pickle(root / f"data_batch_{i}", {b"labels": y, b"data": x})
        xs.append(x)
        ys += y
    test_x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    write_pickle(root / "test_batch", {b"labels": [9, 0, 3], b"data": test_x})
    write_pickle(root / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return np.concatenate(xs), np.array(ys)


def make_image_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Three class folders of 8x8 grayscale PNGs; returns the images in [0, 1] and their labels."""
    rng = np.random.default_rng(1)
    inputs, targets = [], []
    for label, name in enumerate(["ant", "bee", "cow"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")
            inputs.append(torch.from_numpy(pixels).float().div(255).view(1, 8, 8))
            targets.append(label)
    return torch.stack(inputs), torch.tensor(targets)


DATA_KINDS = ["digits", "npz", "pt", "safetensors", "cifar", "image-folder", "python-function"]


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_every_data_spec_end_to_end(made, tmp_path, kind):
    """The Hessian is a mean over samples, so the reference ignores the samples' order."""
    rng = np.random.RandomState(0)
    x, y = rng.rand(40, 64).astype(np.float32), np.arange(40) % 10
    checkpoint, model = made / "ours.safetensors", made.model
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    if kind == "digits":
        spec, (inputs, targets) = "digits", digits64()
    elif kind == "npz":
        spec = tmp_path / "data.npz"
        np.savez(spec, x=x, y=y)
    elif kind == "pt":
        spec = tmp_path / "data.pt"
        torch.save({"inputs": inputs, "targets": targets}, spec)
    elif kind == "safetensors":
        spec = tmp_path / "data.safetensors"
        save_file({"features": inputs, "labels": targets}, str(spec))
    elif kind == "cifar":
        spec = tmp_path / "cifar-10-batches-py"
        pixels, labels = make_cifar10(spec)
        inputs = torch.from_numpy(pixels).float().div(255).view(-1, 3, 32, 32)
        targets = torch.from_numpy(labels)
        torch.manual_seed(0)
        model = mlp(in_features=3072, hidden=(4,)).eval()
        checkpoint = tmp_path / "cifar-mlp.safetensors"
        save_checkpoint(checkpoint, model, ModelSpec("mlp", {"in_features": 3072, "hidden": [4]}))
    elif kind == "image-folder":
        spec = tmp_path / "images"
        inputs, targets = make_image_folder(spec)
    else:
        (tmp_path / "data_fn.py").write_text(DATA_FUNCTION)
        spec = f"{tmp_path / 'data_fn.py'}:make"
        namespace: dict[str, Any] = {}
        exec(DATA_FUNCTION, namespace)
        inputs, targets = namespace["make"]().tensors
    doc = report(checkpoint, "--no-trace", data=spec)
    assert doc["inputs"]["data"]["spec"] == str(spec)
    assert doc["results"]["num_samples"] == len(targets)
    reference = top_eigenvalue(model, inputs, targets)
    assert close(lambda_max(doc), reference), (lambda_max(doc), reference)


# --- the JSON report -----------------------------------------------------------------------------


def test_json_report_document(made):
    checkpoint = made / "ours.safetensors"
    result = succeed(analyze(checkpoint, "--json", "--seed", "0"))
    assert result.stderr == ""  # --quiet: no progress, and nothing else
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, report_schema())
    assert set(doc) == {"schema_version", "created", "inputs", "results", "timings"}
    assert isinstance(doc["schema_version"], int)
    inputs = doc["inputs"]
    assert inputs["checkpoint"] == {
        "path": str(checkpoint),
        "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "format": "safetensors",
    }
    assert inputs["data"]["spec"] == "digits" and inputs["data"]["num_samples"] == 64
    assert inputs["data"]["seed"] == 0 and inputs["data"]["batch_size"] == 32
    assert (inputs["dtype"], inputs["device"], inputs["loss"]) == (
        "float32",
        "cpu",
        "cross-entropy",
    )
    assert inputs["versions"] == {
        "sharpscope": sharpscope.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    results = doc["results"]
    eig = results["eigenvalues"]
    assert len(eig["values"]) == len(eig["residuals"]) == len(eig["converged"]) == 2
    assert eig["values"][0] >= eig["values"][1] and all(eig["converged"])
    assert all(0 <= r <= 1e-4 * eig["values"][0] for r in eig["residuals"])
    assert results["lambda_max"] == eig["values"][0]
    assert close(results["lambda_max"], made.reference)
    low = results["lambda_min"]
    assert low["value"] < eig["values"][1] and isinstance(low["converged"], bool)
    assert low["residual"] >= 0
    trace = results["trace"]
    assert trace["method"] == "deflated" and trace["estimate"] > results["lambda_max"]
    ratio = results["lambda_max"] / trace["estimate"] if trace["converged"] else None
    assert results["lambda_max_over_trace"] == pytest.approx(ratio)  # a number once converged
    assert 0 <= results["alignment"]["cos_full"] <= 1
    assert results["num_samples"] == 64 and results["num_params"] == 1210
    timings = doc["timings"]
    assert timings["total_seconds"] >= 0 and timings["n_products"] > 0
    assert set(timings["stages"]) >= {"gradient", "eigenvalues", "trace"}
    assert "lambda_min" not in timings["stages"]  # Lanczos finds λ_min in the eigenvalues' run
    assert low["n_products"] == eig["n_products"]


def test_no_trace_gives_null_trace(made):
    results = report(made / "ours.safetensors", "--no-trace")["results"]
    assert results["trace"] is None and results["lambda_max_over_trace"] is None
    assert results["density"] is None


def test_same_seed_same_results_and_another_seed_other_data(made):
    first, again, other = (
        report(made / "ours.safetensors", "--seed", seed) for seed in ("3", "3", "4")
    )
    assert without_timings(first["results"]) == without_timings(again["results"])
    assert first["inputs"] == again["inputs"]
    assert first["results"]["loss"] != other["results"]["loss"]  # another subset of 64 digits
    assert first["results"]["trace"]["estimate"] != other["results"]["trace"]["estimate"]


def test_progress_goes_to_stderr_and_stdout_stays_json(made):
    result = succeed(analyze(made / "ours.safetensors", "--no-trace", "--json", quiet=False))
    json.loads(result.stdout)
    assert "top-k" in result.stderr


def test_terminal_report_on_stdout(made):
    result = succeed(analyze(made / "ours.safetensors", "--no-trace"))
    assert "Top Hessian eigenvalues (lanczos)" in result.stdout
    assert "SAM alignment" in result.stdout and result.stderr == ""


# --- --out DIR -----------------------------------------------------------------------------------


def test_out_folder(made, tmp_path):
    out = tmp_path / "analysis"
    result = succeed(analyze(made / "ours.safetensors", "--density", "--json", "--out", out))
    doc = json.loads(result.stdout)
    names = {"report.json", "eigenvectors.safetensors", "convergence.png", "loss_slices.png",
             "density.png"}  # fmt: skip
    assert {p.name for p in out.iterdir()} == names
    assert {line.removeprefix("wrote ") for line in result.stderr.splitlines()} == {
        str(out / name) for name in names
    }
    saved = json.loads((out / "report.json").read_text())
    jsonschema.validate(saved, report_schema())
    companions = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names}
    del companions["report.json"]
    assert saved.pop("files") == companions  # the set report.json was written with
    for key in ("created", "timings"):
        del saved[key], doc[key]
    assert saved == doc

    for name in ("convergence.png", "loss_slices.png", "density.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name

    with safe_open(str(out / "eigenvectors.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {f"v{i}/{name}" for i in (1, 2) for name in PARAM_NAMES}
    values, vectors = load_eigenvectors(out / "eigenvectors.safetensors")
    assert values == pytest.approx(doc["results"]["eigenvalues"]["values"], rel=1e-12)
    assert len(vectors) == 2
    space = sharpscope.select_params(made.model)
    flat = [space.flatten({n: t.double() for n, t in v.items()}) for v in vectors]
    for v in flat:
        assert float(torch.linalg.vector_norm(v)) == pytest.approx(1, abs=1e-5)
    model = copy.deepcopy(made.model).double()
    inputs, targets = digits64()
    op = sharpscope.HessianOperator(
        Objective(model, nn.functional.cross_entropy, [(inputs.double(), targets)])
    )
    residual = torch.linalg.vector_norm(op.matvec(flat[0]) - values[0] * flat[0])
    assert float(residual) <= 1e-3 * values[0]  # v1 is the top eigenvector of the same Hessian

    again = succeed(analyze(made / "ours.safetensors", "--no-trace", "--out", out))
    assert "wrote" in again.stderr
    assert json.loads((out / "report.json").read_text())["results"]["trace"] is None


def test_out_refuses_a_users_folder_and_a_file(made, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    line = error_line(analyze(made / "ours.safetensors", "--out", mine))
    assert f"--out {mine}" in line and "did not write" in line
    assert tree(mine) == {"notes.txt": b"my notes\n"}

    file = tmp_path / "results.txt"
    file.write_text("precious\n")
    line = error_line(analyze(made / "ours.safetensors", "--out", file))
    assert f"--out {file} is a file" in line
    assert file.read_text() == "precious\n"

    fresh = tmp_path / "fresh"
    error_line(analyze(made / "missing.pt", "--out", fresh))
    assert not fresh.exists()  # a run that fails writes nothing


# --- methods, blocks and parameter subsets -------------------------------------------------------


def test_power_and_pyhessian_agree_with_lanczos(made):
    lanczos_value = lambda_max(report(made / "ours.safetensors", "--no-trace"))
    assert close(lanczos_value, made.reference)
    power = report(made / "ours.safetensors", "--no-trace", "--method", "power")
    assert power["results"]["eigenvalues"]["method"] == "power"
    assert close(lambda_max(power), lanczos_value, 1e-3)
    torch.manual_seed(0)  # PyHessian draws its start vectors from torch's global generator
    pyhessian = report(made / "ours.safetensors", "--no-trace", "--method", "pyhessian")
    assert pyhessian["results"]["eigenvalues"]["method"] == "pyhessian"
    assert close(lambda_max(pyhessian), lanczos_value, 1e-3)


def test_a_bounded_lanczos_basis_gives_the_same_eigenvalues(made):
    """--max-basis 8 holds 8 vectors instead of all and restarts; same answers, more products."""
    args = (made / "ours.safetensors", "--no-trace", "--dtype", "float64", "--max-iter", "2000")
    full = report(*args)
    bounded = report(*args, "--max-basis", "8")
    assert bounded["inputs"]["config"]["max_basis"] == 8
    assert full["inputs"]["config"]["max_basis"] is None
    ours, reference = bounded["results"]["eigenvalues"], full["results"]["eigenvalues"]
    assert all(ours["converged"]) and bounded["results"]["lambda_min"]["converged"]
    for a, b in zip(ours["values"], reference["values"], strict=True):
        assert close(a, b, 1e-6)
    low, low_reference = bounded["results"]["lambda_min"], full["results"]["lambda_min"]
    assert abs(low["value"] - low_reference["value"]) <= 1e-6 * reference["values"][0]
    assert bounded["timings"]["n_products"] > full["timings"]["n_products"]


def test_other_backend_and_float64_agree(made):
    forward = report(made / "ours.safetensors", "--no-trace", "--backend", "forward-over-reverse")
    assert close(lambda_max(forward), made.reference)
    double = report(made / "ours.safetensors", "--no-trace", "--dtype", "float64")
    assert double["inputs"]["dtype"] == "float64"
    assert close(lambda_max(double), made.reference, 1e-8)


def test_pyhessian_needs_float32(made):
    line = error_line(
        analyze(made / "ours.safetensors", "--method", "pyhessian", "--dtype", "float64")
    )
    assert "--method pyhessian needs --dtype float32" in line


def test_pyhessian_density_notes_torch_eig(made):
    torch.manual_seed(0)
    result = succeed(
        analyze(made / "ours.safetensors", "--no-trace", "--method", "pyhessian", "--density")
    )
    assert "torch.eig" in result.stdout  # the note: the density shown is sharpscope's SLQ


def test_per_layer_gives_one_entry_per_module(made):
    results = report(made / "ours.safetensors", "--no-trace", "--per-layer")["results"]
    layers = {layer["name"]: layer for layer in results["per_layer"]}
    assert set(layers) == {"1", "3"}
    assert (layers["1"]["size"], layers["3"]["size"]) == (16 * 64 + 16, 10 * 16 + 10)
    assert sum(layer["size"] for layer in layers.values()) == results["num_params"]
    for layer in layers.values():  # a principal block's top eigenvalue is at most the whole one's
        assert 0 < layer["eigenvalue"] <= results["lambda_max"] * (1 + 1e-6)
        assert layer["converged"]


@pytest.mark.parametrize(
    ("name", "extra"), [("ours.safetensors", []), ("scripted.pt", ["--trust-code"])]
)
def test_per_layer_names_each_modules_type(made, name, extra):
    results = report(made / name, *extra, "--no-trace", "--per-layer")["results"]
    assert {layer["name"]: layer["module_type"] for layer in results["per_layer"]} == {
        "1": "Linear",
        "3": "Linear",
    }
    table = succeed(analyze(made / name, *extra, "--no-trace", "--per-layer")).stdout
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.splitlines()]
    assert ["1", "Linear", "1,040"] in [row[:3] for row in cells]


def test_an_mse_heads_repeated_eigenvalues_keep_their_copies(made):
    """The output layer's block under MSE repeats each eigenvalue once per output (10 here): the
    top 12 are λ₁ ten times and λ₂ twice, as a dense float64 eigendecomposition has them."""
    args = ("--params", "3.*", "--loss", "mse", "--top-k", "12", "--tol", "1e-10")
    doc = report(made / "ours.safetensors", "--no-trace", *args, "--dtype", "float64")
    inputs, targets = digits64()
    model = copy.deepcopy(made.model).double()
    params = [model[3].weight, model[3].bias]
    loss = sharpscope.io.losses.mse(model(inputs.double()), targets)
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.autograd.grad(g, params, retain_graph=True) for g in grads]
    dense = torch.stack([torch.cat([r.reshape(-1) for r in row]) for row in rows])
    expected = torch.linalg.eigvalsh(dense).flip(0)[:12]
    eigen = doc["results"]["eigenvalues"]
    found = torch.tensor(eigen["values"], dtype=torch.float64)
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-10 * float(expected[0]))
    assert all(eigen["converged"]) and eigen["multiplicity"]["complete"]
    assert eigen["multiplicity"]["note"] in doc["results"]["notes"]
    table = succeed(analyze(made / "ours.safetensors", "--no-trace", *args, "--dtype", "float64"))
    assert "multiplicity checked" in table.stdout


def test_params_globs_restrict_the_parameters(made):
    last = report(made / "ours.safetensors", "--no-trace", "--params", "3.*")["results"]
    assert last["num_params"] == 10 * 16 + 10
    assert last["lambda_max"] <= made.reference * (1 + 1e-6)
    mixed = report(
        made / "ours.safetensors", "--no-trace", "--params", "1.*", "--params", "3.bias"
    )["results"]
    assert mixed["num_params"] == 16 * 64 + 16 + 10
    assert [(p["name"], p["shape"]) for p in mixed["parameters"]] == [
        ("1.weight", [16, 64]),
        ("1.bias", [16]),
        ("3.bias", [10]),
    ]


def test_exclude_leaves_out_parameters_after_params(made):
    """--exclude is the complement of --params, applied after it; the report lists the rest."""
    rest = report(made / "ours.safetensors", "--no-trace", "--exclude", "3.*")["results"]
    assert rest["num_params"] == 16 * 64 + 16
    assert [p["name"] for p in rest["parameters"]] == ["1.weight", "1.bias"]
    assert rest["lambda_max"] <= made.reference * (1 + 1e-6)  # a diagonal block of H
    both = report(made / "ours.safetensors", "--no-trace", "--params", "*.bias", "--exclude", "1.*")
    assert both["inputs"]["config"]["exclude"] == ["1.*"]
    assert [p["name"] for p in both["results"]["parameters"]] == ["3.bias"]


# --- bad input: exit 2, one "error:" line, no traceback ------------------------------------------


@pytest.fixture(scope="module")
def bad(made: Made, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "folder").mkdir()
    (folder / "folder" / "inside.pt").write_bytes(b"")
    (folder / "empty.pt").write_bytes(b"")
    whole = (made / "state_dict.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    whole = (made / "plain.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (folder / "random.bin").write_bytes(bytes(range(7, 256)) * 4)
    state = {k: v.clone() for k, v in made.model.state_dict().items()}
    state["1.weight"][0, 0] = float("nan")
    torch.save(state, folder / "nan.pt")
    for name, args in (("ten_features", {"in_features": 10}), ("five_classes", {"num_classes": 5})):
        spec = ModelSpec("mlp", {"hidden": [16], **args})
        save_checkpoint(folder / f"{name}.safetensors", mlp(hidden=(16,), **args), spec)
    np.savez(folder / "empty.npz", x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64))
    return folder


CUDA_ABSENT = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
BAD = [
    ("nope.pt", MLP16, ["checkpoint", "nope.pt not found"]),
    ("folder", MLP16, ["has no config.json", "(it holds inside.pt: pass that file)"]),
    ("empty.pt", MLP16, ["empty.pt is empty (0 bytes)"]),
    ("truncated.pt", MLP16, ["truncated.pt is truncated or corrupt"]),
    ("truncated.safetensors", MLP16, ["truncated.safetensors is truncated or corrupt"]),
    ("random.bin", MLP16, ["random.bin is not a checkpoint sharpscope reads"]),
    ("@state_dict.pt", [], ["holds only weights", "--model"]),
    ("@state_dict.pt", ["--model", "mlpp"], ["unknown built-in model 'mlpp'", "mlp, cnn"]),
    (
        "@state_dict.pt",
        ["--model", "mlp", "--model-arg", "hidden=(32,)"],
        [
            "does not fit the model mlp(hidden=(32,))",
            "1.weight is [16, 64] in the file but [32, 64]",
        ],
    ),
    (
        "@state_dict.pt",
        ["--model", "mlp", "--model-arg", "hidden=(16, 16)"],
        ["does not fit the model", "missing keys 5.weight, 5.bias"],
    ),
    (
        "@state_dict.pt",
        ["--model", "mlp", "--model-arg", "hidden=()"],
        ["does not fit the model", "unexpected keys 3.weight, 3.bias"],
    ),
    ("ten_features.safetensors", [], ["cannot run on inputs shaped (32, 1, 8, 8)", "--data"]),
    ("five_classes.safetensors", [], ["go up to 9 but the model has 5 outputs"]),
    ("nan.pt", MLP16, ["the loss is nan"]),
    ("@ours.safetensors", ["--data", "{bad}/empty.npz"], ["empty.npz has no samples"]),
    ("@ours.safetensors", ["--data", "{bad}/absent.npz"], ["data not found", "absent.npz"]),
    ("@ours.safetensors", ["--data", "mnist"], ["unknown data spec 'mnist'"]),
    ("@ours.safetensors", ["--method", "newton"], ["unknown --method 'newton'", "lanczos"]),
    ("@ours.safetensors", ["--backend", "magic"], ["unknown --backend 'magic'"]),
    ("@ours.safetensors", ["--dtype", "float16"], ["unknown --dtype 'float16'"]),
    pytest.param(
        "@ours.safetensors",
        ["--device", "cuda"],
        ["--device cuda: CUDA is not available"],
        marks=CUDA_ABSENT,
    ),
    ("@ours.safetensors", ["--device", "tpu"], ["unknown --device 'tpu'"]),
    ("@ours.safetensors", ["--top-k", "0"], ["--top-k"]),
    ("@ours.safetensors", ["--max-basis", "4"], ["--max-basis must be at least --top-k + 3 = 5"]),
    ("@ours.safetensors", ["--model-arg", HIDDEN], ["--model-arg needs --model"]),
    (
        "@ours.safetensors",
        ["--model", "mlp", "--model-arg", "hidden"],
        ["--model-arg 'hidden' is not key=value"],
    ),
    (
        "@ours.safetensors",
        ["--model", "mlp", "--model-arg", "depth=3"],
        ["does not accept the arguments depth"],
    ),
    ("@ours.safetensors", ["--params", "fc.*"], ["no trainable parameters matching --params"]),
    (
        "@ours.safetensors",
        ["--exclude", "3.*", "--exclude", "fc.*"],
        ["--exclude 'fc.*' matches none of the 4 trainable parameters", "docs/engine.md"],
    ),
    (
        "@ours.safetensors",
        ["--params", "3.*", "--exclude", "1.*"],
        ["--exclude '1.*' matches none of the 2 parameters that --params selects"],
    ),
    (
        "@ours.safetensors",
        ["--params", "3.*", "--exclude", "3.weight", "--exclude", "*bias"],
        ["--exclude ['3.weight', '*bias'] leaves no parameters to analyze"],
    ),
]
BAD_IDS = [
    "missing-file", "directory", "empty-file", "truncated-zip", "truncated-safetensors",
    "unknown-format", "weights-without-model", "unknown-builtin-model", "shape-mismatch",
    "missing-keys", "unexpected-keys", "inputs-do-not-fit", "labels-out-of-range", "nan-loss",
    "empty-data", "missing-data-file", "unknown-data-spec", "unknown-method", "unknown-backend",
    "unknown-dtype", "cuda-unavailable", "unknown-device", "top-k-zero", "max-basis-too-small",
    "model-arg-without-model", "malformed-model-arg", "unknown-model-arg", "params-match-nothing",
    "exclude-matches-nothing", "exclude-matches-nothing-selected", "exclude-leaves-nothing",
]  # fmt: skip


@pytest.mark.parametrize(("name", "extra", "expected"), BAD, ids=BAD_IDS)
def test_bad_input_is_one_error_line(made, bad, name, extra, expected):
    """``@name`` is one of the good checkpoints, other names live in the ``bad`` folder."""
    checkpoint = made / name[1:] if name.startswith("@") else bad / name
    line = error_line(analyze(checkpoint, *(arg.format(bad=bad) for arg in extra)))
    for fragment in expected:
        assert fragment in line, line


@pytest.mark.parametrize("name", ["run[best]/model.pt", "a[/x]b.pt"])
def test_error_line_shows_paths_verbatim(tmp_path, name):
    """Square brackets in a path are text, not rich markup (a '[/x]' once crashed the CLI)."""
    checkpoint = tmp_path / name
    assert str(checkpoint) in error_line(analyze(checkpoint))


def test_debug_lets_the_exception_through(made):
    result = analyze(made / "missing.pt", "--debug")
    assert result.exit_code == 1
    assert isinstance(result.exception, InputError) and "not found" in str(result.exception)


# --- python -m sharpscope in subprocesses --------------------------------------------------------


@pytest.fixture(scope="module")
def runs(made: Made) -> dict[str, subprocess.CompletedProcess[str]]:
    """Four ``python -m sharpscope analyze`` runs, started together (each imports torch)."""
    good = [
        str(made / "ours.safetensors"),
        "--data",
        "digits",
        *FAST,
        "--quiet",
        "--no-trace",
        "--json",
    ]
    missing = [str(made / "missing.pt"), "--data", "digits", *FAST, "--quiet"]
    commands = {
        "ok": (good, clean_env()),
        "error": (missing, clean_env()),
        "debug": ([*missing, "--debug"], clean_env()),
        "forced-colour": (good, clean_env(FORCE_COLOR="1")),
    }
    started = {
        key: subprocess.Popen(
            [sys.executable, "-m", "sharpscope", "analyze", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for key, (args, env) in commands.items()
    }
    done = {}
    for key, proc in started.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done


@pytest.mark.integration
def test_subprocess_success_exit_0_and_json(made, runs):
    ok = runs["ok"]
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr
    assert close(lambda_max(json.loads(ok.stdout)), made.reference)


@pytest.mark.integration
def test_subprocess_error_exit_2_without_traceback(runs):
    error = runs["error"]
    assert error.returncode == 2
    assert error.stdout == ""
    assert "Traceback" not in error.stderr
    lines = error.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint "), error.stderr
    assert "missing.pt not found" in lines[0]


@pytest.mark.integration
def test_subprocess_debug_shows_the_traceback(runs):
    debug = runs["debug"]
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "InputError: checkpoint" in debug.stderr and "missing.pt not found" in debug.stderr


# --- demo ----------------------------------------------------------------------------------------


@dataclass
class Demo:
    out: Path
    result: Result
    report: dict[str, Any]
    """The demo's own report.json (before the printed command overwrote it)."""
    command: list[str]
    rerun: Result
    redone: dict[str, Any]
    """The report.json the printed command wrote into the same folder."""


def printed_command(stdout: str) -> str:
    lines = [s.strip() for s in stdout.splitlines() if s.strip().startswith("sharpscope analyze")]
    return next(s for s in lines if "my_model.pt" not in s)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    out = tmp_path_factory.mktemp("demo") / "my demo"  # a space: the printed command quotes it
    result = cli("demo", "--out", out, "--steps", "30", "--quiet")
    assert result.exit_code == 0, f"{result.stderr} {result.exception!r}"
    saved = json.loads((out / "report.json").read_text())
    command = shlex.split(printed_command(result.stdout))
    rerun = RUNNER.invoke(app, command[1:])
    redone = json.loads((out / "report.json").read_text()) if rerun.exit_code == 0 else {}
    return Demo(out, result, saved, command, rerun, redone)


@pytest.mark.integration
def test_demo_writes_checkpoint_report_and_plots(demo):
    result = demo.result
    assert "Traceback" not in result.output
    names = {p.name for p in demo.out.iterdir()}
    assert {"digits-mlp.safetensors", "report.json", "eigenvectors.safetensors"} <= names
    for name in ("convergence.png", "loss_slices.png", "density.png"):
        assert (demo.out / name).read_bytes().startswith(PNG_MAGIC), name
    assert "trained mlp on digits: 30 steps" in result.stderr
    assert f"wrote {demo.out / 'report.json'}" in result.stderr
    assert demo.report["schema_version"] and demo.report["results"]["density"] is not None
    assert "Top Hessian eigenvalues" in result.stdout
    assert "sharpscope analyze --help" in result.stdout


@pytest.mark.integration
def test_demo_verdict_is_a_verdict(demo):
    """Issue 25: the demo ended "alignment ... is uncertain ... analyze more samples to decide",
    though it already used every sample of its split."""
    verdict = demo.report["results"]["verdict"]
    assert re.match(r"SAM perturbation is (poorly|partly|well) aligned", verdict), verdict
    assert "uncertain" not in demo.result.stdout
    assert demo.report["results"]["sampling"]["replicates"]["weights"]
    assert "bias" not in demo.report["results"]["sampling"]  # the re-solve is opt-in


@pytest.mark.integration
def test_demo_states_how_long_each_stage_took(demo):
    lines = [s for s in demo.result.stderr.splitlines() if s.startswith("timings: ")]
    assert len(lines) == 1, demo.result.stderr
    shown = dict(re.findall(r"([\w-]+) ([\d.e+-]+) s", lines[0]))
    analysis = demo.report["timings"]["stages"]  # what the demo's own report.json recorded
    assert {"gradient", "eigenvalues", "trace", "density"} <= set(analysis)
    assert list(shown) == ["train", "save", "load", "analyze", *analysis, "write"], lines[0]
    for name, seconds in analysis.items():
        assert float(shown[name]) == pytest.approx(seconds, rel=0.05, abs=1e-9), name
    assert float(shown["analyze"]) >= 0.95 * sum(analysis.values())


@pytest.mark.integration
def test_demo_prints_a_follow_up_command_that_works(demo):
    checkpoint = demo.out / "digits-mlp.safetensors"
    assert demo.command[:3] == ["sharpscope", "analyze", str(checkpoint)]
    assert "--data" in demo.command and "--out" in demo.command
    rerun = succeed(demo.rerun)
    assert "Top Hessian eigenvalues" in rerun.stdout
    checksum = demo.redone["inputs"]["checkpoint"]["sha256"]
    assert checksum == demo.report["inputs"]["checkpoint"]["sha256"]
    assert demo.redone["results"]["density"] is not None


# --- help ----------------------------------------------------------------------------------------


def test_help():
    result = cli("--help")
    assert result.exit_code == 0
    assert "analyze" in result.stdout and "demo" in result.stdout
    result = cli("analyze", "--help")
    assert result.exit_code == 0
    options = ["--data", "--model", "--model-arg", "--trust-pickle", "--split", "--batch-size",
               "--samples", "--loss", "--top-k", "--method", "--tol", "--max-iter", "--no-trace",
               "--density", "--per-layer", "--params", "--exclude", "--batch-stats", "--backend",
               "--rho", "--alpha", "--seed", "--dtype", "--device", "--json", "--out", "--quiet",
               "--debug"]  # fmt: skip
    listing = cli("config", "analyze").stdout  # the settings --help leaves out, with their flags
    missing = [option for option in options if option not in result.stdout + listing]
    assert not missing
    result = cli("demo", "--help")
    assert result.exit_code == 0
    assert all(option in result.stdout for option in ("--out", "--steps", "--seed", "--quiet"))


# --- regressions: bugs these tests found, now fixed ---


def test_terminal_report_shows_the_checkpoint_path_verbatim(made):
    folder = Path("run[best]")  # relative to the test's working folder, so the cell is short
    folder.mkdir()
    (folder / "m.safetensors").write_bytes((made / "ours.safetensors").read_bytes())
    result = succeed(analyze(folder / "m.safetensors", "--no-trace"))
    assert "run[best]/m.safetensors" in result.stdout


@pytest.mark.integration
def test_json_stays_plain_with_forced_colour(made, runs):
    forced = runs["forced-colour"]
    assert forced.returncode == 0, forced.stderr
    assert "\x1b[" not in forced.stdout
    assert close(lambda_max(json.loads(forced.stdout)), made.reference)


def test_pyhessian_is_reproducible_for_a_seed(made):
    first, again = (
        report(made / "ours.safetensors", "--method", "pyhessian", "--seed", "5") for _ in range(2)
    )
    assert first["results"]["eigenvalues"]["values"] == again["results"]["eigenvalues"]["values"]
    assert first["results"]["trace"]["estimate"] == again["results"]["trace"]["estimate"]


def test_demo_with_zero_steps_is_handled(tmp_path):
    result = cli("demo", "--out", tmp_path / "demo", "--steps", "0", "--quiet")
    assert "IndexError" not in result.output
    assert result.exit_code == 0 or "--steps" in error_line(result)


@pytest.mark.integration
def test_demo_follow_up_command_repeats_the_demo_analysis(demo):
    assert demo.rerun.exit_code == 0
    redone, first = demo.redone["results"], demo.report["results"]
    assert redone["num_samples"] == first["num_samples"]
    assert close(redone["lambda_max"], first["lambda_max"], 1e-3)


@pytest.mark.integration
def test_demo_follow_up_command_quotes_paths(demo):
    command = shlex.split(printed_command(demo.result.stdout))
    assert " " in str(demo.out)
    assert command[2] == str(demo.out / "digits-mlp.safetensors")
    assert command[command.index("--out") + 1] == str(demo.out)


def test_out_files_follow_the_umask(made, tmp_path):
    out = tmp_path / "analysis"
    succeed(analyze(made / "ours.safetensors", "--no-trace", "--out", out))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("report.json", "convergence.png", "loss_slices.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name

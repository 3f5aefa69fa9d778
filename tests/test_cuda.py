"""On a CUDA device: the engine, the CLI's ``--device cuda`` and finetune against the same work
on the CPU and against dense float64 Hessians. Marked ``cuda`` and skipped without a device;
``benchmarks/gpu.sh`` runs them (``pytest -m cuda``).

Each test takes its device from the ``device`` fixture, so the same checks run on the CPU when
called with ``"cpu"`` (how they were checked on a machine without a GPU).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import tiny_hf
import torch
from safetensors.torch import load_file
from tiny_hf_truth import bert_truth, token_data
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.curvature import (
    HessianOperator,
    Objective,
    SolveSettings,
    deflated_trace,
    lanczos,
    lanczos_extremes,
)
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.losses import resolve_loss
from sharpscope.io.models import ModelSpec, build_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
RUNNER = CliRunner()


def runs(device: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """Output folder names and devices of a run on ``device`` and its twin on the CPU."""
    return ("there", device), ("here", "cpu")


@pytest.fixture
def device() -> str:
    return "cuda"


def bert_problem() -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """The tiny BERT classifier (sdpa attention), its padded inputs and labels."""
    data = token_data()
    return tiny_hf.bert(), {k: data[k] for k in ("input_ids", "attention_mask")}, data["labels"]


def check_transformer(device: str, dtype: torch.dtype) -> None:
    """Top-3 of the tiny BERT on ``device`` in ``dtype`` equal the dense float64 CPU Hessian's."""
    truth = bert_truth().flip(0)
    model, inputs, labels = bert_problem()
    model = model.to(device=device, dtype=dtype).eval()
    batch = ({k: v.to(device) for k, v in inputs.items()}, labels.to(device))
    op = HessianOperator(Objective(model, resolve_loss("cross-entropy"), [batch]))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    result = lanczos(op, 3, settings=SolveSettings(tol=tol))
    assert result.all_converged
    rel = 1e-8 if dtype == torch.float64 else 1e-4
    scale = float(truth.abs().max())
    assert result.eigenvalues.cpu().tolist() == pytest.approx(
        truth[:3].tolist(), rel=rel, abs=rel * scale
    )


def test_transformer_products_match_the_dense_hessian_in_float64(device):
    check_transformer(device, torch.float64)


def test_float32_sdpa_attention_gets_a_kernel_with_second_derivatives(device):
    # In float32 CUDA picks its flash or memory-efficient kernels, which have no double backward.
    check_transformer(device, torch.float32)


@pytest.mark.parametrize("max_basis", [None, 9])
def test_a_host_basis_stays_pinned_on_the_cpu_with_the_device_paths_answers(
    device, monkeypatch, max_basis
):
    """``basis_device="host"``, streamed 3 vectors at a time: the basis (and the trace's subspace)
    lies in pinned CPU memory, the eigenpairs and deflated trace are the device path's."""
    model, inputs, labels = bert_problem()
    model = model.to(device=device, dtype=torch.float64).eval()
    batch = ({k: v.to(device) for k, v in inputs.items()}, labels.to(device))
    op = HessianOperator(Objective(model, resolve_loss("cross-entropy"), [batch]))
    lanczos_module = importlib.import_module("sharpscope.curvature.lanczos")
    monkeypatch.setattr(lanczos_module, "HOST_SLAB_BYTES", 3 * op.size * 8)
    results = {}
    for home in ("device", "host"):
        settings = SolveSettings(tol=1e-10, max_iter=400, max_basis=max_basis, basis_device=home)
        top, bottom = lanczos_extremes(op, 3, settings=settings, keep_subspace=True)
        trace = deflated_trace(op, top.subspace, settings=SolveSettings(tol=1e-3, max_iter=10))
        results[home] = top, bottom, trace
    (top, bottom, trace), (top_d, bottom_d, trace_d) = results["host"], results["device"]
    assert top.subspace.basis.device.type == "cpu" and top.subspace.rows == 3
    assert top.subspace.basis.is_pinned() == (device == "cuda")
    assert top_d.subspace.basis.device.type == torch.device(device).type
    assert top.eigenvectors.device.type == torch.device(device).type
    for host, whole in ((top, top_d), (bottom, bottom_d)):
        assert host.all_converged
        torch.testing.assert_close(host.eigenvalues, whole.eigenvalues, rtol=1e-9, atol=0)
    assert trace.estimate == pytest.approx(trace_d.estimate, rel=1e-9)


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": (16,)})
    path = tmp_path_factory.mktemp("cuda") / "mlp.safetensors"
    save_checkpoint(path, build_model(spec), spec)
    return path


def analyze_report(checkpoint: Path, out: Path, device: str) -> dict:
    args = ["analyze", str(checkpoint), "--data", "digits", "--samples", "256"]
    args += ["--dtype", "float64", "--tol", "1e-10", "--top-k", "3", "--no-trace"]
    result = RUNNER.invoke(app, [*args, "--device", device, "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "report.json").read_text())


def test_analyze_on_the_device_equals_the_cpu(device, mlp_checkpoint, tmp_path):
    there, here = (analyze_report(mlp_checkpoint, tmp_path / n, d) for n, d in runs(device))
    assert there["inputs"]["device"].startswith(device)
    values = there["results"]["eigenvalues"]["values"]
    assert values == pytest.approx(here["results"]["eigenvalues"]["values"], rel=1e-8)
    lowest = there["results"]["lambda_min"]["value"]
    assert lowest == pytest.approx(here["results"]["lambda_min"]["value"], rel=1e-6, abs=1e-10)


def finetuned(checkpoint: Path, run: Path, device: str) -> dict[str, torch.Tensor]:
    args = ["finetune", str(checkpoint), "--data", "digits", "--optimizer", "eigen-sam"]
    args += ["--eig-every", "3", "--steps", "6", "--batch-size", "32", "--lr", "0.05"]
    args += ["--probe-size", "64", "--track-every", "3", "--track-iters", "5"]
    result = RUNNER.invoke(app, [*args, "--device", device, "--quiet", "--out", str(run)])
    assert result.exit_code == 0, result.stderr
    name = json.loads((run / "latest").read_text())["dir"]
    return load_file(str(run / name / "model.safetensors"))


def test_eigen_sam_finetune_on_the_device_follows_the_cpu(device, mlp_checkpoint, tmp_path):
    start = load_file(str(mlp_checkpoint))
    there, here = (finetuned(mlp_checkpoint, tmp_path / n, d) for n, d in runs(device))
    assert there.keys() == here.keys() == start.keys()
    for key in start:
        assert there[key].device.type == "cpu"  # saved to load anywhere
        assert not torch.equal(there[key], start[key]), key
        torch.testing.assert_close(there[key], here[key], rtol=1e-3, atol=1e-4)

"""finetune's `backend` on a tiny float64 tanh MLP (smooth, so that finite differences take its
Hessian, and float64 throughout, unlike Llama's float32 RMSNorm): Eigen-SAM's refresh and the
tracked λ_max by finite differences equal double backward's to the differences' error; `auto`
chooses once per run, says which and why, and a resume keeps its choice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from finetune_processes import assert_same, stopping_after
from safetensors.torch import load_file
from tiny_cli import one_error_line
from typer.testing import CliRunner, Result

from sharpscope.cli.app import app
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.models import ModelSpec, build_model
from sharpscope.training import run as training_run
from sharpscope.training.metrics import read_rows
from sharpscope.training.state import load_trainer_state

STEPS = 5
RUN = (
    *("--optimizer", "eigen-sam", "--eig-every", "2", "--lr", "0.05", "--batch-size", "32"),
    *("--dtype", "float64", "--steps", str(STEPS), "--track-every", "1", "--save-every", "1"),
)
"""Refreshes at global steps 2 and 4 (the second warm-started); a row and a checkpoint every
step."""


@pytest.fixture(scope="module")
def files(
    finetune_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A tanh MLP's checkpoint (64-8-10, with its spec) and the digits of ``finetune_files``."""
    checkpoint = tmp_path_factory.mktemp("backend") / "tanh.safetensors"
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": (8,), "activation": "tanh"})
    save_checkpoint(checkpoint, build_model(spec), spec)
    return checkpoint, finetune_files["data"]


def finetune(files: tuple[Path, Path], out: Path, *extra: str) -> Result:
    """An in-process run of :data:`RUN` into ``out``; its result (exit 0)."""
    checkpoint, data = files
    args = ["finetune", str(checkpoint), "--data", str(data), "--out", str(out), *RUN, *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(
    files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """One uninterrupted run per `backend` (made once)."""
    done: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in done:
            out = tmp_path_factory.mktemp("runs") / backend
            finetune(files, out, "--backend", backend, "--quiet")
            done[backend] = out
        return done[backend]

    return get


def weights_at(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"step-{step:06d}" / "model.safetensors"))


def eigenvector_at(run: Path, step: int = STEPS) -> torch.Tensor:
    """Eigen-SAM's eigenvector in the trainer state of ``step``, flat."""
    state = load_trainer_state(run / f"step-{step:06d}" / "trainer.pt")
    vector = state["optimizer"]["sam"]["eigenvector"]
    return torch.cat([vector[name].reshape(-1) for name in sorted(vector)])


def test_finite_differences_take_double_backward_s_steps_to_their_error(runs: Callable):
    exact, differences = runs("double-backward"), runs("finite-difference")
    a, b = weights_at(exact), weights_at(differences)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(b[name], a[name], rtol=1e-6, atol=1e-9), name
    assert any(not torch.equal(a[n], b[n]) for n in a)  # other products, other last bits
    cosine = torch.nn.functional.cosine_similarity(
        eigenvector_at(exact), eigenvector_at(differences), 0
    )
    assert float(cosine) == pytest.approx(1.0, abs=1e-6)
    rows = [read_rows(run / "metrics.jsonl") for run in (exact, differences)]
    assert [r["step"] for r in rows[1]] == list(range(STEPS + 1))
    for one, other in zip(*rows, strict=True):
        assert other["lambda_max"] == pytest.approx(one["lambda_max"], rel=1e-6)
        if one["esam_eigenvalue"] is not None:
            assert other["esam_eigenvalue"] == pytest.approx(one["esam_eigenvalue"], rel=1e-6)
    # step 0, before any step: the same weights, so the tracker's own products differ
    assert rows[0][0]["lambda_max"] != rows[1][0]["lambda_max"]
    assert json.loads((differences / "config.json").read_text())["backend"] == "finite-difference"


def test_auto_chooses_double_backward_for_a_tiny_model_and_says_why(
    files: tuple[Path, Path], runs: Callable, tmp_path: Path
):
    result = finetune(files, tmp_path / "auto", "--backend", "auto")
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("plan:")]
    assert line.startswith("plan: --backend double-backward: the double-backward graph ≈ ")
    assert line.endswith(" free") and " fits in " in line
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert (config["backend"], config["auto_backend"]) == ("auto", "double-backward")
    assert_same(weights_at(tmp_path / "auto"), weights_at(runs("double-backward")))


def test_auto_chooses_once_and_a_resume_keeps_its_choice(
    files: tuple[Path, Path], runs: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Without the memory for the graph auto takes finite differences; the resumed run keeps
    them though the memory is back, and ends bit-identical to an uninterrupted
    finite-difference run."""
    monkeypatch.setattr(training_run, "available_memory", lambda device: 1000)
    stopping_after(monkeypatch, 2)
    checkpoint, data = files
    out = tmp_path / "parts"
    args = ["finetune", str(checkpoint), "--data", str(data), "--out", str(out), *RUN]
    result = CliRunner().invoke(app, [*args, "--backend", "auto"])
    assert result.exit_code == 128, result.output
    assert "plan: --backend finite-difference: the double-backward graph ≈ " in result.stderr
    assert "would not fit in 1 kB free" in result.stderr
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["finetune", "--resume", str(out), "--backend", "auto"])
    assert result.exit_code == 0, result.output
    assert "plan:" not in result.stderr  # chosen once, when the run started
    assert_same(weights_at(out), weights_at(runs("finite-difference")))


def test_a_bad_or_changed_backend_is_a_one_line_error(
    files: tuple[Path, Path], runs: Callable, tmp_path: Path
):
    checkpoint, data = files
    new = ["finetune", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "bad")]
    one_error_line(CliRunner().invoke(app, [*new, "--backend", "nope"]), "--backend", "'nope'")
    resume = ["finetune", "--resume", str(runs("finite-difference")), "--steps", "5"]
    changed = CliRunner().invoke(app, [*resume, "--backend", "double-backward"])
    one_error_line(changed, "--backend double-backward differs from the run's finite-difference")

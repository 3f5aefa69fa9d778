"""On a torch whose weights-only unpickler has known code-execution flaws (older than 2.10),
pickle-based files are refused unless trusted; safetensors files are unaffected."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_cli import FAST, make_checkpoint, refused

from security.attack import Snapshot, cli
from sharpscope.io.unpickler import unpickler_is_safe

MLP = ["--model", "mlp", "--model-arg", "hidden=(16,)"]


@pytest.mark.parametrize(
    ("version", "safe"),
    [("2.5.1", False), ("2.9.1+cu121", False), ("1.13.1", False), ("2.10.0", True),
     ("2.13.0+cpu", True), ("3.0.0", True), ("unknown", False)],
)  # fmt: skip
def test_which_torch_is_safe(version, safe):
    assert unpickler_is_safe(version) is safe


@pytest.fixture
def old_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1")


@pytest.fixture
def files(tmp_path):
    """The same MLP as a .safetensors checkpoint and as a torch.save state dict, and digits-like
    data as a .pt file."""
    safetensors = make_checkpoint(tmp_path)
    pickled = tmp_path / "tiny.pt"
    torch.save(load_file(safetensors), pickled)
    data = tmp_path / "data.pt"
    torch.save({"inputs": torch.rand(16, 64), "targets": torch.arange(16) % 10}, data)
    return safetensors, pickled, data


def test_an_old_torch_refuses_a_pickled_checkpoint(tmp_path, files, old_torch):
    _, pickled, _ = files
    snap = Snapshot(tmp_path)
    result = cli("analyze", pickled, *MLP, *FAST)
    refused(result.exit_code, result.stderr, "torch 2.5.1", "CVE-2025-32434", "--trust-pickle")
    snap.assert_unchanged()
    assert cli("analyze", pickled, *MLP, *FAST, "--trust-pickle").exit_code == 0


def test_an_old_torch_refuses_pickled_data_with_no_opt_in(files, old_torch):
    safetensors, _, data = files
    result = cli("analyze", safetensors, *FAST, "--data", data)
    refused(result.exit_code, result.stderr, "data.pt", "CVE-2026-24747", ".safetensors")
    assert "--trust-pickle" not in result.stderr  # data files are never unpickled beyond tensors


def test_an_old_torch_still_reads_safetensors(files, old_torch):
    safetensors, _, _ = files
    assert cli("analyze", safetensors, *FAST).exit_code == 0


def test_this_torch_reads_pickled_weights(files):
    _, pickled, data = files
    assert cli("analyze", pickled, *MLP, *FAST).exit_code == 0
    assert cli("analyze", pickled, *MLP, *FAST, "--data", data, "--samples", "0").exit_code == 0

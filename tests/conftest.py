"""Small float64 models with dense Hessians: the ground truth the engine is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sharpscope.curvature import curvature_mode, select_params
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.data import load_data
from sharpscope.io.models import ModelSpec, build_model


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' models are tiny: one thread runs them fastest, and steadiest on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Problem:
    """A model, its loss and data, and the dense Hessian of the mean loss over all the data."""

    name: str
    model: nn.Module
    loss_fn: Any
    inputs: torch.Tensor
    targets: torch.Tensor
    hessian: torch.Tensor

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.inputs, self.targets)]

    def split(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same data as batches of at most ``size`` samples."""
        return list(zip(self.inputs.split(size), self.targets.split(size), strict=True))


def dense_hessian(
    model: nn.Module, loss_fn: Any, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The Hessian over the model's trainable parameters by ``torch.func.hessian`` (eval mode)."""
    space = select_params(model)
    flat = torch.cat([p.detach().reshape(-1) for p in space.params])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, space.unflatten(w), (inputs,)), targets)

    with curvature_mode(model):
        return hessian(loss_of)(flat)


class Shared(nn.Module):
    """A frozen embedding layer, then one linear layer applied twice (a shared parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 6)
        self.frozen.requires_grad_(False)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.frozen(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(h)


class SmallCNN(nn.Module):
    """Conv, BatchNorm, ReLU, pooling, linear: a CNN small enough for a dense Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = nn.functional.max_pool2d(h, 2)
        return self.fc(h.flatten(1))


def _warm_batchnorm(model: nn.Module, inputs: torch.Tensor) -> None:
    """Give BatchNorm non-trivial running statistics and affine weights."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(inputs)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()


def _make(name: str) -> Problem:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ce = nn.CrossEntropyLoss()
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        inputs = torch.randn(64, 5, generator=gen)
        targets = torch.randint(0, 3, (64,), generator=gen)
    elif name == "cnn":
        model = SmallCNN()
        inputs = torch.randn(48, 1, 6, 6, generator=gen)
        targets = torch.randint(0, 4, (48,), generator=gen)
        _warm_batchnorm(model, inputs)
    else:
        model = Shared()
        inputs = torch.randn(40, 4, generator=gen)
        targets = torch.randint(0, 3, (40,), generator=gen)
    model = model.double()
    inputs = inputs.double()
    return Problem(name, model, ce, inputs, targets, dense_hessian(model, ce, inputs, targets))


@pytest.fixture(scope="session", params=["mlp", "cnn", "shared"])
def problem(request: pytest.FixtureRequest) -> Problem:
    return _make(request.param)


@pytest.fixture(scope="session")
def mlp() -> Problem:
    return _make("mlp")


@pytest.fixture(scope="session")
def cnn() -> Problem:
    return _make("cnn")


@pytest.fixture(scope="session")
def finetune_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MLP checkpoint (with its spec) and 512 + 200 digits in one tensor file with train
    and test splits (so that finetune subprocesses need no scikit-learn import)."""
    folder = tmp_path_factory.mktemp("finetune-inputs")
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": (16,)})
    save_checkpoint(folder / "start.safetensors", build_model(spec), spec)
    train = load_data("digits", "train", samples=512)
    test = load_data("digits", "test", samples=200)
    data = {"train_x": train.inputs, "train_y": train.targets}
    torch.save({**data, "test_x": test.inputs, "test_y": test.targets}, folder / "digits.pt")
    return {"checkpoint": folder / "start.safetensors", "data": folder / "digits.pt"}

"""Small float64 models with dense Hessians: the ground truth the engine is checked against."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ground_truth import Problem, Shared, dense_hessian
from torch import nn

from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.data import load_data
from sharpscope.io.models import ModelSpec, build_model

PROCESSES = ("python", "sharpscope", "torchrun")
"""Names of the programs whose start makes a test ``integration``: sharpscope, torchrun or any
Python script in a process of its own."""

_running: list[pytest.Item] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Remember the running test (its fixtures included) for :func:`processes_are_integration`."""
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.fixture(autouse=True, scope="session")
def processes_are_integration() -> Iterator[None]:
    """A test (or a fixture of it) that starts a Python process must be marked ``integration``,
    so that ``pytest -m "not integration"`` stays the fast in-process loop."""
    start = subprocess.Popen.__init__

    def checked(self: subprocess.Popen, args: object, *more: object, **options: object) -> None:
        command = str(args).split() if isinstance(args, (str, Path)) else [*map(str, args)]
        program = Path(command[0]).name
        test = _running[-1] if _running else None
        if program.startswith(PROCESSES) and test and not test.get_closest_marker("integration"):
            raise AssertionError(f"{test.nodeid} starts {program}: mark it integration")
        start(self, args, *more, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", checked)
        yield


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' models are tiny: one thread runs them fastest, and steadiest on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

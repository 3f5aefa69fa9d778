"""The first batch runs through the model once at loading: load_inputs' check, which the
commands' operators do not repeat unless theirs checks more (another BatchNorm mode, or a loss
whose reduction must be found on the batch's halves)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tiny_cli import FAST, make_checkpoint
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from typer.testing import CliRunner

import sharpscope.analysis.analyze as analyze_module
import sharpscope.analysis.landscape as landscape_module
from sharpscope.analysis.analyze import analyze
from sharpscope.analysis.config import AnalyzeConfig
from sharpscope.cli.app import app
from sharpscope.errors import InputError


@pytest.fixture
def forwards() -> Iterator[list[int]]:
    """How many outermost module calls (a model's forward passes) ran: one count, growing."""
    depth, count = [0], [0]

    def enter(*_: object) -> None:
        depth[0] += 1

    def leave(*_: object) -> None:
        depth[0] -= 1
        count[0] += depth[0] == 0

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    yield count
    for handle in handles:
        handle.remove()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("once"))


@pytest.mark.parametrize(
    ("command", "flags", "at_load"),
    [
        ("analyze", [], 1),
        ("analyze", ["--batch-stats"], 2),  # the operator's check runs in train-mode BatchNorm
        ("landscape", ["--points", "3", "--grid", "3"], 1),
        ("landscape", ["--points", "3", "--grid", "3", "--directions", "eigen"], 1),
    ],
)
def test_a_command_runs_the_first_batch_once_at_loading(
    command, flags, at_load, checkpoint, forwards, monkeypatch, tmp_path
):
    """Forwards until each operator of the command is built: load_inputs' check, and the
    operator's own only where it checks more (before: 2 for every case, 3 for eigen)."""
    built: list[int] = []
    module, name = (
        (analyze_module, "_operator")
        if command == "analyze"
        else (landscape_module, "HessianOperator")
    )
    make = getattr(module, name)

    def counted(*args, **kwargs):
        op = make(*args, **kwargs)
        built.append(forwards[0])
        return op

    monkeypatch.setattr(module, name, counted)
    args = [command, str(checkpoint), *FAST, *flags, "--out", str(tmp_path / "out")]
    if command == "landscape":
        args.remove("--top-k")
        args.remove("2")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert built and set(built) == {at_load}  # eigen directions: a second operator, unchecked


def test_analyze_runs_the_first_batch_again_unless_it_was_checked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    config = AnalyzeConfig(k=1, density=False, shards=0, trace=False)
    runs = []
    for checked in (False, True):
        before = len(calls)
        result = analyze(model, nn.CrossEntropyLoss(), data, config, checked=checked)
        runs.append((len(calls) - before, float(result.top.eigenvalues[0])))
    assert runs[0][0] == runs[1][0] + 1 and runs[0][1] == runs[1][1]
    # a loss that does not state its reduction is still checked, on the batch's halves
    summed = lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum")  # noqa: E731
    with pytest.raises(InputError, match="returns the sum of a batch"):
        analyze(model, summed, data, config, checked=True)

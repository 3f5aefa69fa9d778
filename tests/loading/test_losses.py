"""Loss specs against hand-computed values, and their errors."""

from __future__ import annotations

import math
import sys
import uuid

import pytest
import torch
import torch.nn.functional as F

from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss

LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


def loss_error(spec: str, *args: torch.Tensor) -> str:
    """The one-line InputError resolving ``spec`` (and calling it on ``args``, if any) raises."""
    with pytest.raises(InputError) as info:
        loss = resolve_loss(spec)
        loss(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("spec", ["cross-entropy", "ce", "CE", "cross_entropy"])
def test_cross_entropy_by_hand(spec):
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    value = resolve_loss(spec)(LOGITS, torch.tensor([0, 1]))
    assert value.ndim == 0 and value.item() == pytest.approx(expected, abs=1e-12)


def test_cross_entropy_is_the_default_and_takes_probabilities():
    probabilities = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    expected = (
        math.log(1 + math.exp(-2)) + 0.5 * math.log(1 + math.e) + 0.5 * math.log(1 + math.exp(-1))
    ) / 2
    assert resolve_loss()(LOGITS, probabilities).item() == pytest.approx(expected, abs=1e-12)


def test_cross_entropy_refuses_regression_targets():
    message = loss_error("ce", LOGITS, torch.tensor([0.3, 0.7]))
    assert "cross-entropy needs class labels, but the targets are floats of shape (2,)" in message
    assert "pass `loss` mse" in message


def test_mse_by_hand():
    outputs = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    value = resolve_loss("mse")(outputs, torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
    assert value.item() == pytest.approx((4 + 1) / 4)
    column = resolve_loss("MSE")(torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 0.0]))
    assert column.item() == pytest.approx(2.5)  # (N, 1) outputs against (N,) targets


def test_mse_on_class_labels_uses_one_hot_of_the_output_width():
    outputs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    value = resolve_loss("mse")(outputs, torch.tensor([0, 2]))
    assert value.item() == pytest.approx(1 / 6)
    maps = torch.zeros(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 2]]])
    assert resolve_loss("mse")(maps, labels).item() == pytest.approx(4 / 12)


@pytest.mark.parametrize("spec", ["ce", "mse"])
def test_num_classes_refuses_narrow_outputs(spec):
    loss = resolve_loss(spec, num_classes=2)
    assert loss(LOGITS, torch.tensor([0, 1])).ndim == 0
    with pytest.raises(InputError, match="labels go up to 4 but the model has 2 outputs"):
        resolve_loss(spec, num_classes=5)(LOGITS, torch.tensor([0, 1]))


def test_mse_shape_mismatch():
    message = loss_error("mse", torch.zeros(2, 3), torch.zeros(2, 2))
    assert "targets of shape (2, 2) do not match outputs of shape (2, 3)" in message


def test_losses_are_twice_differentiable():
    w = LOGITS.clone().requires_grad_()
    for spec in ("ce", "mse"):
        (g,) = torch.autograd.grad(
            resolve_loss(spec)(w, torch.tensor([0, 1])), w, create_graph=True
        )
        assert g.sum().requires_grad


@pytest.fixture
def module(tmp_path, monkeypatch) -> str:
    name = f"userloss_{uuid.uuid4().hex}"
    source = (
        "import torch\n"
        "def half_sq(outputs, targets):\n"
        "    return 0.5 * ((outputs - targets) ** 2).sum(1).mean()\n"
        "def per_sample(outputs, targets):\n    return ((outputs - targets) ** 2).sum(1)\n"
        "def boom(outputs, targets):\n    raise RuntimeError('bad\\nloss')\n"
        "class Needs:\n    def __init__(self, scale):\n        pass\n"
        "VALUE = 1\n"
    )
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_loss_function(module, tmp_path):
    outputs, targets = (
        torch.tensor([[1.0, 2.0], [0.0, 0.0]]),
        torch.tensor([[0.0, 0.0], [0.0, 2.0]]),
    )
    assert resolve_loss(f"{module}:half_sq")(outputs, targets).item() == pytest.approx((5 + 4) / 4)
    path_form = resolve_loss(f"{tmp_path / module}.py:half_sq")
    assert path_form(outputs, targets).item() == pytest.approx(2.25)


def test_loss_class_is_instantiated():
    outputs, targets = torch.tensor([0.0, 3.0]), torch.tensor([0.5, 0.0])
    loss = resolve_loss("torch.nn:SmoothL1Loss")
    assert loss(outputs, targets).item() == pytest.approx(F.smooth_l1_loss(outputs, targets).item())


def test_user_loss_errors(module):
    x = torch.zeros(3, 2)
    assert "returned (3,), not a scalar tensor; it must return the mean" in loss_error(
        f"{module}:per_sample", x, x
    )
    assert "raised RuntimeError: bad loss; fix the function" in loss_error(f"{module}:boom", x, x)
    assert "making Needs() failed" in loss_error(f"{module}:Needs")
    assert "is a int, not a function" in loss_error(f"{module}:VALUE")
    assert f"{module} has no 'nope'" in loss_error(f"{module}:nope")
    assert "cannot find module no_such_loss_pkg" in loss_error("no_such_loss_pkg:f")


def test_unknown_loss_lists_the_choices():
    message = loss_error("hinge")
    assert message == (
        "unknown loss 'hinge'; pass auto, cross-entropy (or ce), mse, causal-lm, masked-lm, "
        "or pkg.module:function / path/to/file.py:function"
    )

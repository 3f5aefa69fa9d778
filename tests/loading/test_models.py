"""Built-in architectures, model specs, --model-arg parsing and building models from specs."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from test_checkpoints import error_message
from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.architectures import BUILTIN_MODELS, ToImage, cnn, mlp, resnet18
from sharpscope.io.models import ModelSpec, build_model, parse_model_args

# --- built-in architectures ---------------------------------------------------------------------


def test_registry_names():
    assert list(BUILTIN_MODELS) == ["mlp", "cnn", "resnet18"]


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 64), (2, 8, 8)])
def test_mlp_and_cnn_on_digits(shape):
    x = torch.randn(shape)
    assert mlp()(x).shape == (2, 10)
    assert cnn()(x).shape == (2, 10)


def test_mlp_options():
    model = mlp(in_features=12, hidden=(7, 5, 3), num_classes=4, activation="tanh")
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [7, 5, 3, 4]
    assert sum(isinstance(m, nn.Tanh) for m in model) == 3
    assert mlp(hidden=9)(torch.randn(3, 64)).shape == (3, 10)
    assert mlp(hidden=())(torch.randn(3, 64)).shape == (3, 10)
    with pytest.raises(ValueError, match="relu, tanh"):
        mlp(activation="gelu")


def test_cnn_on_cifar_sized_images():
    model = cnn(in_channels=3, num_classes=5, width=4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model(torch.randn(2, 3 * 32 * 32)).shape == (2, 5)


def test_resnet18_shape_and_size():
    torch.manual_seed(0)
    model = resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet18(num_classes=3, in_channels=1).fc.out_features == 3


def test_to_image_rejects_what_it_cannot_reshape():
    with pytest.raises(ValueError, match="flattened square"):
        ToImage(1)(torch.randn(2, 63))
    with pytest.raises(ValueError, match="flattened square"):
        ToImage(3)(torch.randn(2, 8, 8))


def test_builtins_script_and_export():
    model = cnn(width=2).eval()
    x = torch.randn(2, 64)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))


# --- specs and --model-arg ----------------------------------------------------------------------


def test_spec_json_round_trip():
    spec = ModelSpec("mlp", {"hidden": (64, 64), "activation": "tanh", "extra": {"a": [1, [2]]}})
    assert spec.args["extra"] == {"a": (1, (2,))}
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert isinstance(again.args["hidden"], tuple)
    assert ModelSpec.from_json('{"target": "cnn"}') == ModelSpec("cnn")
    assert str(spec).startswith("mlp(hidden=(64, 64), activation='tanh'")


@pytest.mark.parametrize(
    "text", ["not json", "[1, 2]", '{"args": {}}', '{"target": "x", "args": 3}']
)
def test_spec_from_bad_json(text):
    with pytest.raises(InputError) as excinfo:
        ModelSpec.from_json(text)
    error_message(excinfo, "model spec")


def test_spec_rejects_what_json_cannot_hold():
    with pytest.raises(InputError) as excinfo:
        ModelSpec("mlp", {"hidden": {1, 2}})
    error_message(excinfo, "JSON", "hidden")
    with pytest.raises(InputError) as excinfo:
        ModelSpec("", {})
    error_message(excinfo, "non-empty")


def test_parse_model_args():
    args = parse_model_args(
        ["hidden=(64,64)", "activation=tanh", "width = 8", "lr=1e-3", "flag=True", "path=a/b", "e="]
    )
    assert args == {
        "hidden": (64, 64),
        "activation": "tanh",
        "width": 8,
        "lr": 1e-3,
        "flag": True,
        "path": "a/b",
        "e": "",
    }
    assert parse_model_args([]) == {}


@pytest.mark.parametrize(
    ("items", "part"),
    [(["hidden"], "key=value"), (["1x=3"], "key=value"), (["a=1", "a=2"], "twice")],
)
def test_parse_model_args_errors(items, part):
    with pytest.raises(InputError) as excinfo:
        parse_model_args(items)
    error_message(excinfo, part)


# --- building models ----------------------------------------------------------------------------


def test_build_builtin_with_args():
    model = build_model(ModelSpec("mlp", parse_model_args(["hidden=(5,)", "num_classes=3"])))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_build_from_module_path():
    model = build_model(ModelSpec("torch.nn:Linear", {"in_features": 2, "out_features": 3}))
    assert isinstance(model, nn.Linear)


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        (ModelSpec("vgg"), ["'vgg'", "mlp, cnn, resnet18"]),
        (ModelSpec("mypkg.models"), ["needs :factory"]),
        (ModelSpec(":make"), ["pkg.module:factory"]),
        (ModelSpec("my models:make"), ["pkg.module:factory"]),
        (ModelSpec("no_such_pkg_for_sharpscope.models:make"), ["no_such_pkg_for_sharpscope"]),
        (ModelSpec("torch.nn:Linearr"), ["`model`", "'Linearr'"]),
        (ModelSpec("math:pi"), ["float", "not a callable"]),
        (ModelSpec("builtins:dict"), ["returned a dict", "nn.Module"]),
        (ModelSpec("mlp", {"depth": 3}), ["depth", "in_features=64"]),
        (ModelSpec("mlp", {"hidden": 2.5}), ["TypeError", "hidden=2.5"]),
        (ModelSpec("mlp", {"activation": "gelu"}), ["ValueError", "relu, tanh"]),
    ],
)
def test_build_errors(spec, parts):
    with pytest.raises(InputError) as excinfo:
        build_model(spec)
    error_message(excinfo, *parts)


def _write(path, source: str) -> None:
    path.write_text(textwrap.dedent(source), encoding="utf-8")


def test_build_from_file_with_sibling_import(tmp_path):
    _write(tmp_path / "blocks_for_file_test.py", "from torch import nn\nWIDTH = 6\n")
    _write(
        tmp_path / "net.py",
        """
        from torch import nn
        from blocks_for_file_test import WIDTH

        def make(out=2):
            return nn.Sequential(nn.Flatten(), nn.Linear(4, WIDTH), nn.Linear(WIDTH, out))
        """,
    )
    try:
        model = build_model(ModelSpec(f"{tmp_path / 'net.py'}:make", {"out": 5}))
    finally:
        sys.modules.pop("blocks_for_file_test", None)
    assert model(torch.randn(3, 2, 2)).shape == (3, 5)
    assert str(tmp_path) not in sys.path


def test_build_from_module_in_working_directory(tmp_path, monkeypatch):
    _write(
        tmp_path / "cwd_models_for_test.py", "from torch import nn\ndef make(): return nn.ReLU()"
    )
    monkeypatch.chdir(tmp_path)
    try:
        assert isinstance(build_model(ModelSpec("cwd_models_for_test:make")), nn.ReLU)
    finally:
        sys.modules.pop("cwd_models_for_test", None)


@pytest.mark.parametrize(
    ("name", "source", "target", "parts"),
    [
        ("missing.py", None, "make", ["missing.py", "no such Python file"]),
        ("folder.py", "DIR", "make", ["folder.py", "no such Python file"]),
        ("broken.py", "def make(:\n", "make", ["broken.py", "SyntaxError"]),
        ("raises.py", "import no_such_module_xyz\n", "make", ["ModuleNotFoundError", "xyz"]),
        ("nofactory.py", "def build(): pass\n", "make", ["'make'", "build"]),
    ],
)
def test_build_from_file_errors(tmp_path, name, source, target, parts):
    path = tmp_path / name
    if source == "DIR":
        path.mkdir()
    elif source is not None:
        path.write_text(source, encoding="utf-8")
    with pytest.raises(InputError) as excinfo:
        build_model(ModelSpec(f"{path}:{target}"))
    error_message(excinfo, *parts)

"""Checkpoints end to end: every format, detection by content, the engine on loaded modules,
every error case, and atomic saving."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ground_truth import EXACT_BACKENDS
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sharpscope.curvature import HessianOperator, Objective, curvature_mode
from sharpscope.errors import InputError
from sharpscope.io import checkpoints
from sharpscope.io.architectures import cnn
from sharpscope.io.checkpoints import (
    FORMATS,
    SPEC_KEY,
    VERSION_KEY,
    detect_format,
    file_sha256,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from sharpscope.io.models import ModelSpec, build_model

SPEC = ModelSpec("cnn", {"width": 2})

# torch 2.13 deprecates TorchScript, which these tests still write to check that it can be read.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean"),
]


def error_message(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> str:
    """The message of an InputError: one line, mentioning every part."""
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def _model() -> nn.Module:
    """The built-in cnn at width 2, with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = cnn(width=2)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 1, 8, 8))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# --- torch.save state dicts ---------------------------------------------------------------------


def test_plain_state_dict(tmp_path, model, batch):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded, ckpt = load_model(path, SPEC)
    assert (ckpt.format, ckpt.model_spec, ckpt.module, ckpt.stripped_prefix) == (
        "state_dict",
        None,
        None,
        "",
    )
    assert set(ckpt.state_dict) == set(model.state_dict())
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    _same(loaded, model, batch[0])


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model", None])
@pytest.mark.parametrize("prefix", ["", "module.", "model.", "module.model."])
def test_wrapped_and_prefixed_state_dicts(tmp_path, model, batch, wrapper, prefix):
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 7, "note": "x"}, path)
    loaded, ckpt = load_model(path, SPEC)
    assert ckpt.stripped_prefix == prefix
    assert ckpt.metadata == ({} if wrapper is None else {"epoch": "7", "note": "x"})
    _same(loaded, model, batch[0])


def test_prefix_kept_when_the_model_wants_it(tmp_path, batch):
    """A model whose own names all start with ``model.`` gets the stripped prefix back."""
    (tmp_path / "wrapped.py").write_text(
        "from torch import nn\nfrom sharpscope.io.architectures import cnn\n"
        "class Wrapped(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.model = cnn(width=2)\n"
        "    def forward(self, x):\n        return self.model(x)\n",
        encoding="utf-8",
    )
    spec = ModelSpec(f"{tmp_path / 'wrapped.py'}:Wrapped")
    torch.manual_seed(3)
    original = build_model(spec)
    torch.save({"module." + k: v for k, v in original.state_dict().items()}, tmp_path / "w.pt")
    loaded, ckpt = load_model(tmp_path / "w.pt", spec)
    assert ckpt.stripped_prefix == "module.model."
    _same(loaded, original, batch[0])


def test_model_takes_the_dtype_of_the_weights(tmp_path, model, batch):
    path = tmp_path / "double.pt"
    torch.save(copy.deepcopy(model).double().state_dict(), path)
    loaded, _ = load_model(path, SPEC)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    torch.testing.assert_close(loaded.eval()(batch[0].double()).float(), model(batch[0]))


def test_legacy_pickle_state_dict(tmp_path, model, batch):
    path = tmp_path / "legacy.bin"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == "torch.save"
    loaded, ckpt = load_model(path, SPEC)
    assert ckpt.format == "state_dict"
    _same(loaded, model, batch[0])


# --- safetensors --------------------------------------------------------------------------------


def test_save_checkpoint_round_trip(tmp_path, model, batch):
    path = tmp_path / "out" / "model.safetensors"
    save_checkpoint(path, model, SPEC, {"epoch": "3"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
        keys = set(f.keys())
    assert keys == set(model.state_dict())  # parameters and buffers
    assert json.loads(stored[SPEC_KEY]) == {"target": "cnn", "args": {"width": 2}}
    assert stored["epoch"] == "3" and stored[VERSION_KEY]
    loaded, ckpt = load_model(path)  # no spec needed: it is in the file
    assert (ckpt.format, ckpt.model_spec, ckpt.metadata["epoch"]) == ("safetensors", SPEC, "3")
    _same(loaded, model, batch[0])


def test_foreign_safetensors_needs_a_spec(tmp_path, model, batch):
    path = tmp_path / "foreign.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(InputError) as excinfo:
        load_model(path)
    error_message(
        excinfo, "foreign.safetensors", "holds only weights", "`model`", "mlp, cnn, resnet18"
    )
    loaded, ckpt = load_model(path, SPEC)
    assert (ckpt.model_spec, ckpt.stripped_prefix) == (None, "model.")
    _same(loaded, model, batch[0])


class Tied(nn.Module):
    """Two names for one Linear layer, and a weight stored transposed (non-contiguous)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = self.encoder
        self.proj = nn.Parameter(torch.randn(3, 4).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)) @ self.proj


def test_tied_and_non_contiguous_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(checkpoints.BUILTIN_MODELS, "tied", Tied)
    torch.manual_seed(0)
    model, x = Tied(), torch.randn(2, 4)
    path = tmp_path / "tied.safetensors"
    save_checkpoint(path, model, ModelSpec("tied"))
    loaded, _ = load_model(path)
    _same(loaded, model, x)
    # a file that stores a tied weight once (as safetensors.torch.save_model writes) loads too
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("enc")}
    save_file({**state, "proj": model.proj.detach().contiguous()}, str(tmp_path / "once.st"))
    loaded, _ = load_model(tmp_path / "once.st", ModelSpec("tied"))
    _same(loaded, model, x)


# --- detection by content -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, batch) -> dict[str, Path]:
    """One file per format, each under a misleading suffix."""
    root = tmp_path_factory.mktemp("formats")
    paths = {
        "safetensors": root / "safetensors.pt",
        "torch.save": root / "zip.safetensors",
        "legacy": root / "legacy.pt2",
        "torchscript": root / "script.safetensors",
        "export": root / "exported.pth",
    }
    save_checkpoint(paths["safetensors"], model, SPEC)
    torch.save(model.state_dict(), paths["torch.save"])
    torch.save(model.state_dict(), paths["legacy"], _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(model), paths["torchscript"])
    torch.export.save(torch.export.export(model, (batch[0],)), paths["export"])
    return paths


@pytest.mark.parametrize(
    ("kind", "container", "fmt"),
    [
        ("safetensors", "safetensors", "safetensors"),
        ("torch.save", "torch.save", "state_dict"),
        ("legacy", "torch.save", "state_dict"),
        ("torchscript", "torchscript", "torchscript"),
        ("export", "export", "export"),
    ],
)
def test_format_from_content_not_suffix(files, model, batch, kind, container, fmt):
    assert detect_format(files[kind]) == container
    loaded, ckpt = load_model(files[kind], SPEC, trust_code=kind == "torchscript")
    assert ckpt.format == fmt and fmt in FORMATS
    _same(loaded, model, batch[0])


# --- whole modules and the curvature engine ------------------------------------------------------


def _hvp(
    module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], backend: str = "double-backward"
) -> torch.Tensor:
    op = HessianOperator(Objective(module, F.cross_entropy, [batch]), backend=backend)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(2))
    return op.matvec(v)


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_hessian_matches_eager(tmp_path, model, batch, kind):
    path = tmp_path / "model.pt"
    compiled = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, batch[0])
    torch.jit.save(compiled, path)
    loaded, ckpt = load_model(path, ModelSpec("ignored-for-whole-modules"), trust_code=True)
    assert ckpt.format == "torchscript" and ckpt.state_dict is None
    torch.testing.assert_close(_hvp(loaded, batch), _hvp(model, batch), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)  # a ReLU model: finite differences refuse it
def test_export_hessian_matches_eager_and_modes_switch(files, model, batch, backend):
    loaded, ckpt = load_model(files["export"])
    assert ckpt.format == "export"
    expected = _hvp(model, batch, backend)
    torch.testing.assert_close(_hvp(loaded, batch, backend), expected, rtol=1e-6, atol=1e-7)
    loaded.train()
    with curvature_mode(loaded):
        assert not any(m.training for m in loaded.modules())
    assert all(m.training for m in loaded.modules())


def test_export_static_shape_is_explained(files, batch):
    loaded, _ = load_model(files["export"])
    with pytest.raises(InputError) as excinfo:
        _hvp(loaded, (batch[0][:4], batch[1][:4]))
    error_message(
        excinfo, "exported for inputs of shape [6, 1, 8, 8]", "[4, 1, 8, 8]", "dynamic_shapes"
    )


def test_export_with_dynamic_batch(tmp_path, model, batch):
    dims = ({0: torch.export.Dim("batch")},)
    program = torch.export.export(model, (batch[0],), dynamic_shapes=dims)
    torch.export.save(program, tmp_path / "dynamic.pt2")
    loaded, _ = load_model(tmp_path / "dynamic.pt2")
    small = (batch[0][:4], batch[1][:4])
    torch.testing.assert_close(_hvp(loaded, small), _hvp(model, small), rtol=1e-6, atol=1e-7)


def _training_copy(model: nn.Module) -> nn.Module:
    train = _model()
    train.load_state_dict(model.state_dict())
    return train.train()


def test_graphs_fixed_in_training_mode_are_refused(tmp_path, model, batch):
    train = _training_copy(model)
    torch.jit.save(torch.jit.trace(train, batch[0], check_trace=False), tmp_path / "trace.pt")
    torch.export.save(torch.export.export(train, (batch[0],)), tmp_path / "train.pt2")
    for name, how in [("trace.pt", "torch.jit.trace"), ("train.pt2", "torch.export.export")]:
        with pytest.raises(InputError) as excinfo:
            read_checkpoint(tmp_path / name, trust_code=name == "trace.pt")
        error_message(excinfo, name, "training mode", "batch_norm", f"model.eval() before {how}")
    torch.jit.save(torch.jit.script(train), tmp_path / "script.pt")  # mode stays switchable
    assert read_checkpoint(tmp_path / "script.pt", trust_code=True).format == "torchscript"


def test_batchnorm_without_running_statistics_is_not_refused(tmp_path, batch):
    """Such a BatchNorm normalises with batch statistics in every mode: nothing is fixed."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    torch.jit.save(torch.jit.trace(model, batch[0]), tmp_path / "trace.pt")
    torch.export.save(torch.export.export(model, (batch[0],)), tmp_path / "export.pt2")
    assert read_checkpoint(tmp_path / "trace.pt", trust_code=True).format == "torchscript"
    assert read_checkpoint(tmp_path / "export.pt2").format == "export"


def test_pickled_module_needs_trust(tmp_path, model, batch):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(InputError) as excinfo:
        load_model(path)
    error_message(excinfo, "whole.pt", "arbitrary Python objects", "Sequential", "`trust_pickle`")
    loaded, ckpt = load_model(path, trust_pickle=True)
    assert ckpt.format == "module"
    _same(loaded, model, batch[0])
    torch.save({"model": model, "epoch": 1}, tmp_path / "wrapped.pt")
    assert read_checkpoint(tmp_path / "wrapped.pt", trust_pickle=True).format == "module"


def test_pickled_module_of_a_missing_class(tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "gone_net_for_test.py").write_text(
        "from torch import nn\nclass Net(nn.Linear):\n    pass\n", encoding="utf-8"
    )
    sys.path.insert(0, str(folder))
    try:
        from gone_net_for_test import Net  # type: ignore[import-not-found]

        torch.save(Net(2, 2), tmp_path / "net.pt")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("gone_net_for_test", None)
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path / "net.pt", trust_pickle=True)
    error_message(excinfo, "net.pt", "cannot be imported", "gone_net_for_test", "state_dict")


def _rewrite_zip(src: Path, dst: Path, change: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for item in old.infolist():
            tail = item.filename.split("/", 1)[-1]
            new.writestr(item, change.get(tail, old.read(item.filename)))


def test_export_archive_with_pickled_payloads_needs_trust(tmp_path, files):
    with zipfile.ZipFile(files["export"]) as archive:
        name = next(n for n in archive.namelist() if n.endswith("weights_config.json"))
        config = json.loads(archive.read(name))
    next(iter(config["config"].values()))["use_pickle"] = True
    _rewrite_zip(
        files["export"],
        tmp_path / "pickled.pt2",
        {"data/weights/model_weights_config.json": json.dumps(config).encode()},
    )
    buffer = io.BytesIO()
    torch.save(((torch.zeros(1),), {"extra": Path("x")}), buffer)
    _rewrite_zip(
        files["export"], tmp_path / "inputs.pt2", {"data/sample_inputs/model.pt": buffer.getvalue()}
    )
    for name, what in [("pickled.pt2", "pickled 1.weight"), ("inputs.pt2", "PosixPath")]:
        with pytest.raises(InputError) as excinfo:
            read_checkpoint(tmp_path / name)
        error_message(excinfo, name, what, "`trust_pickle`")


# --- errors -------------------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_file_and_directory(tmp_path, model):
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path / "nope.pt")
    error_message(excinfo, "nope.pt", "not found")
    save_checkpoint(tmp_path / "run" / "last.safetensors", model, SPEC)
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path / "run")
    error_message(excinfo, "run", "no config.json", "last.safetensors: pass that file")


@pytest.mark.parametrize(
    ("content", "parts"),
    [
        (b"", ["is empty"]),
        (b"hello, this is text\n" * 4, ["not a checkpoint sharpscope reads"]),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", ["git lfs pull"]),
        (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.", ["not a checkpoint"]),
    ],
)
def test_unreadable_content(tmp_path, content, parts):
    path = _write_bytes(tmp_path / "bad.pt", content)
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(path)
    error_message(excinfo, "bad.pt", *parts)


@pytest.mark.parametrize("kind", ["safetensors", "torch.save", "legacy", "torchscript", "export"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_files(tmp_path, files, kind, keep):
    data = files[kind].read_bytes()
    path = _write_bytes(tmp_path / f"cut{files[kind].suffix}", data[: int(len(data) * keep)])
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(path, trust_code=True)
    error_message(excinfo, path.name)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "data.pt", "w") as archive:
        archive.writestr("inputs.npy", b"123")
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path / "data.pt")
    error_message(excinfo, "data.pt", "zip archive", "data.pkl")


@pytest.mark.parametrize(
    ("obj", "parts"),
    [
        ([torch.zeros(1)], ["holds a list"]),
        ({}, ["empty state dict"]),
        ({"epoch": 1, "weights": {"w": torch.zeros(1)}}, ["entry 'epoch' is a int", "state_dict"]),
    ],
)
def test_not_a_state_dict(tmp_path, obj, parts):
    torch.save(obj, tmp_path / "odd.pt")
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path / "odd.pt")
    error_message(excinfo, "odd.pt", *parts)


def test_malformed_stored_spec(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={SPEC_KEY: "{x"})
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path / "m.safetensors")
    error_message(excinfo, "m.safetensors", SPEC_KEY)


def test_key_and_shape_mismatches_are_named(tmp_path, model):
    state = dict(model.state_dict())
    state["1.weight"] = torch.zeros(3, 1, 3, 3)
    del state["12.bias"]
    state.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    torch.save(state, tmp_path / "off.pt")
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path / "off.pt", SPEC)
    error_message(
        excinfo,
        "does not fit the model cnn(width=2)",
        "missing keys 12.bias",
        "unexpected keys extra.0, extra.1, extra.2, extra.3, extra.4 and 2 more",
        "1.weight is [3, 1, 3, 3] in the file but [2, 1, 3, 3] in the model",
    )


# --- atomic saving ------------------------------------------------------------------------------


def test_failed_save_keeps_the_old_file(tmp_path, model, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, SPEC)
    before = path.read_bytes()

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", half_written)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, model, SPEC)
    monkeypatch.undo()

    sparse = _model()
    sparse.register_buffer("mask", torch.eye(3).to_sparse())
    with pytest.raises(InputError) as excinfo:
        save_checkpoint(path, sparse, SPEC)
    error_message(excinfo, "'mask'", "dense tensors only")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_save_over_a_copy_of_another_format(tmp_path, model, files):
    path = tmp_path / "model.pt"
    shutil.copy(files["torch.save"], path)
    save_checkpoint(path, model, SPEC)
    assert detect_format(path) == "safetensors"


# --- Lightning .ckpt: the network under a LightningModule's attribute ---------------------------


def test_lightning_ckpt_loads_into_the_bare_network(tmp_path, batch):
    pytest.importorskip("lightning")
    from lightning_ckpt import lightning_checkpoint

    torch.manual_seed(5)
    module = lightning_checkpoint(tmp_path / "last.ckpt", [batch, batch], net=build_model(SPEC))
    stored = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "net.1.weight" in stored["state_dict"] and "optimizer_states" in stored
    loaded, ckpt = load_model(tmp_path / "last.ckpt", SPEC)
    assert ckpt.stripped_prefix == "net."
    assert ckpt.metadata["global_step"] == "2"
    _same(loaded, module.net, batch[0])


def test_prefix_fitting_is_exact_and_ambiguity_is_named(tmp_path, model, batch):
    other = build_model(SPEC)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in other.state_dict().items()})
    torch.save({"state_dict": state}, tmp_path / "two.ckpt")
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path / "two.ckpt", SPEC)
    error_message(
        excinfo, "two.ckpt", "under each of the key prefixes ema., model.", "state_prefix"
    )
    for prefix, expected in (("model.", model), ("ema.", other)):
        loaded, ckpt = load_model(tmp_path / "two.ckpt", SPEC, state_prefix=prefix)
        assert ckpt.stripped_prefix == prefix
        _same(loaded, expected, batch[0])

    beside = {f"net.{k}": v for k, v in model.state_dict().items()} | {"loss.weight": torch.ones(3)}
    torch.save({"state_dict": beside}, tmp_path / "beside.ckpt")
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path / "beside.ckpt", SPEC)
    error_message(excinfo, "under the key prefix net. beside other weights (loss.weight)")
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path / "beside.ckpt", SPEC, state_prefix="teacher.")
    error_message(excinfo, "`state_prefix` 'teacher.'", "names start with loss., net.")

    partial = {f"net.{k}": v for k, v in model.state_dict().items() if k != "12.bias"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(InputError) as excinfo:  # no prefix fits: the key check names the rest
        load_model(tmp_path / "partial.pt", SPEC)
    error_message(excinfo, "does not fit the model", "missing keys 1.weight")

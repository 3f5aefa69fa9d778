"""Hugging Face transformers through the CLI: tiny BERT, GPT-2 and ViT models built from configs
(tests/tiny_hf.py), data in every layout sharpscope reads, against dense float64 Hessians.

The truth is ``torch.autograd.functional.hessian`` (autograd double backward, row by row) under
torch's math attention kernel; never ``torch.func``, whose second derivatives are wrong through
BERT on this torch (``test_forward_over_reverse_is_refused_where_wrong``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_hf
import torch
from safetensors.torch import save_file
from tiny_hf_truth import L, N, bert_truth, dense, hessian, token_data
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.curvature import HessianOperator, Objective, SolveSettings, lanczos, select_params
from sharpscope.io.data import load_data
from sharpscope.io.losses import loss_name, resolve_loss

RUNNER = CliRunner()
FACTORIES = tiny_hf.__file__
EXACT = ["--dtype", "float64", "--tol", "1e-10", "--samples", "0", "--no-trace", "--top-k", "5"]


def analyze(tmp_path: Path, model: torch.nn.Module, factory: str, data: str, *extra: str) -> dict:
    """``sharpscope analyze`` on ``model``'s weights (built by ``factory``); the JSON report."""
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "report"
    args = ["analyze", str(checkpoint), "--model", f"{FACTORIES}:{factory}", "--data", data]
    result = RUNNER.invoke(app, [*args, *EXACT, "--out", str(out), *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "report.json").read_text())


def assert_spectrum(report: dict, truth: torch.Tensor) -> None:
    """Top-5 and λ_min of the report equal the dense Hessian's to 1e-8 relative."""
    scale = float(truth.abs().max())
    top = report["results"]["eigenvalues"]["values"]
    assert top == pytest.approx(truth.flip(0)[:5].tolist(), rel=1e-8, abs=1e-8 * scale)
    lowest = report["results"]["lambda_min"]["value"]
    assert lowest == pytest.approx(float(truth[0]), rel=1e-8, abs=1e-8 * scale)


# --- data layouts ------------------------------------------------------------------------------


def _write_layout(layout: str, folder: Path) -> str:
    """The BERT data of :func:`token_data` written in ``layout``; its data spec."""
    data = token_data()
    if layout == "pt":
        torch.save(data, folder / "d.pt")
        return str(folder / "d.pt")
    if layout == "safetensors":
        save_file(data, folder / "d.safetensors")
        return str(folder / "d.safetensors")
    if layout == "npz":
        np.savez(folder / "d.npz", **{k: v.numpy() for k, v in data.items()})
        return str(folder / "d.npz")
    torch.save(data, folder / "tensors.pt")
    (folder / "hfdata.py").write_text(DATA_FUNCTIONS.replace("TENSORS", str(folder / "tensors.pt")))
    return f"{folder / 'hfdata.py'}:{layout}"


DATA_FUNCTIONS = """
import torch
from torch.utils.data import DataLoader

D = torch.load("TENSORS")

class Items(torch.utils.data.Dataset):
    def __init__(self, item):
        self.item = item
    def __len__(self):
        return len(D["labels"])
    def __getitem__(self, i):
        return self.item(i)

def dict_items():
    return Items(lambda i: {k: v[i] for k, v in D.items()} | {"text": "a sentence"})

def tuple_items():
    return Items(lambda i: ((D["input_ids"][i], D["attention_mask"][i]), D["labels"][i]))

def loader():
    return DataLoader(dict_items(), batch_size=5)
"""


@pytest.mark.parametrize("layout", ["pt", "safetensors", "npz", "dict_items", "loader"])
def test_bert_in_every_layout_matches_the_dense_hessian(tmp_path, layout):
    report = analyze(tmp_path, tiny_hf.bert(), "bert", _write_layout(layout, tmp_path))
    assert report["inputs"]["loss"] == "cross-entropy"  # auto, for a sequence classifier
    assert report["results"]["num_samples"] == N
    assert_spectrum(report, bert_truth())


def test_per_layer_blocks_by_kind_match_the_dense_diagonal_blocks(tmp_path):
    """Each group's top eigenvalue is that of its diagonal block of the dense Hessian."""
    data = token_data()
    inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
    model = tiny_hf.bert()
    full = hessian(model, "cross-entropy", inputs, data["labels"])
    space = select_params(model)
    starts = np.cumsum([0, *space.numels[:-1]])
    spans = zip(space.names, starts, space.numels, strict=True)
    where = {name: range(start, start + size) for name, start, size in spans}
    spec = _write_layout("pt", tmp_path)
    layers = analyze(tmp_path, tiny_hf.bert(), "bert", spec, "--per-layer")["results"]["per_layer"]
    block = "bert.encoder.layer.0"
    assert [layer["name"] for layer in layers] == [
        "embeddings",
        "norm",
        *(f"{block} · attention.{kind}" for kind in "qkvo"),
        f"{block} · norm",
        f"{block} · mlp",
        "head",
    ]
    assert sorted(n for layer in layers for n in layer["parameters"]) == sorted(space.names)
    for layer in layers:
        rows = [i for name in layer["parameters"] for i in where[name]]
        top = float(torch.linalg.eigvalsh(full[rows][:, rows])[-1])
        assert layer["size"] == len(rows)
        assert layer["eigenvalue"] == pytest.approx(top, rel=1e-8), layer["name"]
    kinds = {layer["name"]: (layer.get("kind"), layer["module_type"]) for layer in layers}
    assert kinds[f"{block} · attention.q"] == ("attention.q", "Linear")
    assert kinds["head"] == ("head", "Linear")


def test_exclude_leaves_the_word_embeddings_out(tmp_path):
    spec = _write_layout("pt", tmp_path)
    results = analyze(tmp_path, tiny_hf.bert(), "bert", spec, "--exclude", "*word_embeddings*")[
        "results"
    ]
    names = [name for name, _ in tiny_hf.bert().named_parameters()]
    assert [p["name"] for p in results["parameters"]] == names[1:]
    assert results["num_params"] == bert_truth().numel() - tiny_hf.VOCAB * tiny_hf.WIDTH


def test_nested_tuple_items_are_positional_inputs(tmp_path):
    """Items ``((ids, mask), label)`` call ``model(ids, mask)``: the same Hessian as by name."""
    spec = _write_layout("tuple_items", tmp_path)
    bundle = load_data(spec)
    assert [t.shape for t in bundle.inputs] == [(N, L), (N, L)]
    assert bundle.inputs[0].dtype == torch.int64
    assert_spectrum(analyze(tmp_path, tiny_hf.bert(), "bert", spec), bert_truth())


def test_eager_and_sdpa_attention_agree(tmp_path):
    spec = _write_layout("pt", tmp_path)
    eager = analyze(
        tmp_path, tiny_hf.bert(), "bert", spec, "--model-arg", "attn_implementation='eager'"
    )
    assert_spectrum(eager, bert_truth())


# --- language models: token-weighted losses ---------------------------------------------------


def lm_data() -> dict[str, torch.Tensor]:
    """Sequences without labels: the language-modelling labels are the ids, padding ignored."""
    data = token_data(seed=2)
    return {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}


def test_causal_lm_loss_is_the_models_own():
    model = tiny_hf.gpt2().double().eval()
    data = lm_data()
    labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    assert loss_name("auto", model) == "causal-lm"
    with torch.no_grad():
        ours = resolve_loss("causal-lm")(model(**data), labels)
        theirs = model(**data, labels=labels).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-7)  # theirs is in float32


def test_masked_lm_loss_is_the_models_own():
    model = tiny_hf.bert_mlm().double().eval()
    data = lm_data()
    labels = torch.full((N, L), -100)
    labels[:, 2] = data["input_ids"][:, 2]
    assert loss_name("auto", model) == "masked-lm"
    with torch.no_grad():
        ours = resolve_loss("masked-lm")(model(**data), labels)
        theirs = model(**data, labels=labels).loss
    assert float(ours) == pytest.approx(float(theirs), rel=1e-12)


def test_causal_lm_hessian_is_token_weighted_and_split_invariant(tmp_path):
    """Batches of 5 and of 4 sequences hold different numbers of predicted tokens; both give the
    Hessian of the mean over all predicted tokens (the whole data as one batch)."""
    torch.save(lm_data(), tmp_path / "lm.pt")
    spec = str(tmp_path / "lm.pt")
    data = lm_data()
    labels = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    truth = dense(tiny_hf.gpt2(), "causal-lm", data, labels)
    for size in ("5", "4"):
        report = analyze(tmp_path, tiny_hf.gpt2(), "gpt2", spec, "--batch-size", size)
        assert report["inputs"]["loss"] == "causal-lm"
        assert_spectrum(report, truth)


def test_vision_transformer_on_pixel_values(tmp_path):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(N, 1, 8, 8, generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    torch.save({"pixel_values": pixels, "labels": labels}, tmp_path / "images.pt")
    truth = dense(tiny_hf.vit(), "cross-entropy", {"pixel_values": pixels.double()}, labels)
    report = analyze(tmp_path, tiny_hf.vit(), "vit", str(tmp_path / "images.pt"))
    assert_spectrum(report, truth)


# --- backends ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "bert_mlm", "gpt2", "vit"])
def test_forward_over_reverse_agrees_with_double_backward(name):
    """torch.func's product equals double backward's on all four, BERT's included: its padding
    row, which autograd holds constant, is held for forward-over-reverse too (it was 7e-2 off
    through that row, and refused, before)."""
    model = getattr(tiny_hf, name)().double().eval()
    if name == "vit":
        inputs: dict[str, Any] = {"pixel_values": torch.randn(N, 1, 8, 8, dtype=torch.float64)}
        targets = torch.randint(0, 3, (N,))
    else:
        inputs = lm_data()
        targets = (
            inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            if name != "bert"
            else token_data()["labels"]
        )
    loss = resolve_loss(loss_name("auto", model))
    exact = HessianOperator(Objective(model, loss, [(inputs, targets)]))
    functional = HessianOperator(
        Objective(model, loss, [(inputs, targets)]), backend="forward-over-reverse"
    )
    v = torch.randn(exact.size, dtype=torch.float64)
    truth = exact.matvec(v)
    assert torch.allclose(functional.matvec(v), truth, rtol=1e-12, atol=1e-12)


def test_bottom_two_by_the_api():
    data = token_data()
    inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
    model = tiny_hf.bert().double().eval()
    op = HessianOperator(
        Objective(model, resolve_loss("cross-entropy"), [(inputs, data["labels"])])
    )
    bottom = lanczos(op, 2, which="smallest", settings=SolveSettings(tol=1e-10, max_iter=400))
    truth = bert_truth()
    assert bottom.eigenvalues.tolist() == pytest.approx(truth[:2].tolist(), rel=1e-8)


# --- bad input ---------------------------------------------------------------------------------


def run_error(tmp_path: Path, data: dict[str, Any], factory: str = "bert", *extra: str) -> str:
    """The one stderr line and exit code 2 of analyze on ``data``."""
    torch.save(data, tmp_path / "bad.pt")
    checkpoint = tmp_path / "weights.pt"
    torch.save(getattr(tiny_hf, factory)().state_dict(), checkpoint)
    args = ["analyze", str(checkpoint), "--model", f"{FACTORIES}:{factory}"]
    result = RUNNER.invoke(app, [*args, "--data", str(tmp_path / "bad.pt"), *extra])
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_fields_of_different_lengths(tmp_path):
    data = token_data()
    data["attention_mask"] = data["attention_mask"][:10]
    message = run_error(tmp_path, data)
    assert "input fields hold different numbers of samples" in message
    assert "input_ids 12, attention_mask 10" in message


def test_labels_beyond_the_classifier(tmp_path):
    data = token_data()
    data["labels"][0] = 5
    assert "go up to 5 but the model has 3 outputs" in run_error(tmp_path, data)


def test_sequences_longer_than_the_positions(tmp_path):
    data = token_data()
    data["input_ids"] = torch.randint(0, tiny_hf.VOCAB, (N, 20))
    data["attention_mask"] = torch.ones(N, 20, dtype=torch.int64)
    message = run_error(tmp_path, data)
    assert "sequences of 20 tokens but the model has 12 positions" in message


def test_token_ids_beyond_the_vocabulary_name_the_model(tmp_path):
    message = run_error(tmp_path, {"input_ids": torch.full((N, L), 99)}, "gpt2")
    assert "the model cannot run on input fields input_ids (12, 7)" in message


def test_pixel_values_without_labels(tmp_path):
    message = run_error(tmp_path, {"pixel_values": torch.zeros(N, 1, 8, 8)}, "vit")
    assert "has pixel_values but no labels; add a 'labels' field" in message


def test_a_sequence_loss_on_a_classifier(tmp_path):
    message = run_error(tmp_path, token_data(), "bert", "--loss", "causal-lm")
    assert "causal-lm needs logits (batch, tokens, vocabulary)" in message

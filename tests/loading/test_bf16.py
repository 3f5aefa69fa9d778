"""bfloat16 checkpoints (issue 23, item 2): analysed in float32 unless bfloat16 is asked, and the
report says the stored precision beside the analysis precision."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from tiny_cli import FAST
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.io.checkpoints import load_model, read_checkpoint, save_checkpoint
from sharpscope.io.models import ModelSpec, build_model
from sharpscope.io.state_dicts import stored_dtype
from sharpscope.report.document import Report
from sharpscope.report.table import print_report


@pytest.fixture
def bf16_checkpoint(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": (16,)})
    path = tmp_path / "bf16.safetensors"
    save_checkpoint(path, build_model(spec).to(torch.bfloat16), spec)
    return path


def _report(checkpoint, *options: str) -> dict:
    result = CliRunner().invoke(app, ["analyze", str(checkpoint), *FAST, "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_bf16_state_dict_is_analysed_in_float32_and_says_so(bf16_checkpoint):
    model, _ = load_model(bf16_checkpoint)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # loaded without loss
    document = _report(bf16_checkpoint)
    inputs = document["inputs"]
    assert (inputs["dtype"], inputs["weights_dtype"]) == ("float32", "bfloat16")
    assert document["results"]["product_error"]["dtype"] == "float32"
    console = Console(record=True, width=200)
    print_report(Report.from_json(document), console)
    assert "weights stored in bfloat16, products in float32" in console.export_text()


def test_bf16_products_only_when_asked_with_their_error_in_the_bounds(bf16_checkpoint):
    document = _report(bf16_checkpoint, "--dtype", "bfloat16")
    results = document["results"]
    assert document["inputs"]["dtype"] == document["inputs"]["weights_dtype"] == "bfloat16"
    error = results["product_error"]
    assert error["dtype"] == "bfloat16" and error["method"] == "float64"
    assert error["relative"] > 1e-4  # bfloat16 rounding, measured against float64
    assert results["eigenvalues"]["bounds"][0] >= error["absolute"]
    assert any("bfloat16 products" in note for note in results["notes"])
    assert any("Lanczos cannot converge past" in note for note in results["notes"])


def test_the_stored_precision_of_a_pretrained_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=8, n_layer=1, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(tmp_path)
    assert stored_dtype(read_checkpoint(tmp_path).state_dict) == "bfloat16"
    model, _ = load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_stored_dtype_of_mixed_and_empty_states():
    assert stored_dtype({"a": torch.zeros(1), "b": torch.zeros(1, dtype=torch.float64)}) == "mixed"
    assert stored_dtype({"steps": torch.zeros(1, dtype=torch.int64)}) is None

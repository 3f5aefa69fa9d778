"""The report document, its schema, and what renders from it."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
from rich.console import Console

from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.io.eigenvectors import load_eigenvectors
from sharpscope.report.json_report import SCHEMA_VERSION, build_report, dumps, report_schema
from sharpscope.report.outdir import write_out_dir
from sharpscope.report.table import render

INPUTS = {
    "checkpoint": {"path": "model.pt", "sha256": "0" * 64, "format": "state_dict"},
    "model": {"spec": None},
    "data": {
        "spec": "inline",
        "source": "random",
        "split": "train",
        "num_samples": 48,
        "batch_size": 16,
        "seed": 0,
    },
    "loss": "cross-entropy",
    "dtype": "float64",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def analysed(cnn):
    config = AnalyzeConfig(k=3, density=True, per_layer=True, slices=True, density_iter=20)
    result = analyze(cnn.model, cnn.loss_fn, cnn.split(16), config)
    return result, build_report(result, {**INPUTS, "config": dict(config.__dict__)})


def test_report_validates_against_its_schema(analysed):
    _, report = analysed
    document = json.loads(dumps(report))
    jsonschema.validate(document, report_schema())
    assert document["schema_version"] == SCHEMA_VERSION
    results = document["results"]
    assert len(results["eigenvalues"]["values"]) == 3
    assert results["lambda_max"] == results["eigenvalues"]["values"][0]
    assert results["lambda_max_over_trace"] == pytest.approx(
        results["lambda_max"] / results["trace"]["estimate"]
    )
    assert {layer["name"] for layer in results["per_layer"]} == {"conv", "bn", "fc"}
    assert set(results["slices"]) == {"v1", "gradient"}


def test_schema_rejects_a_broken_report(analysed):
    _, report = analysed
    broken = json.loads(dumps(report))
    del broken["results"]["eigenvalues"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, report_schema())


def test_non_finite_numbers_are_written_as_null():
    text = dumps({"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})
    assert json.loads(text) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


def test_table_shows_figures_and_verdict(analysed):
    result, report = analysed
    console = Console(record=True, width=120)
    console.print(render(report))
    text = console.export_text()
    assert f"{result.lambda_max:.6g}" in text
    assert report["results"]["verdict"] in text.replace("\n", " ")
    assert "Per-layer" in text and "SAM alignment" in text


def test_out_dir_files(analysed, cnn, tmp_path):
    result, report = analysed
    written = write_out_dir(tmp_path, report, result, cnn.model)
    names = {p.name for p in written}
    assert names == {
        "report.json",
        "eigenvectors.safetensors",
        "density.png",
        "convergence.png",
        "loss_slices.png",
    }
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(dumps(report))
    values, vectors = load_eigenvectors(tmp_path / "eigenvectors.safetensors")
    assert values == pytest.approx(result.top.eigenvalues.tolist())
    flat = torch.cat([t.reshape(-1) for t in vectors[0].values()])
    torch.testing.assert_close(flat, result.top.eigenvectors[0])
    assert list(vectors[0]) == [n for n, _ in cnn.model.named_parameters()]
    assert not list(tmp_path.glob(".*.tmp"))

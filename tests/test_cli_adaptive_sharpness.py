"""``analyze --adaptive-sharpness`` and ``check --max-adaptive-sharpness`` end to end: the figure
in the table and the JSON report, the gate on its interval, and bad values as one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_check import FAST, check, make_checkpoint, one_error_line, verdict, write
from test_check import isolated as isolated
from torch.nn import functional as F
from typer.testing import CliRunner

from sharpscope.analysis.adaptive_sharpness import AdaptiveSharpnessSettings, adaptive_sharpness
from sharpscope.cli.app import app
from sharpscope.cli.loading import load_inputs
from sharpscope.report.schema import report_schema

WORST = ["--adaptive-sharpness", "worst", "--adaptive-rho", "0.2", "--adaptive-steps", "5"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("adaptive"))
    result = CliRunner().invoke(app, ["analyze", str(checkpoint), *FAST, *WORST, "--json"])
    assert result.exit_code == 0, result.output
    return checkpoint, json.loads(result.stdout)


def test_analyze_reports_the_library_figure_with_its_interval(made):
    checkpoint, report = made
    jsonschema.validate(report, report_schema())
    figure = report["results"]["adaptive_sharpness"]
    assert (figure["kind"], figure["norm"], figure["adaptive"]) == ("worst", "l2", True)
    assert figure["rho"] == 0.2 and figure["n_gradients"] == 5 and figure["std_error"] is None
    low, high = figure["interval"]
    assert low < figure["value"] < high and figure["shards"] == 8
    loaded = load_inputs(checkpoint, "digits", samples=64, seed=0)
    expected = adaptive_sharpness(
        loaded.model, F.cross_entropy, loaded.batches, AdaptiveSharpnessSettings(rho=0.2, steps=5)
    )
    assert figure["value"] == pytest.approx(expected.value, rel=1e-5)
    assert figure["value"] > 0


def test_the_table_shows_it(made):
    checkpoint, _ = made
    args = ["analyze", str(checkpoint), *FAST, "--adaptive-sharpness", "average"]
    result = CliRunner().invoke(app, [*args, "--adaptive-steps", "4", "--no-adaptive-scale"])
    assert result.exit_code == 0, result.output
    assert "Sharpness (average case, plain ℓ2, ρ = 0.1)" in result.stdout
    assert "Monte-Carlo SE" in result.stdout and "(4 draws)" in result.stdout


def _saved(report: dict[str, Any], folder: Path, **figure: float) -> Path:
    edited = copy.deepcopy(report)
    edited["results"]["adaptive_sharpness"].update(figure)
    return write(folder / "report.json", edited)


@pytest.mark.parametrize(
    ("limit", "code", "status"), [(2.0, 0, "pass"), (0.7, 0, "noise"), (0.3, 1, "fail")]
)
def test_check_gates_on_the_interval(made, tmp_path, limit, code, status):
    """value 1 ± (2 × 0.1 Monte-Carlo + 2 × 0.2 data): flagged only below 0.4."""
    saved = _saved(made[1], tmp_path, value=1.0, std_error=0.1, sampling=0.2)
    result = check(saved, "--max-adaptive-sharpness", limit, "--json")
    assert result.exit_code == code, result.output
    (found,) = verdict(result)["checks"]
    assert found["status"] == status and found["uncertainty"] == pytest.approx(0.6)


def test_check_measures_it_on_a_checkpoint(made):
    checkpoint, report = made
    value = report["results"]["adaptive_sharpness"]["value"]
    result = check(checkpoint, *FAST, *WORST, "--max-adaptive-sharpness", 10 * value, "--json")
    assert result.exit_code == 0, result.output
    assert verdict(result)["checks"][0]["metric"] == "adaptive_sharpness"


def test_a_report_without_it_names_the_option(tmp_path, made):
    edited = copy.deepcopy(made[1])
    del edited["results"]["adaptive_sharpness"]
    result = check(write(tmp_path / "r.json", edited), "--max-adaptive-sharpness", 1)
    one_error_line(result, "--max-adaptive-sharpness", "--adaptive-sharpness")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--adaptive-sharpness", "best"], ["--adaptive-sharpness", "best"]),
        (["--adaptive-sharpness", "worst", "--adaptive-norm", "l1"], ["--adaptive-norm"]),
        (["--adaptive-sharpness", "worst", "--adaptive-rho", "0"], ["--adaptive-rho"]),
        (["--adaptive-sharpness", "worst", "--adaptive-steps", "0"], ["--adaptive-steps"]),
    ],
)
def test_bad_values_are_one_line_errors(made, args, words):
    checkpoint, _ = made
    result = CliRunner().invoke(app, ["analyze", str(checkpoint), *FAST, *args])
    one_error_line(result, *words)


def test_check_refuses_a_limit_it_would_not_measure_before_analyzing(made):
    result = check(made[0], *FAST, "--max-adaptive-sharpness", 1)
    one_error_line(result, "--max-adaptive-sharpness", "--adaptive-sharpness worst")

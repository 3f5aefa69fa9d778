"""``analyze --adaptive-sharpness`` and ``check --max-adaptive-sharpness`` end to end: the figure
in the table and the JSON report, the gate on its interval, and bad values as one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_check import check, verdict, write
from test_check import isolated as isolated
from tiny_cli import FAST, make_checkpoint, one_error_line
from torch.nn import functional as F
from typer.testing import CliRunner

from sharpscope.analysis.adaptive_sharpness import AdaptiveSharpnessSettings, adaptive_sharpness
from sharpscope.cli.app import app
from sharpscope.cli.loading import load_inputs
from sharpscope.curvature import Objective
from sharpscope.io.load_spec import LoadSpec
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
    loaded = load_inputs(LoadSpec(checkpoint, "digits", samples=64, seed=0))
    objective = Objective(loaded.model, F.cross_entropy, loaded.batches)
    expected = adaptive_sharpness(objective, AdaptiveSharpnessSettings(rho=0.2, steps=5))
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
    ("limit", "sigmas", "code", "status"),
    [
        (2.0, 0, 0, "pass"),
        (0.85, 0, 0, "noise"),
        (0.7, 0, 1, "fail"),
        (0.7, 2, 0, "noise"),
        (0.3, 2, 1, "fail"),
    ],
)
def test_check_gates_on_the_interval(made, tmp_path, limit, sigmas, code, status):
    """value 1 ± 2 × 0.1 Monte-Carlo: flagged below 0.8; with `--sigmas 2`, ± 2 × 0.2 data
    more: flagged only below 0.4."""
    saved = _saved(made[1], tmp_path, value=1.0, std_error=0.1, sampling=0.2)
    result = check(saved, "--max-adaptive-sharpness", limit, "--sigmas", sigmas, "--json")
    assert result.exit_code == code, result.output
    (found,) = verdict(result)["checks"]
    expected = 0.2 + sigmas * 0.2
    assert found["status"] == status and found["uncertainty"] == pytest.approx(expected)


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


def _pair(report: dict[str, Any], folder: Path, base: dict, mine: dict) -> tuple[Path, Path]:
    """The report as a baseline and as the report to check, each section edited."""
    for name in ("base", "mine"):
        (folder / name).mkdir()
    return _saved(report, folder / "base", **base), _saved(report, folder / "mine", **mine)


@pytest.mark.parametrize(("value", "code", "status"), [(1.5, 0, "noise"), (1.6, 1, "fail")])
def test_max_increase_compares_it_with_the_baseline(made, tmp_path, value, code, status):
    """Baseline 1 ± 2 × 0.2 Monte-Carlo: B = 1.4, flagged above B + 10 % = 1.54 (its data SE
    is the spread's, not counted without `--sigmas`)."""
    base = {"value": 1.0, "std_error": 0.2, "sampling": 0.1}
    baseline, mine = _pair(made[1], tmp_path, base, {"value": value, "sampling": None})
    result = check(mine, "--baseline", baseline, "--max-increase", "10%", "--json")
    assert result.exit_code == code, result.output
    found = {c["metric"]: c for c in verdict(result)["checks"]}
    assert found.keys() >= {"lambda_max", "adaptive_sharpness"}
    figure = found["adaptive_sharpness"]
    assert (figure["kind"], figure["status"], figure["baseline"]) == ("max-increase", status, 1.0)
    assert figure["limit"] == pytest.approx(1.1) and figure["uncertainty"] is None


@pytest.mark.parametrize(
    ("field", "base", "mine", "words"),
    [
        ("rho", 0.2, 0.1, "--adaptive-rho 0.2 vs 0.1"),
        ("kind", "worst", "average", "--adaptive-sharpness worst vs average"),
        ("norm", "l2", "linf", "--adaptive-norm l2 vs linf"),
        ("steps", 5, 20, "--adaptive-steps 5 vs 20"),
        ("adaptive", True, False, "--no-adaptive-scale on vs off"),
    ],
)
def test_a_baseline_measured_with_other_settings_is_refused(
    made, tmp_path, field, base, mine, words
):
    baseline, report = _pair(made[1], tmp_path, {field: base}, {field: mine})
    run = [report, "--baseline", baseline, "--max-increase", "10%"]
    one_error_line(check(*run), "measured on other data", words, "--allow-different-data")
    allowed = check(*run, "--allow-different-data", "--json")
    assert any(c["metric"] == "adaptive_sharpness" for c in verdict(allowed)["checks"])
    assert words in allowed.stderr


def test_only_a_baseline_with_the_figure_compares_it(made, tmp_path):
    without = copy.deepcopy(made[1])
    del without["results"]["adaptive_sharpness"]
    (tmp_path / "w").mkdir()
    bare, full = write(tmp_path / "w" / "bare.json", without), _saved(made[1], tmp_path)
    result = check(full, "--baseline", bare, "--max-increase", "10%", "--json")
    assert "adaptive_sharpness" not in {c["metric"] for c in verdict(result)["checks"]}
    missing = check(bare, "--baseline", full, "--max-increase", "10%")
    one_error_line(missing, "--max-increase", "adaptive sharpness", "--adaptive-sharpness")


def test_check_measures_it_against_a_baseline_it_wrote(made, tmp_path):
    checkpoint, _ = made
    baseline = tmp_path / "base.json"
    run = [checkpoint, *FAST, *WORST, "--baseline", baseline]
    assert check(*run, "--update-baseline").exit_code == 0
    result = check(*run, "--max-increase", "10%", "--json")
    found = {c["metric"]: c["status"] for c in verdict(result)["checks"]}
    assert result.exit_code == 0 and found["adaptive_sharpness"] == "pass", result.output
    other = check(*run, "--adaptive-rho", "0.1", "--max-increase", "10%")
    one_error_line(other, "--adaptive-rho 0.2 vs 0.1")

"""``sharpscope check``, the CI gate, through the command line: mostly on saved, edited reports."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tiny_cli import FAST, one_error_line
from typer.testing import CliRunner, Result

from sharpscope.analysis.intervals import jackknife_se
from sharpscope.cli.app import app
from sharpscope.report.schema import report_schema, schema_problem


def check(*args: Any, env: dict[str, str] | None = None) -> Result:
    """``sharpscope check ARGS`` in this process."""
    return CliRunner().invoke(app, ["check", *map(str, args)], env=env)


def write(path: Path, report: dict[str, Any]) -> Path:
    path.write_text(json.dumps(report), encoding="utf-8")
    return path


def verdict(result: Result) -> dict[str, Any]:
    """The ``--json`` result of a run."""
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


@pytest.fixture
def report(tiny_analysis: tuple[Path, dict[str, Any]]) -> dict[str, Any]:
    """A fresh copy of the analysis report, to edit."""
    return copy.deepcopy(tiny_analysis[1])


@pytest.fixture
def saved(report: dict[str, Any], tmp_path: Path) -> Path:
    return write(tmp_path / "report.json", report)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty repository folder (no config file) and outside GitHub Actions."""
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def test_every_check_passes(report, saved):
    results = report["results"]
    result = check(
        saved,
        "--max-eigenvalue", 2 * results["lambda_max"],
        "--min-eigenvalue", results["lambda_min"]["value"] - 1,
        "--max-trace", 2 * results["trace"]["estimate"],
        "--max-sam-sharpness", 1,
        "--min-alignment", 0,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for label in ("λ_max", "λ_min", "trace", "SAM sharpness", "|cos(ĝ_B, v₁)|"):
        assert label in result.stdout
    assert "PASS: 5 of 5 checks passed" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("option", "figure", "direction"),
    [
        ("--max-eigenvalue", lambda r: r["lambda_max"], "max"),
        ("--min-eigenvalue", lambda r: r["lambda_min"]["value"], "min"),
        ("--max-trace", lambda r: r["trace"]["estimate"], "max"),
        ("--max-sam-sharpness", lambda r: r["alignment"]["sam_sharpness"], "max"),
        ("--min-alignment", lambda r: r["alignment"]["cos_batches"]["mean"], "min"),
    ],
)
def test_each_threshold_flags_the_model(report, saved, option, figure, direction):
    value = figure(report["results"])
    beyond = 1 + 10 * abs(value)  # past every margin: the solver's, the data's and the bias
    past = value - beyond if direction == "max" else value + beyond
    result = check(saved, option, past)
    assert result.exit_code == 1, result.output
    assert "FAIL: 1 of 1 checks flagged the model" in result.stdout
    within = check(saved, option, value + 1 if direction == "max" else value - 1, "--json")
    assert within.exit_code == 0
    assert verdict(within)["checks"][0]["status"] == "pass"


def scaled(report: dict[str, Any], factor: float) -> dict[str, Any]:
    """The report of a model whose every eigenvalue is ``factor`` times this one's, on the same
    data: the eigenvalues, their residuals and bounds (float32: with the products' error), their
    spread and their per-shard figures."""
    scaled = copy.deepcopy(report)
    results = scaled["results"]
    eig, low = results["eigenvalues"], results["lambda_min"]
    for key in ("values", "residuals", "bounds"):
        if key in eig:
            eig[key] = [factor * v for v in eig[key]]
    results["lambda_max"] = eig["values"][0]
    for key in ("value", "residual", "bound"):
        if key in low:
            low[key] *= factor
    if "product_error" in results:
        results["product_error"]["absolute"] *= factor
    sampling = results["sampling"]
    sampling["eigenvalues"] = [factor * se for se in sampling["eigenvalues"]]
    sampling["lambda_min"] *= factor
    for figure in ("lambda_max", "lambda_min"):
        sampling["replicates"][figure] = [factor * r for r in sampling["replicates"][figure]]
    return scaled


def test_a_doubled_lambda_max_fails_on_64_samples(report, tmp_path):
    """Issue 25: a baseline with every eigenvalue halved passed `--max-increase 10%` "within
    noise" on 64 samples, its data SE as wide as λ_max itself. Measured on the same data, the
    figures differ by far more than the solvers' bounds, with or without the paired spread."""
    assert report["results"]["num_samples"] == 64
    saved = write(tmp_path / "report.json", report)
    base = write(tmp_path / "base.json", scaled(report, 0.5))
    limit = 2 * report["results"]["lambda_max"]
    assert check(saved, "--max-eigenvalue", limit).exit_code == 0
    for increase in ("10%", "0.1"):
        result = check(
            saved,
            "--max-eigenvalue",
            limit,
            "--baseline",
            base,
            "--max-increase",
            increase,
            "--json",
        )
        assert result.exit_code == 1
        statuses = {(c["metric"], c["kind"]): c["status"] for c in verdict(result)["checks"]}
        assert statuses == {
            ("lambda_max", "max"): "pass",
            ("lambda_max", "max-increase"): "fail",
            ("trace", "max-increase"): "pass",
            ("sam_sharpness", "max-increase"): "pass",
        }
    doubled = check(saved, "--baseline", base, "--max-increase", "100%")
    assert doubled.exit_code == 0, doubled.output
    assert "λ_max vs baseline" in doubled.stdout


@pytest.mark.parametrize(("rise", "code"), [(1.15, 1), (1.05, 0)])
def test_a_rise_past_max_increase_fails_and_one_within_passes(report, tmp_path, rise, code):
    base = write(tmp_path / "base.json", report)
    saved = write(tmp_path / "report.json", scaled(report, rise))
    result = check(saved, "--baseline", base, "--max-increase", "10%", "--json")
    assert result.exit_code == code, result.output
    first = verdict(result)["checks"][0]
    assert (first["metric"], first["status"]) == ("lambda_max", "fail" if code else "pass")
    assert first["spread"] is None  # the figures on the data given: the solvers' bounds only
    assert first["uncertainty"] == pytest.approx(bound(report["results"]["eigenvalues"]) * rise)


def test_sigmas_compares_with_the_baseline_on_the_paired_difference(report, tmp_path):
    """With `--sigmas`, a rise is gated on the spread of the difference of the two reports'
    per-shard figures on the same shards, not on each report's own spread."""
    base = write(tmp_path / "base.json", report)
    candidate = scaled(report, 1.3)
    replicates = candidate["results"]["sampling"]["replicates"]
    own = [  # a little of the candidate's own noise, on top of the baseline's scaled
        r + 0.001 * (-1) ** j * report["results"]["lambda_max"]
        for j, r in enumerate(replicates["lambda_max"])
    ]
    replicates["lambda_max"] = own
    saved = write(tmp_path / "report.json", candidate)
    result = check(saved, "--baseline", base, "--max-increase", "10%", "--sigmas", 2, "--json")
    first = verdict(result)["checks"][0]
    theirs = report["results"]["sampling"]["replicates"]["lambda_max"]
    paired = jackknife_se([a - 1.1 * b for a, b in zip(own, theirs, strict=True)])
    assert first["spread"] == pytest.approx(2 * paired)
    unpaired = (1.3**2 + 1) ** 0.5 * report["results"]["sampling"]["eigenvalues"][0]
    assert first["spread"] < 0.5 * 2 * unpaired  # far less than either report's own spread
    assert first["uncertainty"] == pytest.approx(
        first["spread"] + 1.3 * bound(report["results"]["eigenvalues"])
    )
    assert (result.exit_code, first["status"]) == (1, "fail")


def test_sigmas_needs_both_reports_per_shard_figures(report, tmp_path):
    older = copy.deepcopy(report)
    del older["results"]["sampling"]["replicates"]  # a report made before they were stored
    base = write(tmp_path / "base.json", older)
    saved = write(tmp_path / "report.json", report)
    assert check(saved, "--baseline", base, "--max-increase", "10%").exit_code == 0
    result = check(saved, "--baseline", base, "--max-increase", "10%", "--sigmas", 2)
    one_error_line(result, "--sigmas", "the baseline has none", "--update-baseline")
    other = copy.deepcopy(report)
    weights = other["results"]["sampling"]["replicates"]["weights"]
    weights[0], weights[1] = weights[0] + 0.01, weights[1] - 0.01
    base = write(tmp_path / "other.json", other)
    result = check(saved, "--baseline", base, "--max-increase", "10%", "--sigmas", 2)
    one_error_line(result, "--sigmas", "shards differ", "--shards", "--batch-size")


@pytest.fixture(scope="module")
def tight(
    tiny_analysis: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A float64 report whose λ_max is solved to `--tol 1e-8`."""
    checkpoint, _ = tiny_analysis
    args = ["analyze", str(checkpoint), *FAST, "--dtype", "float64", "--tol", "1e-8", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    path = tmp_path_factory.mktemp("tight") / "report.json"
    path.write_text(result.stdout, encoding="utf-8")
    return path


@pytest.mark.parametrize(("ratio", "code"), [(1.001, 1), (0.999, 0)])
def test_a_model_a_tenth_of_a_percent_past_max_eigenvalue_fails(tight, ratio, code):
    results = json.loads(tight.read_text())["results"]
    lam, residual = results["lambda_max"], results["eigenvalues"]["residuals"][0]
    assert residual < 1e-6 * lam  # the bound is far tighter than 0.1 %
    assert results["sampling"]["eigenvalues"][0] > 0.01 * lam  # though the spread is not
    result = check(tight, "--max-eigenvalue", repr(lam / ratio), "--json")
    assert result.exit_code == code, result.output
    assert verdict(result)["checks"][0]["status"] == ("fail" if code else "pass")


def bound(eig: dict[str, Any]) -> float:
    """λ_max's bound, which the gate reads: the residual, plus the products' error below float64."""
    return eig.get("bounds", eig["residuals"])[0]


def set_lambda_max(report: dict[str, Any], value: float, residual: float) -> None:
    """λ_max and its residual, without the data uncertainty (as with ``--shards 0``) and with
    the products' error set to 0 (float32 reports), so that the residual alone is its margin."""
    report["results"]["sampling"] = None
    eig = report["results"]["eigenvalues"]
    report["results"]["lambda_max"] = eig["values"][0] = value
    eig["residuals"][0] = residual
    if "bounds" in eig:
        eig["bounds"][0] = residual


@pytest.mark.parametrize(("excess", "code", "status"), [(0.5, 0, "noise"), (2.0, 1, "fail")])
def test_noise_margin_keeps_a_borderline_estimate_from_flapping(
    report, tmp_path, excess, code, status
):
    residual = 1e-3
    set_lambda_max(report, 1.0 + excess * residual, residual)
    result = check(write(tmp_path / "r.json", report), "--max-eigenvalue", 1.0, "--json")
    assert result.exit_code == code
    (only,) = verdict(result)["checks"]
    assert (only["status"], only["uncertainty"], only["limit"]) == (status, residual, 1.0)


@pytest.mark.parametrize("sigmas", [[], ["--sigmas", "1"]])
def test_the_trace_margin_is_two_standard_errors_of_its_estimate(report, tmp_path, sigmas):
    report["results"]["trace"].update(estimate=10.0 + 1.5 * 0.1, std_error=0.1)
    report["results"]["sampling"]["trace"] = None
    saved = write(tmp_path / "r.json", report)
    assert check(saved, "--max-trace", 10, *sigmas).exit_code == 0  # 2 SE, whatever --sigmas
    report["results"]["trace"].update(estimate=10.0 + 2.5 * 0.1)
    assert check(write(tmp_path / "r.json", report), "--max-trace", 10, *sigmas).exit_code == 1


def test_the_trace_spread_adds_sigmas_times_only_when_asked(report, tmp_path):
    report["results"]["trace"].update(estimate=10.0 + 2.5 * 0.1, std_error=0.05)
    report["results"]["sampling"]["trace"] = 0.05  # 2·0.05 (the estimate's) + sigmas·0.05
    saved = write(tmp_path / "r.json", report)
    assert check(saved, "--max-trace", 10, "--sigmas", 3).exit_code == 0  # 0.25 ≥ 0.25
    for sigmas in ([], ["--sigmas", "2"]):  # 0.1 or 0.2 < 0.25
        result = check(saved, "--max-trace", 10, *sigmas)
        assert result.exit_code == 1, result.output


def test_relative_margin_adds_both_uncertainties(report, tmp_path):
    baseline = copy.deepcopy(report)
    set_lambda_max(baseline, 1.0, 0.01)
    set_lambda_max(report, 1.1 * 1.01 + 0.005, 0.01)  # past 1.1 × (1 + 0.01) by less than 0.01
    base = write(tmp_path / "base.json", baseline)
    result = check(
        write(tmp_path / "r.json", report), "--baseline", base, "--max-increase", "10%", "--json"
    )
    first = verdict(result)["checks"][0]
    assert (first["kind"], first["status"], first["baseline"]) == ("max-increase", "noise", 1.0)
    assert first["limit"] == pytest.approx(1.1)


def test_a_missing_metric_is_an_input_error(report, tmp_path):
    report["results"]["trace"] = None
    result = check(write(tmp_path / "r.json", report), "--max-trace", 10)
    one_error_line(result, "--max-trace", "trace", "--no-trace")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: "{not json", ["not valid JSON", "line 1"]),
        (lambda d: json.dumps([1, 2]), ["not a sharpscope report"]),
        (lambda d: json.dumps({**d, "schema_version": 99}), ["schema_version 99"]),
        (lambda d: json.dumps({**d, "results": {**d["results"], "lambda_max": "big"}}),
         ["results.lambda_max", "not of type 'number'"]),
        (lambda d: json.dumps({**d, "inputs": {}}), ["inputs", "'versions' is a required"]),
    ],
)  # fmt: skip
def test_malformed_reports_are_one_line_errors(report, tmp_path, edit, words):
    bad = tmp_path / "bad.json"
    bad.write_text(edit(report), encoding="utf-8")
    one_error_line(check(bad, "--max-eigenvalue", 1), str(bad), *words)
    base = check(write(tmp_path / "ok.json", report), "--baseline", bad, "--max-increase", "1%")
    one_error_line(base, str(bad), *words, "--update-baseline")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], ["nothing to check"]),
        (["--max-increase", "10%"], ["--max-increase needs --baseline"]),
        (["--baseline", "b.json"], ["--baseline needs --max-increase"]),
        (["--update-baseline"], ["--update-baseline needs --baseline"]),
        (["--baseline", "none.json", "--max-increase", "5%"], ["none.json"]),
        (["--baseline", "b.json", "--max-increase", "lots"], ["--max-increase", "'lots'"]),
        (["--max-eigenvalue", "1", "--sigmas", "-1"], ["--sigmas"]),
        (["--baseline", "b.json", "--max-increase", "-5%"], ["--max-increase must be at least 0"]),
        (["--baseline", "b.json", "--max-increase", "10"], ["+1000%", "write 10% for 10 percent"]),
    ],
)
def test_usage_errors(saved, args, words):
    one_error_line(check(saved, *args), *words)


def test_a_checkpoint_needs_data(tiny_analysis, tmp_path):
    one_error_line(check(tiny_analysis[0], "--max-eigenvalue", 1), "--data")
    one_error_line(check(tmp_path / "gone.pt", "--max-eigenvalue", 1), "gone.pt", "does not exist")


def test_update_baseline_writes_the_report_and_protects_other_files(report, saved, tmp_path):
    base = tmp_path / "ci" / "base.json"
    result = check(saved, "--baseline", base, "--update-baseline")
    assert result.exit_code == 0, result.output
    assert json.loads(base.read_text()) == report
    assert check(saved, "--baseline", base, "--max-increase", "0%").exit_code == 0
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    refused = check(saved, "--baseline", notes, "--update-baseline")
    one_error_line(refused, "refusing to overwrite", str(notes))
    assert notes.read_text() == '{"mine": true}'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".notes")] == []


def test_junit_has_one_testcase_per_check(report, saved, tmp_path):
    lam = report["results"]["lambda_max"]
    report["results"]["sampling"] = None  # λ_max/2 is then past the limit by more than ‖r‖
    saved = write(tmp_path / "plain.json", report)
    junit = tmp_path / "out" / "checks.xml"
    result = check(saved, "--max-eigenvalue", lam / 2, "--max-trace", 1e6, "--junit", junit)
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "1", "0")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [f"λ_max ≤ {lam / 2:g}", "trace ≤ 1e+06"]
    failure = cases[0].find("failure")
    assert failure is not None and "λ_max" in failure.get("message")
    assert cases[1].find("failure") is None and cases[1].find("system-out") is not None
    sources = [p.get("value") for p in suite.iter("property") if p.get("name") == "source"]
    assert sources == [str(saved)]


def test_github_annotations_and_step_summary(report, tmp_path):
    set_lambda_max(report, 1.0005, 1e-3)
    saved = write(tmp_path / "r.json", report)
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    limit = report["results"]["alignment"]["cos_batches"]["mean"] + 0.5
    result = check(saved, "--max-eigenvalue", 1, "--min-alignment", limit, env=env)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    warning = next(line for line in lines if line.startswith("::warning "))
    error = next(line for line in lines if line.startswith("::error "))
    assert warning.startswith(
        "::warning title=sharpscope check%3A λ_max ≤ 1::λ_max = 1.0005 ± 0.001"
    )
    assert error.startswith(
        f"::error title=sharpscope check%3A |cos(ĝ_B%2C v₁)| ≥ {limit:g}::|cos(ĝ_B, v₁)| = "
    )
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    assert "### sharpscope check: FAIL: 1 of 2 checks flagged the model" in text
    assert "| \\|cos(ĝ_B, v₁)\\| |" in text and "⚠️ pass (within noise)" in text
    as_json = check(saved, "--max-eigenvalue", 1, "--json", env=env)
    assert json.loads(as_json.stdout)["verdict"] == "pass"
    assert as_json.stderr.startswith("::warning title=")


def test_no_annotations_outside_github_actions(saved):
    result = check(saved, "--max-eigenvalue", 0)
    assert "::error" not in result.stdout


def test_twice_on_the_same_checkpoint_gives_the_same_verdict_and_figures(tiny_analysis):
    checkpoint, report = tiny_analysis
    args = [checkpoint, *FAST, "--seed", 0, "--max-eigenvalue", 1, "--max-trace", 100, "--json"]
    first, second = verdict(check(*args)), verdict(check(*args))
    assert first["verdict"] == second["verdict"]
    assert first["checks"] == second["checks"] and first["figures"] == second["figures"]
    assert first["figures"]["lambda_max"]["value"] == report["results"]["lambda_max"]


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["results"].pop("trace"),
        lambda d: d["results"]["eigenvalues"].update(values=[]),
        lambda d: d["results"]["eigenvalues"].update(which="middle"),
        lambda d: d["inputs"]["checkpoint"].update(sha256="XYZ"),
        lambda d: d["results"]["alignment"].update(cos_full=2.0),
        lambda d: d["timings"]["stages"].update(gradient="fast"),
        lambda d: d["results"]["lambda_min"].update(residual=None),
    ],
)
def test_schema_check_agrees_with_jsonschema(report, edit):
    edit(report)
    expected = jsonschema.Draft202012Validator(report_schema()).is_valid(report)
    assert (schema_problem(report) is None) == expected


def test_a_partial_report_is_not_gated(report, tmp_path):
    """An interrupted analysis's report lacks the later stages: gating it, or comparing with it
    as a baseline, is refused in one line instead of passing on figures never measured."""
    complete = write(tmp_path / "complete.json", report)
    report["partial"] = {"interrupted": "sampling", "finished": ["gradient", "eigenvalues"]}
    partial = write(tmp_path / "partial.json", report)
    result = check(partial, "--max-eigenvalue", 1e9)
    one_error_line(result, "partial.json is a partial report", "during sampling", "eigenvalues")
    result = check(complete, "--baseline", partial, "--max-increase", "10%")
    one_error_line(result, "partial.json is a partial report")
    assert check(complete, "--max-eigenvalue", 1e9).exit_code == 0

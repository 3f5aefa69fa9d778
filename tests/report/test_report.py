"""The report document, its schema, and what renders from it."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
import torch
from rich.console import Console

from sharpscope.analysis.alignment import MinibatchCosines
from sharpscope.analysis.analyze import Analysis, AnalyzeConfig, analyze
from sharpscope.analysis.gate import METRICS, Reading
from sharpscope.analysis.intervals import jackknife_se
from sharpscope.analysis.verdict import spread_notes
from sharpscope.io.checkpoints import file_sha256
from sharpscope.io.eigenvectors import load_eigenvectors
from sharpscope.report.document import Inputs, Layer, Report, read_report
from sharpscope.report.json_report import dumps
from sharpscope.report.outdir import write_out_dir
from sharpscope.report.schema import SCHEMA_VERSION, report_schema
from sharpscope.report.table import HELP, render

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
        "fingerprint": "0123456789abcdef",
    },
    "loss": "cross-entropy",
    "dtype": "float64",
    "device": "cpu",
}


@pytest.fixture(scope="module")
def analysed(cnn):
    config = AnalyzeConfig(
        **dict(k=3, density=True, per_layer=True, slices=True, density_iter=20),
        **dict(adaptive_sharpness="average", adaptive_steps=4, bias=True),
    )
    result = analyze(cnn.model, cnn.loss_fn, cnn.split(16), config)
    inputs = Inputs.from_json({**INPUTS, "config": dict(config.__dict__)})
    return result, Report.from_analysis(result, inputs)


def test_report_validates_against_its_schema(analysed):
    _, report = analysed
    document = json.loads(report.dumps())
    jsonschema.validate(document, report_schema())
    assert document["schema_version"] == SCHEMA_VERSION
    results = document["results"]
    assert len(results["eigenvalues"]["values"]) == 3
    assert results["lambda_max"] == results["eigenvalues"]["values"][0]
    assert not results["trace"]["converged"]  # this CNN's trace stops at its budget
    assert results["lambda_max_over_trace"] is None  # so their ratio is not a number
    assert {layer["name"] for layer in results["per_layer"]} == {"conv", "bn", "fc"}
    assert set(results["slices"]) == {"v1", "gradient"}


def test_schema_rejects_a_broken_report(analysed):
    _, report = analysed
    broken = json.loads(report.dumps())
    del broken["results"]["eigenvalues"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, report_schema())


def assert_schema_order(value: Any, schema: dict[str, Any], where: str = "report") -> None:
    """Each object holds only keys its schema describes, in the order the schema lists them."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            assert_schema_order(item, schema.get("items", {}), f"{where}[{i}]")
    if not isinstance(value, dict):
        return
    listed = schema.get("properties", {})
    if listed:
        assert list(value) == [key for key in listed if key in value], where
    for key, item in value.items():
        assert_schema_order(item, listed.get(key, schema.get("additionalProperties", {})), key)


def test_the_layout_is_the_schemas(analysed):
    _, report = analysed
    document = json.loads(report.dumps())
    assert_schema_order(document, report_schema())
    assert list(document["inputs"]) == [*INPUTS, "config", "versions"]


def test_a_report_reads_back_as_it_was_written(analysed, tmp_path):
    _, report = analysed
    path = tmp_path / "report.json"
    path.write_text(report.dumps(), encoding="utf-8")
    again = read_report(path)
    assert again == report
    assert again.dumps() == path.read_text(encoding="utf-8")


def test_each_table_has_its_help_line_under_it(analysed):
    _, report = analysed
    console = Console(record=True, width=100)
    console.print(render(report))
    lines = console.export_text().splitlines()
    titles = ["Model and data", "Top Hessian", "Curvature", "SAM alignment", "Per-layer"]
    keys = ["summary", "eigenvalues", "curvature", "alignment", "per_layer"]
    for title, help_line in zip(titles, (HELP[k] for k in keys), strict=True):
        start = next(i for i, line in enumerate(lines) if line.startswith(title))
        bottom = next(i for i in range(start, len(lines)) if lines[i].startswith("└"))
        assert lines[bottom + 1] == help_line and len(help_line) <= 100, title


def test_per_layer_entries_name_the_modules_type(analysed):
    _, report = analysed
    types = {layer.name: layer.module_type for layer in report.results.per_layer}
    assert types == {"conv": "Conv2d", "bn": "BatchNorm2d", "fc": "Linear"}
    console = Console(record=True, width=100)
    console.print(render(report))
    rows = [line for line in console.export_text().splitlines() if "BatchNorm2d" in line]
    assert len(rows) == 1 and " bn " in rows[0] and " 6 " in rows[0]  # weight and bias of 3


def test_a_report_written_before_module_type_still_reads(analysed, tmp_path):
    _, report = analysed
    document = json.loads(report.dumps())
    for layer in document["results"]["per_layer"]:
        assert "kind" not in layer  # one module's block
        del layer["module_type"], layer["parameters"]
    old = tmp_path / "old.json"
    old.write_text(dumps(document), encoding="utf-8")
    read = read_report(old)
    assert [layer.module_type for layer in read.results.per_layer] == [None] * 3
    assert read.dumps() == old.read_text(encoding="utf-8")


def test_transformer_groups_list_their_modules_in_full(analysed):
    _, report = analysed
    tensors = ("bert.encoder.layer.0.attention.self.query.weight",) * 2
    group = Layer(
        "bert.encoder.layer.0 · attention.q", 72, 0.5, 1e-9, True, "Linear", "attention.q", tensors
    )
    grouped = replace(report, results=replace(report.results, per_layer=(group,)))
    assert Report.from_json(json.loads(grouped.dumps())).results.per_layer == (group,)
    console = Console(record=True, width=100)
    console.print(render(grouped))
    lines = console.export_text().splitlines()
    at = next(i for i, line in enumerate(lines) if "attention.q " in line)
    assert "group: modules" in lines[at - 2] and " Linear " in lines[at] and " 72 " in lines[at]
    assert lines[at + 1].split("│")[1].strip() == "bert.encoder.layer.0.attention.self.query"


def test_the_gate_reads_each_of_its_figures(analysed):
    _, report = analysed
    gated, results = report.gate_input(), report.results
    assert set(gated.readings) == set(METRICS)
    sampling = results.sampling
    replicates = sampling.replicates
    assert gated.readings["lambda_max"] == Reading(
        results.lambda_max,
        results.eigenvalues.residuals[0],
        sampling.eigenvalues[0],
        (sampling.bias.eigenvalues[0], sampling.bias_factor * sampling.bias.eigenvalues[0]),
        replicates["lambda_max"],
    )
    assert gated.readings["trace"] == Reading(
        results.trace.estimate,
        results.trace.std_error,
        sampling.trace,
        replicates=replicates["trace"],
    )
    assert gated.readings["cos_full"] == Reading(
        results.alignment.cos_full,
        None,
        sampling.cos_full,
        (
            -sampling.bias_factor * abs(sampling.bias.cos_full),
            sampling.bias_factor * abs(sampling.bias.cos_full),
        ),
        replicates["cos_full"],
    )  # a cosine's bias may have either sign
    b = results.alignment.cos_batches
    assert b.count >= 2 and b.std_error > 0
    assert gated.readings["cos_batches"] == Reading(b.mean, b.std_error)  # the verdict's figure
    assert gated.shard_weights == replicates["weights"]
    assert len(replicates["weights"]) == sampling.shards
    assert sum(replicates["weights"]) == pytest.approx(1.0)
    for metric in ("lambda_max", "lambda_min", "trace", "cos_full", "sam_sharpness"):
        assert len(replicates[metric]) == sampling.shards
    assert jackknife_se(replicates["lambda_max"]) == pytest.approx(sampling.eigenvalues[0])
    assert sampling.trace > 0 and sampling.bias_factor == pytest.approx(8**0.5 + 1)
    assert sampling.cos_full > 0 and sampling.shards >= 2
    h = results.adaptive_sharpness
    assert gated.readings["adaptive_sharpness"] == Reading(
        h.value, h.std_error, h.sampling, replicates=h.replicates
    )
    assert jackknife_se(h.replicates) == pytest.approx(h.sampling)
    assert h.std_error > 0 and h.sampling > 0
    assert gated.num_params == results.num_params == sum(math.prod(s) for _, s in gated.parameters)
    assert [name for name, _ in gated.parameters] == list(analysed[0].param_names)
    assert gated.data == {
        "data": "0123456789abcdef",
        "samples": 48,
        "seed": 0,
        "rho": AnalyzeConfig().rho,
        "dtype": "float64",
        "loss": "cross-entropy",
        "reduction": "mean",
        "adaptive_sharpness": "average",
        "adaptive_norm": "l2",
        "adaptive_rho": 0.1,
        "adaptive_steps": 4,
        "adaptive_scale": "on",
    }


def test_the_gate_reads_non_finite_figures_as_a_saved_report_holds_them(analysed):
    _, report = analysed
    results = report.results
    odd = replace(
        report,
        results=replace(
            results,
            lambda_min=replace(results.lambda_min, residual=math.nan),
            alignment=replace(results.alignment, sam_sharpness=math.inf),
        ),
    )
    saved = Report.from_json(json.loads(odd.dumps()))
    assert odd.gate_input() == saved.gate_input()
    assert "sam_sharpness" not in saved.gate_input().readings
    assert saved.gate_input().readings["lambda_min"].uncertainty is None


def test_non_finite_numbers_are_written_as_null():
    text = dumps({"a": math.nan, "b": [math.inf, 1.0], "c": {"d": -math.inf}})
    assert json.loads(text) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


def test_table_shows_figures_and_verdict(analysed):
    result, report = analysed
    console = Console(record=True, width=120)
    console.print(render(report))
    text = console.export_text()
    assert f"{result.lambda_max:.6g}" in text
    assert report.results.verdict in " ".join(text.split())  # however the line wraps
    assert "Per-layer" in text and "SAM alignment" in text


def test_residuals_show_as_bounds_never_as_a_bare_zero(analysed):
    _, report = analysed
    document = json.loads(report.dumps())
    document["results"]["eigenvalues"]["residuals"][0] = 0.0
    console = Console(record=True, width=120)
    console.print(render(Report.from_json(document, "test")))
    rows = [line for line in console.export_text().splitlines() if line.startswith("│   1 │")]
    (row,) = rows
    cells = [cell.strip() for cell in row.split("│")]
    lam = abs(report.results.eigenvalues.values[0])
    floor = 2.0**-52 * max(lam, abs(report.results.lambda_min.value))  # float64 analysis
    assert cells[3] == f"≤ {floor:.2g}" and cells[3] != "0"


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
    stored = json.loads((tmp_path / "report.json").read_text())
    files = stored.pop("files")  # the companion files and their sha256 (a mixed set shows)
    assert stored == json.loads(report.dumps())
    assert files == {p.name: file_sha256(p) for p in written if p.name != "report.json"}
    Report.from_json(json.loads((tmp_path / "report.json").read_text()))  # the schema takes it
    values, vectors = load_eigenvectors(tmp_path / "eigenvectors.safetensors")
    assert values == pytest.approx(result.top.eigenvalues.tolist())
    flat = torch.cat([t.reshape(-1) for t in vectors[0].values()])
    torch.testing.assert_close(flat, result.top.eigenvectors[0])
    assert list(vectors[0]) == [n for n, _ in cnn.model.named_parameters()]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_trace_stopped_by_its_budget_shows_as_unconverged_with_its_interval(analysed):
    """The small CNN's trace cannot reach 1 % within the eigen stage's products: it stops there,
    and the table, the notes and the JSON say so."""
    result, report = analysed
    trace = result.trace
    assert not trace.converged and trace.n_products <= result.top.n_products
    console = Console(record=True, width=200)
    console.print(render(report))
    text = console.export_text()
    low, high = trace.interval
    shown = re.search(rf"\(95 %: ({NUMBER}) to ({NUMBER})\)", text)
    assert "not converged" in text and shown is not None
    assert float(shown[1]) <= low and float(shown[2]) >= high  # rounded outward
    assert float(shown[1]) == pytest.approx(low, rel=1e-3)
    assert float(shown[2]) == pytest.approx(high, rel=1e-3)
    assert any(note.startswith("trace: not converged") for note in result.notes)
    document = json.loads(report.dumps())["results"]
    assert document["trace"]["converged"] is False
    assert document["trace"]["interval"] == pytest.approx([low, high])
    assert document["lambda_max_over_trace"] is None  # a ratio of an unconverged figure
    ratio = next(line for line in text.splitlines() if "λ_max / trace" in line)
    assert "— (the trace did not converge)" in ratio


def test_a_converged_trace_gives_its_ratio_with_lambda_max(analysed):
    result, report = analysed
    converged = replace(result, trace=replace(result.trace, converged=True))
    ratio = Report.from_analysis(converged, report.inputs).results.lambda_max_over_trace
    assert ratio == pytest.approx(result.lambda_max / result.trace.estimate)
    console = Console(record=True, width=200)
    console.print(render(Report.from_analysis(converged, report.inputs)))
    row = next(line for line in console.export_text().splitlines() if "λ_max / trace" in line)
    assert f"{ratio:.4g}" in row


NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
PRINTED_INTERVALS = (
    rf"({NUMBER}) \[({NUMBER}), ({NUMBER})\]",  # a figure and its spread
    rf"({NUMBER}) ± {NUMBER} \(95 %: ({NUMBER}) to ({NUMBER})\)",  # the trace's estimate
    rf"({NUMBER}) ± {NUMBER} \[({NUMBER})–({NUMBER})\]",  # the minibatches' mean, SE, range
)


def printed_intervals(report: Report) -> list[tuple[float, float, float]]:
    """Every (point, low, high) the terminal report prints."""
    console = Console(record=True, width=400)
    console.print(render(report))
    text = console.export_text()
    return [tuple(map(float, m.groups())) for p in PRINTED_INTERVALS for m in re.finditer(p, text)]


def test_every_printed_interval_holds_its_point(analysed):
    analysis, report = analysed
    s, results = report.results.sampling, report.results
    found = printed_intervals(report)
    assert len(found) >= 7  # λ_max, λ_min, the trace twice, |cos|, the share, SAM, adaptive
    shifted_bias = (3 * results.lambda_max, 3 * results.lambda_max)  # MiniLM's kind of shift
    old_high = results.lambda_max - shifted_bias[0] + s.interval_multiplier * s.eigenvalues[0]
    assert old_high < results.lambda_max  # the interval as it was formed would miss it
    skewed = replace(
        report,
        results=replace(
            results,
            sampling=replace(
                s,
                bias=replace(
                    s.bias,
                    eigenvalues=(results.lambda_max, *s.bias.eigenvalues[1:]),
                    lambda_min=-abs(results.lambda_min.value) - 1,
                    sam_sharpness=2 * results.alignment.sam_sharpness,
                ),
                bias_factor=3.0,
            ),
            notes=(*results.notes, *_straddling_note(analysis)),
        ),
    )
    found += printed_intervals(skewed)
    assert any("crosses the cut-off 0.1" in n for n in skewed.results.notes)
    for point, low, high in found:
        assert low <= point <= high, (point, low, high)


def _straddling_note(analysis: Analysis) -> list[str]:
    """The note for an alignment whose minibatches' mean ± 2 SE crosses 0.1."""
    cosines = MinibatchCosines.of([0.06, 0.15, 0.09, 0.13], [0.5] * 4, 16)
    straddling = replace(analysis, alignment=replace(analysis.alignment, cos_batches=cosines))
    return spread_notes(straddling)


def test_the_minibatch_alignment_survives_a_json_round_trip(analysed):
    _, report = analysed
    b = report.results.alignment.cos_batches
    saved = json.loads(report.dumps())["results"]["alignment"]["cos_batches"]
    assert saved["values"] == pytest.approx(list(b.values), abs=0, rel=0)
    assert (saved["count"], saved["batch_size"]) == (len(b.values), 16)
    assert saved["std_error"] == pytest.approx(float(torch.tensor(b.values).std() / b.count**0.5))
    again = Report.from_json(json.loads(report.dumps())).results.alignment.cos_batches
    assert again == b
    console = Console(record=True, width=200)
    console.print(render(report))
    lines = console.export_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "|cos(ĝ_B" in line)
    row = lines[first]
    assert "full-data gradient" in lines[first + 1]  # the verdict's figure first, then full data
    assert f"mean ± SE over {b.count} minibatches of 16 [min–max]" in row
    assert f"{b.mean:.3g} ± {b.std_error:.2g} [" in row
    # a single minibatch writes no std_error (never 0), and a report without the new keys (older
    # ones) still reads, with no standard error to gate on
    alone = replace(b, count=1, std_error=None, values=b.values[:1])
    document = json.loads(
        replace(
            report,
            results=replace(
                report.results, alignment=replace(report.results.alignment, cos_batches=alone)
            ),
        ).dumps()
    )
    assert "std_error" not in document["results"]["alignment"]["cos_batches"]
    for key in ("std_error", "batch_size", "values", "eigen_sam_mean"):
        document["results"]["alignment"]["cos_batches"].pop(key, None)
    older = Report.from_json(document)
    assert older.results.alignment.cos_batches.std_error is None
    assert older.gate_input().readings["cos_batches"].uncertainty is None
    console = Console(record=True, width=200)
    console.print(render(older))
    row = next(line for line in console.export_text().splitlines() if "|cos(ĝ_B" in line)
    assert "1 minibatch" in row and "(no SE)" in row and "±" not in row


def test_the_report_says_how_multiplicity_was_checked(analysed):
    """Lanczos' extra random start (its products in the totals): in the JSON and the notes."""
    result, report = analysed
    check = result.top.multiplicity
    assert check is not None and check.complete and check.starts >= 1
    assert 0 < check.products < result.top.n_products
    document = json.loads(report.dumps())["results"]
    shown = document["eigenvalues"]["multiplicity"]
    assert shown == {
        "starts": check.starts,
        "complete": True,
        "products": check.products,
        "note": str(check),
    }
    assert str(check) in document["notes"]
    console = Console(record=True, width=400)
    console.print(render(report))
    assert f"note: {check}" in console.export_text()


def test_batch_statistics_carry_a_note_that_the_batch_size_matters(cnn):
    """BatchNorm on each batch's statistics: another batch size, another Hessian."""
    config = AnalyzeConfig(k=1, batch_stats=True, trace=False, shards=0)
    small, large = (analyze(cnn.model, cnn.loss_fn, cnn.split(n), config) for n in (8, 48))
    assert abs(small.lambda_max - large.lambda_max) > 1e-3 * large.lambda_max
    note = next(n for n in small.notes if "batch_stats" in n)
    assert "depend on `batch_size`" in note
    inputs = Inputs.from_json({**INPUTS, "config": dict(config.__dict__)})
    report = Report.from_analysis(small, inputs)
    assert note in json.loads(report.dumps())["results"]["notes"]
    console = Console(record=True, width=400)
    console.print(render(report))
    assert f"note: {note}" in console.export_text()
    plain = analyze(cnn.model, cnn.loss_fn, cnn.split(8), replace(config, batch_stats=False))
    assert not any("batch_stats" in n for n in plain.notes)

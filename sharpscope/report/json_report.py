"""The versioned JSON report: one document that tables, plots and the CI gate all read."""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import torch

from sharpscope import __version__
from sharpscope.analysis.analyze import Analysis
from sharpscope.analysis.verdict import verdict
from sharpscope.curvature import EigenResult
from sharpscope.errors import InputError

SCHEMA_VERSION = 1


def _eigen(result: EigenResult) -> dict[str, Any]:
    return {
        "method": result.method,
        "which": result.which,
        "values": result.eigenvalues.tolist(),
        "residuals": result.residuals.tolist(),
        "converged": result.converged.tolist(),
        "n_products": result.n_products,
        "n_iterations": result.n_iterations,
        "seconds": result.seconds,
        "history": result.history,
    }


def _results(analysis: Analysis) -> dict[str, Any]:
    trace = analysis.trace
    lam_max = analysis.lambda_max
    return {
        "loss": analysis.loss,
        "accuracy": analysis.accuracy,
        "grad_norm": analysis.grad_norm,
        "num_samples": analysis.num_samples,
        "num_params": analysis.num_params,
        "eigenvalues": _eigen(analysis.top),
        "lambda_max": lam_max,
        "lambda_min": {
            "value": float(analysis.bottom.eigenvalues[0]),
            "residual": float(analysis.bottom.residuals[0]),
            "converged": bool(analysis.bottom.converged[0]),
            "n_products": analysis.bottom.n_products,
        },
        "trace": None
        if trace is None
        else {
            "estimate": trace.estimate,
            "std_error": trace.std_error,
            "n_samples": trace.n_samples,
            "n_products": trace.n_products,
            "method": trace.method,
            "converged": trace.converged,
        },
        "lambda_max_over_trace": lam_max / trace.estimate if trace and trace.estimate else None,
        "density": None
        if analysis.density is None
        else {
            "nodes": [t.tolist() for t in analysis.density.nodes],
            "weights": [w.tolist() for w in analysis.density.weights],
            "mean": analysis.density.mean,
        },
        "alignment": None if analysis.alignment is None else analysis.alignment.to_dict(),
        "per_layer": [asdict(layer) for layer in analysis.per_layer],
        "slices": {
            name: {"steps": steps, "loss": losses}
            for name, (steps, losses) in analysis.slices.items()
        },
        "verdict": verdict(analysis),
        "notes": analysis.notes,
    }


def build_report(analysis: Analysis, inputs: dict[str, Any]) -> dict[str, Any]:
    """The report document: ``inputs`` (checkpoint, model, data, config, dtype, device) as given,
    plus versions, results and timings."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": {
            **inputs,
            "versions": {
                "sharpscope": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        },
        "results": _results(analysis),
        "timings": {
            "total_seconds": sum(analysis.timings.values()),
            "stages": analysis.timings,
            "n_products": analysis.n_products,
        },
    }


def report_schema() -> dict[str, Any]:
    """The JSON Schema of the report (``sharpscope/report/schema.json``; see docs/report.md)."""
    return json.loads(resources.files("sharpscope.report").joinpath("schema.json").read_text())


def schema_problem(document: Any) -> str | None:
    """Where ``document`` first breaks the report schema, in one line, or None if it is valid."""
    validator = jsonschema.Draft202012Validator(report_schema())
    error = next(iter(sorted(validator.iter_errors(document), key=lambda e: list(e.path))), None)
    if error is None:
        return None
    where = ".".join(str(part) for part in error.path) or "the document"
    message = " ".join(error.message.split())
    return f"{where}: {message[:200]}"


def read_report(path: Path) -> dict[str, Any]:
    """A report file, checked against the report schema; an :class:`InputError` naming the file
    and the problem otherwise."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read the report {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a JSON report (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(document, dict) or "schema_version" not in document:
        raise InputError(f"{path} is not a sharpscope report (it has no schema_version)")
    if document["schema_version"] != SCHEMA_VERSION:
        raise InputError(
            f"{path} has schema_version {document['schema_version']!r}, and this sharpscope reads "
            f"version {SCHEMA_VERSION}: re-create it with this version's `sharpscope analyze`"
        )
    problem = schema_problem(document)
    if problem is not None:
        raise InputError(f"{path} is not a valid sharpscope report: {problem}")
    return document


def dumps(report: dict[str, Any]) -> str:
    """The report as indented JSON (NaN and infinity written as null)."""
    return json.dumps(_finite(report), indent=2) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

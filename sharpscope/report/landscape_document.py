"""The landscape's JSON document (``landscape_schema.json``, docs/landscape.md), checked against
its schema before it is written."""

from __future__ import annotations

import datetime
import json
from importlib import resources
from typing import Any

import jsonschema

from sharpscope.analysis.landscape import Landscape
from sharpscope.report.document import Inputs
from sharpscope.report.json_report import dumps

LANDSCAPE_VERSION = 1


def landscape_schema() -> dict[str, Any]:
    """The JSON Schema of the landscape document."""
    text = resources.files("sharpscope.report").joinpath("landscape_schema.json").read_text()
    return json.loads(text)


def landscape_document(result: Landscape, inputs: Inputs) -> dict[str, Any]:
    """The document of ``result`` measured on ``inputs``, created now, as JSON values (losses
    that are not finite stay floats here; :func:`landscape_json` writes them as null)."""
    directions = result.directions
    return {
        "landscape_version": LANDSCAPE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs.to_json(),
        "directions": {
            "kind": directions.kind,
            "seed": result.config.seed,
            "normalization": "unit" if directions.kind == "eigen" else "filter",
            "eigenvalues": directions.eigenvalues,
            "residuals": directions.residuals,
            "hessian_products": directions.n_products,
        },
        "params": {"count": result.num_params, "names": list(result.param_names)},
        "num_samples": result.num_samples,
        "span": result.config.span,
        "centre_loss": result.centre_loss,
        "line": {"steps": result.line_steps, "loss": result.line},
        "grid": {"steps": result.grid_steps, "loss": result.surface},
        "evaluations": result.evaluations,
        "seconds": result.seconds,
    }


def landscape_json(document: dict[str, Any]) -> str:
    """The document as indented JSON (NaN and infinity as null), after checking it against the
    schema (a failure there is a bug, not bad input)."""
    text = dumps(document)
    jsonschema.validate(json.loads(text), landscape_schema())
    return text

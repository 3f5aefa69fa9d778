"""The analysis output folder: report.json, eigenvectors.safetensors and the plots."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from sharpscope.analysis.analyze import Analysis
from sharpscope.curvature import select_params
from sharpscope.errors import InputError
from sharpscope.io.atomic import check_can_create, write_text_atomic
from sharpscope.io.eigenvectors import save_eigenvectors
from sharpscope.report.document import Report
from sharpscope.report.plots import write_plots
from sharpscope.report.schema import is_report

REPORT = "report.json"


def check_out_dir(folder: Path) -> None:
    """Refuse a folder that holds files but is not a previous sharpscope output folder, so a
    user's files are never overwritten."""
    check_can_create(folder, "`out`", folder=True)
    if not folder.exists() or not any(folder.iterdir()):
        return
    try:
        previous = json.loads((folder / REPORT).read_text(encoding="utf-8"))
        ours = is_report(previous)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise InputError(
            f"`out` {folder} already holds files that sharpscope did not write; "
            "choose a new or empty folder"
        )


def write_out_dir(folder: Path, report: Report, analysis: Analysis, model: nn.Module) -> list[Path]:
    """Write the report, the top eigenvectors and the plots; return the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    vectors = folder / "eigenvectors.safetensors"
    space = select_params(model, list(analysis.param_names))
    save_eigenvectors(vectors, analysis.top.eigenvalues, analysis.top.eigenvectors, space)
    plots = write_plots(report, folder)
    write_text_atomic(folder / REPORT, report.dumps())
    return [folder / REPORT, vectors, *plots]

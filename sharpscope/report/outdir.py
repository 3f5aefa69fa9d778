"""The analysis output folder: report.json, eigenvectors.safetensors and the plots, replaced as
one set; files of the folder that sharpscope did not write are never touched."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from sharpscope.analysis.analyze import Analysis
from sharpscope.curvature import select_params
from sharpscope.errors import InputError
from sharpscope.io.atomic import check_can_create
from sharpscope.io.checkpoints import file_sha256
from sharpscope.io.eigenvectors import save_eigenvectors
from sharpscope.io.file_sets import replace_files
from sharpscope.report.document import Report
from sharpscope.report.json_report import dumps
from sharpscope.report.plots import PLOTS, write_plots
from sharpscope.report.schema import is_report

REPORT = "report.json"
VECTORS = "eigenvectors.safetensors"
COMPANIONS = (VECTORS, *PLOTS)
FILES = "files"
"""The key of report.json (in an output folder) listing its companion files and their sha256."""


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
    """Write the report, the top eigenvectors and the plots as one set that replaces the previous
    one at once (:func:`~sharpscope.io.file_sets.replace_files`); report.json lists its companion
    files with their sha256 (``files``), so a set mixed by a crash would show. Returns the paths."""
    space = select_params(model, list(analysis.param_names))

    def write(stage: Path) -> list[str]:
        save_eigenvectors(
            stage / VECTORS, analysis.top.eigenvalues, analysis.top.eigenvectors, space
        )
        companions = [stage / VECTORS, *write_plots(report, stage)]
        files = {path.name: file_sha256(path) for path in companions}
        document = {**report.to_json(), FILES: files}
        (stage / REPORT).write_text(dumps(document), encoding="utf-8")
        return [*files, REPORT]  # report.json last: it names the set

    return replace_files(folder, write, stale=_previous_set(folder))


def share_eigenvectors(analysis: Analysis, model: nn.Module) -> None:
    """A rank other than 0 of an analysis of a model sharded by FSDP2: its part in gathering the
    top eigenvectors that rank 0's :func:`write_out_dir` writes, one parameter at a time."""
    space = select_params(model, list(analysis.param_names))
    save_eigenvectors(None, analysis.top.eigenvalues, analysis.top.eigenvectors, space)


def _previous_set(folder: Path) -> list[str]:
    """The companion files that the previous report.json in ``folder`` lists and that are still
    as it lists them (so sharpscope wrote them): those a new set without them removes."""
    try:
        listed = json.loads((folder / REPORT).read_text(encoding="utf-8"))[FILES]
        names = [n for n, digest in listed.items() if n in COMPANIONS and isinstance(digest, str)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [
        name
        for name in names
        if not (folder / name).is_symlink()
        and (folder / name).is_file()
        and file_sha256(folder / name) == listed[name]
    ]

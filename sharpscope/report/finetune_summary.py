"""A fine-tuning run's outcome as a JSON-ready summary and as a before/after table."""

from __future__ import annotations

import itertools
from typing import Any

from rich.table import Table

from sharpscope.training.run import Outcome
from sharpscope.training.run_config import RunConfig
from sharpscope.training.run_dir import RunDir, model_path

FIGURES: tuple[tuple[str, str, str], ...] = (
    ("λ_max (probe batch)", "lambda_max", "{:.5g}"),
    ("λ_c = 2/η_c (probe batch)", "lambda_c", "{:.4g}"),
    ("|cos(ĝ, v₁)| (probe batch)", "alignment", "{:.4f}"),
    ("probe loss", "probe_loss", "{:.4f}"),
    ("validation loss", "val_loss", "{:.4f}"),
    ("validation accuracy", "val_accuracy", "{:.2%}"),
)
"""The summary table's rows: label, metric field, format."""


def seconds_per_step(rows: list[dict[str, Any]]) -> float | None:
    """Mean wall time of a training step (tracking excluded) over the recorded rows."""
    total = steps = 0.0
    for before, row in itertools.pairwise(rows):
        if row["step_seconds"] is not None:
            total += row["step_seconds"] * (row["step"] - before["step"])
            steps += row["step"] - before["step"]
    return total / steps if steps else None


def summary(outcome: Outcome, folder: RunDir, config: RunConfig) -> dict[str, Any]:
    """The run's outcome as a JSON-ready document: status, where, and the first and last rows."""
    return {
        "status": outcome.status,
        "run": str(folder.path),
        "checkpoint": str(model_path(outcome.checkpoint, config.layout)),
        "step": outcome.step,
        "total_steps": outcome.total_steps,
        "optimizer": config.optimizer,
        "precision": config.precision,
        "curvature": config.curvature,
        "seconds_per_step": seconds_per_step(outcome.rows),
        "before": outcome.rows[0] if outcome.rows else None,
        "after": outcome.rows[-1] if outcome.rows else None,
    }


def summary_table(doc: dict[str, Any]) -> Table:
    """The figures of :func:`summary`'s first and last rows side by side (those with a value)."""
    before, after = doc["before"], doc["after"]
    products = after.get("product_dtype") or "the weights' dtype"
    table = Table(
        title=f"sharpscope finetune: {doc['optimizer']}, {doc['step']} steps in "
        f"{doc['precision']}; λ_max of the {doc['curvature']} in {products}",
        title_justify="left",
    )
    table.add_column("figure", style="bold")
    table.add_column(f"before (step {before['step']})", justify="right")
    table.add_column(f"after (step {after['step']})", justify="right")
    for label, key, form in FIGURES:
        if before[key] is not None or after[key] is not None:
            cells = ["—" if r[key] is None else form.format(r[key]) for r in (before, after)]
            table.add_row(label, *cells)
    return table

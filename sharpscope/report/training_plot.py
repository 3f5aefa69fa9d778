"""``training.png``: a fine-tuning run's loss, accuracy, λ_max (and λ_c) and alignment over its
steps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sharpscope.io.atomic import atomic_path

PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", "loss", (("loss", "train (minibatches)"), ("val_loss", "validation"))),
    ("accuracy", "accuracy", (("accuracy", "train (minibatches)"), ("val_accuracy", "validation"))),
    (
        "λ_max",
        "λ_max (probe batch)",
        (
            ("lambda_max", "Lanczos"),
            ("esam_eigenvalue", "Eigen-SAM's estimate (minibatch)"),
            ("lambda_c", "critical sharpness 2/η_c"),
        ),
    ),
    (
        "alignment",
        "|cos(ĝ, v₁)|",
        (("alignment", "probe gradient"), ("esam_alignment", "Eigen-SAM steps (vs its v)")),
    ),
)
"""Per panel: title, y label, and the (field, label) curves it draws where they have values."""


def _curve(ax: Axes, rows: Sequence[dict[str, Any]], key: str, label: str) -> None:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if points:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, label=label)


def plot_training(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Draw the rows of a run's metric log into a 2×2 PNG at ``path`` (atomically); the loss
    panel also shows the learning rate on a second axis."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (name, ylabel, curves) in zip(axes, PANELS, strict=True):
        for key, label in curves:
            _curve(ax, rows, key, label)
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    lr = axes[0].twinx()
    _curve(lr, rows, "lr", "learning rate")
    for line in lr.lines:
        line.set(color="grey", linestyle="--", alpha=0.6)
    lr.set_ylabel("learning rate", color="grey")
    for ax in axes[2:]:
        ax.set_xlabel("step")
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)

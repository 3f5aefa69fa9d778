"""PNG plots drawn from a report: spectral density, Lanczos convergence, 1-D loss slices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from sharpscope.curvature import DensityResult
from sharpscope.io.atomic import atomic_path
from sharpscope.report.document import Report, Results


def _figure() -> tuple[Figure, Any]:
    """A figure drawn without pyplot (no GUI backend, no global state)."""
    fig = Figure(figsize=(7, 4))
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_density(results: Results, path: Path) -> None:
    """Smoothed spectral density (log scale) with the top eigenvalues marked (the results must
    hold a density)."""
    density = results.density
    slq = DensityResult(
        nodes=[torch.tensor(n, dtype=torch.float64) for n in density.nodes],
        weights=[torch.tensor(w, dtype=torch.float64) for w in density.weights],
        size=results.num_params,
        n_products=0,
        seconds=0.0,
    )
    grid, values = slq.smoothed()
    fig, ax = _figure()
    floor = 1e-6 * float(values.max())
    ax.semilogy(grid.numpy(), values.clamp_min(floor).numpy(), color="tab:blue")
    ax.set_ylim(bottom=floor)
    for i, value in enumerate(results.eigenvalues.values):
        ax.axvline(
            value, color="tab:red", lw=0.8, ls="--", label="top eigenvalues" if i == 0 else None
        )
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (smoothed, log)")
    ax.set_title("Hessian spectral density (SLQ)")
    ax.legend()
    _save(fig, path)


def plot_convergence(results: Results, path: Path) -> None:
    """Distance of each eigenvalue estimate from its final value, per Lanczos iteration."""
    history = results.eigenvalues.history
    final = results.eigenvalues.values
    fig, ax = _figure()
    for i, value in enumerate(final):
        points = [(it + 1, abs(row[i] - value)) for it, row in enumerate(history) if len(row) > i]
        points = [(it, max(err, 1e-16 * max(abs(value), 1.0))) for it, err in points]
        if points:
            ax.semilogy(*zip(*points, strict=True), label=f"λ{i + 1}")
    ax.set_xlabel("iteration (Hessian-vector products)")
    ax.set_ylabel("|estimate − final|")
    ax.set_title(f"Convergence ({results.eigenvalues.method})")
    ax.legend()
    _save(fig, path)


def plot_slices(results: Results, path: Path) -> None:
    """The loss along the top eigenvector and along the normalised gradient."""
    labels = {"v1": "along v₁ (top eigenvector)", "gradient": "along ĝ (SAM direction)"}
    fig, ax = _figure()
    for name, curve in results.slices.items():
        ax.plot(curve.steps, curve.loss, marker=".", label=labels.get(name, name))
    ax.set_xlabel("step t (w + t·direction)")
    ax.set_ylabel("loss")
    ax.set_title("1-D loss slices")
    ax.legend()
    _save(fig, path)


def write_plots(report: Report, folder: Path) -> list[Path]:
    """Write every plot the report has data for into ``folder`` and remove stale ones of an
    earlier run; return the paths written."""
    results = report.results
    written = []
    jobs = [
        ("density.png", plot_density, results.density is not None),
        ("convergence.png", plot_convergence, bool(results.eigenvalues.history)),
        ("loss_slices.png", plot_slices, bool(results.slices)),
    ]
    for name, draw, wanted in jobs:
        if wanted:
            draw(results, folder / name)
            written.append(folder / name)
        else:
            (folder / name).unlink(missing_ok=True)
    return written

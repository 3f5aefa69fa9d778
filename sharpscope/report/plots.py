"""PNG plots drawn from a report: spectral density, Lanczos convergence, 1-D loss slices; and
the loss landscape drawn from its document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
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


def plot_landscape(document: dict[str, Any], path: Path) -> None:
    """The 1-D line, the 2-D grid's contours and its surface from a landscape document
    (:mod:`sharpscope.report.landscape_document`); losses that are not finite are left blank."""
    directions = document["directions"]
    eigen = directions["kind"] == "eigen"
    names = ("v₁", "v₂") if eigen else ("d₁", "d₂")
    if directions["eigenvalues"]:
        values = directions["eigenvalues"]
        names = tuple(f"{n} (λ = {v:.4g})" for n, v in zip(names, values, strict=True))
    line, grid = document["line"], document["grid"]
    steps = np.asarray(grid["steps"], dtype=float)
    loss = np.ma.masked_invalid(np.asarray(grid["loss"], dtype=float))
    kind = "the top Hessian eigenvectors" if eigen else "filter-normalised random directions"
    fig = Figure(figsize=(16, 4.6))
    fig.subplots_adjust(wspace=0.3)
    seed = "" if eigen else f" (seed {directions['seed']})"
    fig.suptitle(f"Loss landscape along {kind}{seed}")
    first = fig.add_subplot(1, 3, 1)
    first.plot(line["steps"], np.asarray(line["loss"], dtype=float), marker=".")
    first.axvline(0, color="tab:red", lw=0.8, ls="--")
    first.set_xlabel(f"t along {names[0]}")
    first.set_ylabel("loss")
    first.set_title(f"1-D: w + t·{names[0][:2]}")
    contour = fig.add_subplot(1, 3, 2)
    b, a = np.meshgrid(steps, steps)  # loss[i][j] is at a = steps[i] (d₁), b = steps[j] (d₂)
    filled = contour.contourf(a, b, loss, levels=20, cmap="viridis")
    contour.contour(a, b, loss, levels=20, colors="k", linewidths=0.3)
    contour.plot([0], [0], marker="x", color="tab:red")
    fig.colorbar(filled, ax=contour, label="loss")
    contour.set_xlabel(f"a along {names[0]}")
    contour.set_ylabel(f"b along {names[1]}")
    contour.set_title(f"2-D: w + a·{names[0][:2]} + b·{names[1][:2]}")
    surface = fig.add_subplot(1, 3, 3, projection="3d")
    surface.plot_surface(a, b, loss.filled(np.nan), cmap="viridis", linewidth=0)
    surface.set_xlabel("a")
    surface.set_ylabel("b")
    surface.set_zlabel("loss")
    _save(fig, path)


PLOTS = ("density.png", "convergence.png", "loss_slices.png")
"""The names of the plots :func:`write_plots` may write."""


def write_plots(report: Report, folder: Path) -> list[Path]:
    """Write every plot the report has data for into ``folder``; return the paths written."""
    results = report.results
    wanted = [
        results.density is not None,
        bool(results.eigenvalues.history),
        bool(results.slices),
    ]
    written = []
    for name, draw, want in zip(
        PLOTS, (plot_density, plot_convergence, plot_slices), wanted, strict=True
    ):
        if want:
            draw(results, folder / name)
            written.append(folder / name)
    return written

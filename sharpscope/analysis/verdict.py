"""A one-line, plain-language reading of an analysis."""

from __future__ import annotations

from sharpscope.analysis.analyze import Analysis

POOR, GOOD = 0.1, 0.5
"""|cos(ĝ, v₁)| below POOR is poorly aligned, above GOOD well aligned, partly in between."""


def verdict(analysis: Analysis) -> str:
    """What the SAM alignment says, e.g. "SAM perturbation is poorly aligned ... (|cos| = 0.04)"."""
    a = analysis.alignment
    if a is None:
        return "The gradient is zero: SAM's perturbation, and its alignment, are undefined here."
    cos = a.cos_full
    if cos < POOR:
        return (
            f"SAM perturbation is poorly aligned with the top eigenvector (|cos| = {cos:.2f}): "
            f"SAM barely regularises λ_max here; Eigen-SAM would raise it to {a.eigen_sam_cos:.2f} "
            f"(α = {a.alpha:g})."
        )
    if cos < GOOD:
        return (
            f"SAM perturbation is partly aligned with the top eigenvector (|cos| = {cos:.2f}); "
            f"Eigen-SAM would give {a.eigen_sam_cos:.2f} (α = {a.alpha:g})."
        )
    return f"SAM perturbation is well aligned with the top eigenvector (|cos| = {cos:.2f})."

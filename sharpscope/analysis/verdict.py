"""A one-line, plain-language reading of an analysis."""

from __future__ import annotations

from sharpscope.analysis.analyze import Analysis
from sharpscope.analysis.sampling import UNIT, bias_range, interval

POOR, GOOD = 0.1, 0.5
"""|cos(ĝ, v₁)| below POOR is poorly aligned, above GOOD well aligned, partly in between."""


def verdict(analysis: Analysis) -> str:
    """What the SAM alignment says, e.g. "SAM perturbation is poorly aligned ... (|cos| = 0.04)";
    "uncertain" when the data's 95 % interval of |cos| straddles a cut-off, naming it."""
    a = analysis.alignment
    if a is None:
        return "The gradient is zero: SAM's perturbation, and its alignment, are undefined here."
    cos = a.cos_full
    s = analysis.sampling
    estimated = s is not None and s.cos_full is not None
    bias = (
        bias_range(s.bias and s.bias.cos_full, s.bias_factor, signed=False)
        if estimated
        else (0.0, 0.0)
    )
    low, high = interval(cos, s.cos_full, s.multiplier, UNIT, bias) if estimated else (cos, cos)
    straddled = [cut for cut in (POOR, GOOD) if low < cut <= high]
    if straddled:
        return (
            f"SAM perturbation's alignment with the top eigenvector is uncertain (|cos| = "
            f"{cos:.2f}, 95 % interval {low:.2f}–{high:.2f} over samples of this size, "
            f"across the cut-off{'s' if len(straddled) > 1 else ''} "
            f"{' and '.join(f'{c:g}' for c in straddled)}); analyze more samples to decide."
        )
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

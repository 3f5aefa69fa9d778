"""A one-line, plain-language reading of an analysis, and a note when the spread could change it."""

from __future__ import annotations

from sharpscope.analysis.analyze import Analysis
from sharpscope.analysis.sampling import bias_range, interval, rounded_outward, samples_to_settle

POOR, GOOD = 0.1, 0.5
"""|cos(ĝ, v₁)| below POOR is poorly aligned, above GOOD well aligned, partly in between."""


def verdict(analysis: Analysis) -> str:
    """What the SAM alignment on the data given says, e.g. "SAM perturbation is poorly aligned
    ... (|cos| = 0.04)": always a verdict; the spread over other samples never changes it (see
    :func:`spread_notes`)."""
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


def spread_notes(analysis: Analysis) -> list[str]:
    """One note when the 95 % interval of |cos(ĝ, v₁)| over other samples of this size crosses
    a cut-off of the verdict: which, and about how many samples would keep it on one side
    (:func:`~sharpscope.analysis.sampling.samples_to_settle`); none otherwise."""
    a, s = analysis.alignment, analysis.sampling
    if a is None or s is None or s.cos_full is None:
        return []
    cos = a.cos_full
    bias = bias_range(s.bias and s.bias.cos_full, s.bias_factor, signed=False)
    low, high = interval(cos, s.cos_full, s.multiplier, None, bias)
    crossed = [cut for cut in (POOR, GOOD) if low < cut <= high and cut != cos]
    if not crossed:
        return []
    needed = max(
        samples_to_settle(analysis.num_samples, cos, high if cut > cos else low, cut) or 0
        for cut in crossed
    )
    shown_low, shown_high = rounded_outward(max(low, 0.0), min(high, 1.0))
    cuts = " and ".join(f"{c:g}" for c in crossed)
    return [
        f"the spread could change the alignment verdict: over other samples of this size "
        f"|cos(ĝ, v₁)| = {cos:.3g} may lie anywhere in [{shown_low:.2g}, {shown_high:.2g}] "
        f"(95 %), across the cut-off{'s' if len(crossed) > 1 else ''} {cuts}; about "
        f"{needed:,} samples from the same data would settle it (the spread shrinks as 1/√n)"
    ]

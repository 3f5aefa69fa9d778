"""A one-line, plain-language reading of an analysis, and a note when the minibatches' standard
error could change it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sharpscope.analysis.gate import ESTIMATOR_SIGMAS
from sharpscope.analysis.intervals import samples_to_settle

if TYPE_CHECKING:
    from sharpscope.analysis.alignment import MinibatchCosines
    from sharpscope.analysis.analyze import Analysis

POOR, GOOD = 0.1, 0.5
"""|cos(ĝ_B, v₁)| below POOR is poorly aligned, above GOOD well aligned, partly in between."""


def alignment_figure(b: MinibatchCosines) -> str:
    """The figure the verdict reads, e.g. ``|cos(ĝ_B, v₁)| = 0.40 ± 0.031, mean ± SE over 11
    minibatches of 128``; a single minibatch is said to have no standard error."""
    if b.std_error is None:
        return f"|cos(ĝ_B, v₁)| = {b.mean:.2f}, one minibatch of {b.batch_size}: no standard error"
    return (
        f"|cos(ĝ_B, v₁)| = {b.mean:.2f} ± {b.std_error:.2g}, mean ± SE over {b.count} "
        f"minibatches of {b.batch_size}"
    )


def verdict(analysis: Analysis) -> str:
    """What SAM's alignment on the data given says, read from its own perturbations: the mean
    |cos(ĝ_B, v₁)| over the minibatches of the training batch size, e.g. "SAM perturbation is
    poorly aligned ... (|cos(ĝ_B, v₁)| = 0.04 ± 0.01, ...)": always a verdict; the standard error
    never changes it (see :func:`spread_notes`)."""
    a = analysis.alignment
    if a is None:
        return "The gradient is zero: SAM's perturbation, and its alignment, are undefined here."
    b = a.cos_batches
    cos, eigen, figure = b.mean, b.eigen_sam_mean, alignment_figure(b)
    if cos < POOR:
        return (
            f"SAM perturbation is poorly aligned with the top eigenvector ({figure}): SAM "
            f"barely regularises λ_max here; Eigen-SAM would raise it to {eigen:.2f} "
            f"(α = {a.alpha:g})."
        )
    if cos < GOOD:
        return (
            f"SAM perturbation is partly aligned with the top eigenvector ({figure}); "
            f"Eigen-SAM would give {eigen:.2f} (α = {a.alpha:g})."
        )
    return f"SAM perturbation is well aligned with the top eigenvector ({figure})."


def spread_notes(analysis: Analysis, split_size: int | None = None) -> list[str]:
    """One note when other minibatches could change the alignment verdict: the mean ±
    :data:`~sharpscope.analysis.gate.ESTIMATOR_SIGMAS` standard errors crosses a cut-off (which,
    and about how many samples would keep it on one side — or that the split of ``split_size``
    samples holds too few to), or a single minibatch has no standard error; none otherwise."""
    a = analysis.alignment
    if a is None:
        return []
    b = a.cos_batches
    if b.std_error is None:
        wanted = 2 * b.batch_size
        advice = (
            f"analyze at least {wanted:,} samples for a standard error"
            if split_size is None or split_size >= wanted
            else f"the split holds {split_size:,} samples, fewer than the {wanted:,} that two "
            "minibatches take"
        )
        return [
            f"the alignment is of one minibatch of {b.batch_size} samples, so how much it varies "
            f"between SAM's minibatches is unknown: {advice}"
        ]
    cos, reach = b.mean, ESTIMATOR_SIGMAS * b.std_error
    low, high = cos - reach, cos + reach
    crossed = [cut for cut in (POOR, GOOD) if low < cut <= high and cut != cos]
    if not crossed:
        return []
    needed = max(
        samples_to_settle(b.count, cos, high if cut > cos else low, cut) or 0 for cut in crossed
    )
    cuts = " and ".join(f"{c:g}" for c in crossed)
    wanted = needed * b.batch_size
    settle = (
        f"about {wanted:,} samples ({needed:,} minibatches of {b.batch_size}) would settle it "
        "(the SE shrinks as 1/√minibatches)"
        if split_size is None or split_size >= wanted
        else f"settling it would take about {wanted:,} samples, more than the {split_size:,} the "
        "split holds: on this data the verdict stays this close to the cut-off"
    )
    return [
        f"other minibatches could change the alignment verdict: |cos(ĝ_B, v₁)| = {cos:.3g} ± "
        f"{reach:.2g} ({ESTIMATOR_SIGMAS:g} SE over {b.count} minibatches) crosses the "
        f"cut-off{'s' if len(crossed) > 1 else ''} {cuts}; {settle}"
    ]

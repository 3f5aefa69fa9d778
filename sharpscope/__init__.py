"""sharpscope: how sharp is a trained PyTorch model, and is SAM fixing it?

The names below load on first use (``import sharpscope`` alone imports no torch), so that the
command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sharpscope.version import __version__

__all__ = [
    "ASAM",
    "CURVATURES",
    "SAM",
    "SOLVERS",
    "AdaptiveSharpnessResult",
    "AdaptiveSharpnessSettings",
    "Alignment",
    "AnalyzeConfig",
    "DensityResult",
    "EigenResult",
    "EigenSAM",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "Objective",
    "ParamSpace",
    "SharpnessTracker",
    "SolveSettings",
    "Subspace",
    "TraceResult",
    "__version__",
    "adaptive_sharpness",
    "analyze",
    "curvature_operator",
    "deflated_trace",
    "hessian_eigs",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lanczos_extremes",
    "power_iteration",
    "sam_alignment",
    "select_params",
    "slq",
    "spectral_density",
]

_HOMES = {
    **dict.fromkeys(("ASAM", "SAM", "EigenSAM"), "sharpscope.optim"),
    **dict.fromkeys(("Alignment", "sam_alignment"), "sharpscope.analysis.alignment"),
    **dict.fromkeys(("AnalyzeConfig", "analyze"), "sharpscope.analysis.analyze"),
    **dict.fromkeys(
        ("AdaptiveSharpnessResult", "AdaptiveSharpnessSettings", "adaptive_sharpness"),
        "sharpscope.analysis.adaptive_sharpness",
    ),
    "SharpnessTracker": "sharpscope.training.tracking",
}
"""Public name -> the module that defines it, where that is not sharpscope.curvature."""

if TYPE_CHECKING:
    from sharpscope.analysis.adaptive_sharpness import (
        AdaptiveSharpnessResult,
        AdaptiveSharpnessSettings,
        adaptive_sharpness,
    )
    from sharpscope.analysis.alignment import Alignment, sam_alignment
    from sharpscope.analysis.analyze import AnalyzeConfig, analyze
    from sharpscope.curvature import (
        CURVATURES,
        SOLVERS,
        DensityResult,
        EigenResult,
        EmpiricalFisherOperator,
        FisherOperator,
        GGNOperator,
        HessianOperator,
        LinearOperator,
        MatrixOperator,
        Objective,
        ParamSpace,
        SolveSettings,
        Subspace,
        TraceResult,
        curvature_operator,
        deflated_trace,
        hessian_eigs,
        hessian_trace,
        hutchinson,
        hutchpp,
        lanczos,
        lanczos_extremes,
        power_iteration,
        select_params,
        slq,
        spectral_density,
    )
    from sharpscope.optim import ASAM, SAM, EigenSAM
    from sharpscope.training.tracking import SharpnessTracker


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used."""
    if name not in __all__:
        raise AttributeError(f"module 'sharpscope' has no attribute {name!r}")
    home = _HOMES.get(name, "sharpscope.curvature")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

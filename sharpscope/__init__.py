"""sharpscope: how sharp is a trained PyTorch model, and is SAM fixing it?"""

from sharpscope.curvature import (
    DensityResult,
    EigenResult,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    ParamSpace,
    TraceResult,
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

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "SAM",
    "DensityResult",
    "EigenResult",
    "EigenSAM",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "ParamSpace",
    "TraceResult",
    "__version__",
    "hessian_eigs",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lanczos_extremes",
    "power_iteration",
    "select_params",
    "slq",
    "spectral_density",
]

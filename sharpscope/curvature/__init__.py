"""The math: Hessian-vector products and the estimators built on them."""

from sharpscope.curvature.api import hessian_eigs, hessian_trace, spectral_density
from sharpscope.curvature.density import slq
from sharpscope.curvature.hvp import BACKENDS, HessianOperator, curvature_mode
from sharpscope.curvature.lanczos import lanczos, lanczos_extremes
from sharpscope.curvature.linop import LinearOperator, MatrixOperator
from sharpscope.curvature.params import ParamSpace, select_params
from sharpscope.curvature.power import power_iteration
from sharpscope.curvature.results import (
    DensityResult,
    EigenResult,
    Progress,
    Subspace,
    TraceResult,
)
from sharpscope.curvature.solvers import SOLVERS, SolveSettings
from sharpscope.curvature.trace import deflated_trace, hutchinson, hutchpp

__all__ = [
    "BACKENDS",
    "SOLVERS",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "ParamSpace",
    "Progress",
    "SolveSettings",
    "Subspace",
    "TraceResult",
    "curvature_mode",
    "deflated_trace",
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

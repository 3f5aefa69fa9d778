"""The math: Hessian-vector products and the estimators built on them."""

from sharpscope.curvature.api import hessian_eigs, hessian_trace, spectral_density
from sharpscope.curvature.density import slq
from sharpscope.curvature.gauss_newton import EmpiricalFisherOperator, FisherOperator, GGNOperator
from sharpscope.curvature.hvp import BACKENDS, HessianOperator
from sharpscope.curvature.lanczos import lanczos, lanczos_extremes
from sharpscope.curvature.linop import LinearOperator, MatrixOperator
from sharpscope.curvature.objective import Objective
from sharpscope.curvature.operator import CurvatureOperator, curvature_mode
from sharpscope.curvature.params import ParamSpace, select_params
from sharpscope.curvature.power import power_iteration
from sharpscope.curvature.registry import CURVATURES, curvature_operator
from sharpscope.curvature.results import (
    DensityResult,
    EigenResult,
    MultiplicityCheck,
    Progress,
    Subspace,
    TraceResult,
)
from sharpscope.curvature.solve_settings import SolveSettings
from sharpscope.curvature.solvers import SOLVERS
from sharpscope.curvature.trace import deflated_trace, hutchinson, hutchpp

__all__ = [
    "BACKENDS",
    "CURVATURES",
    "SOLVERS",
    "CurvatureOperator",
    "DensityResult",
    "EigenResult",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "MatrixOperator",
    "MultiplicityCheck",
    "Objective",
    "ParamSpace",
    "Progress",
    "SolveSettings",
    "Subspace",
    "TraceResult",
    "curvature_mode",
    "curvature_operator",
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

"""The names a user chooses among (solvers, curvature matrices, backends, dtypes), without the
code behind them: the command line declares and checks its options with these before it imports
torch (the modules that implement each name check that they match: tests/cli/test_startup.py)."""

from __future__ import annotations

SOLVER_NAMES: tuple[str, ...] = ("lanczos", "power", "pyhessian")
"""The eigen-solvers of :data:`sharpscope.curvature.SOLVERS`."""
CURVATURE_NAMES: tuple[str, ...] = ("hessian", "ggn", "fisher", "empirical-fisher")
"""The matrices of :data:`sharpscope.curvature.CURVATURES`."""
BACKENDS: tuple[str, ...] = ("double-backward", "forward-over-reverse", "finite-difference")
"""How the Hessian's products are taken (:class:`sharpscope.curvature.HessianOperator`)."""
BACKEND_CHOICES: tuple[str, ...] = (*BACKENDS, "auto")
"""The ``backend`` setting's values: a backend, or ``auto``, which chooses between double backward
and finite differences by memory (:func:`sharpscope.analysis.plan.chosen_backend`)."""
BASIS_DEVICES: tuple[str, ...] = ("device", "host")
"""Where Lanczos may keep its basis (:class:`~sharpscope.curvature.SolveSettings`)."""
BASIS_DEVICE_CHOICES: tuple[str, ...] = ("auto", *BASIS_DEVICES)
"""The ``basis_device`` setting's values: ``auto`` chooses by memory
(:func:`sharpscope.analysis.plan.basis_home`)."""
ADAPTIVE_KINDS: tuple[str, ...] = ("worst", "average")
"""The adaptive sharpness's cases (:mod:`sharpscope.analysis.adaptive_sharpness`)."""
ADAPTIVE_NORMS: tuple[str, ...] = ("l2", "linf")
"""Its balls."""
DTYPE_NAMES: tuple[str, ...] = ("float32", "float64", "bfloat16")
"""The floating-point types a model can be analysed in (``--dtype``; bfloat16 only when asked:
its products err by about 1e-2, docs/engine.md)."""
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
"""How a loss reduces a batch (``--reduction``; :class:`sharpscope.curvature.CurvatureOperator`)."""

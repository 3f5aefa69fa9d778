"""The names a fine-tuning run chooses among, and its optimizer's settings
(:class:`OptimizerSettings`, which :class:`~sharpscope.training.run_config.RunConfig` extends):
torch-free, so that ``finetune --help`` and its option errors never load torch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, dataclass
from typing import Any

from sharpscope.errors import InputError, check_choice, check_finite_fields
from sharpscope.io.load_spec import LoadSpec
from sharpscope.settings import like, setting

OPTIMIZERS: tuple[str, ...] = ("sgd", "sam", "asam", "eigen-sam")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
"""The optimizer and schedule names; :class:`OptimizerSettings` and
:class:`~sharpscope.training.run_config.RunConfig` check a run's, so the builders of
:mod:`sharpscope.training.optimizers` take them as valid."""
DEFAULT_RHO: dict[str, float] = {"sgd": 0.0, "sam": 0.05, "asam": 0.5, "eigen-sam": 0.05}
"""ρ when none is given: SAM's and Eigen-SAM's usual 0.05, ASAM's 0.5 (about 10× larger)."""
PRECISIONS: tuple[str, ...] = ("float32", "bf16")
"""How the training passes compute: in the weights' dtype, or under bfloat16 autocast (weights,
gradients and the tracker's and Eigen-SAM's products stay float32)."""
DEFAULT_EPOCHS = 10
MARKER = ".sharpscope-run"
"""The file that marks a folder as a run's (:mod:`sharpscope.training.run_dir`)."""


OPTIMIZE = "Optimizer"
TRACK = "Tracking"
SAVE = "Checkpoints"


def stored(fallback: Any, help: str, panel: str, **option: Any) -> Any:
    """A setting every stored run has (no default: a run's ``config.json`` without it is refused);
    ``fallback`` is a new run's when the caller gives none."""
    return setting(MISSING, help=help, panel=panel, fallback=fallback, **option)


def check_signs(settings: Any, positive: Iterable[str], non_negative: Iterable[str]) -> None:
    """Refuse a setting named in ``positive`` that is not above 0 (None is not given) and one in
    ``non_negative`` below 0."""
    for name in positive:
        value = getattr(settings, name)
        if value is not None and not value > 0:
            raise InputError(f"`{name}` must be positive, got {value}")
    for name in non_negative:
        if not getattr(settings, name) >= 0:
            raise InputError(f"`{name}` must be at least 0, got {getattr(settings, name)}")


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """SGD with momentum and weight decay, optionally wrapped by SAM, ASAM or Eigen-SAM
    (:func:`~sharpscope.training.optimizers.build_optimizer`); checked when made.

    Example:
        >>> s = OptimizerSettings(
        ...     optimizer="eigen-sam", lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.05,
        ...     alpha=0.2, eig_every=100, eig_steps=5, seed=0,
        ... )
        >>> s.rho, s.eig_every
        (0.05, 100)
    """

    optimizer: str = stored("sgd", ", ".join(OPTIMIZERS), OPTIMIZE, common=True)
    lr: float = stored(0.01, "Base learning rate.", OPTIMIZE, common=True)
    momentum: float = stored(0.9, "SGD momentum, also under SAM, ASAM and Eigen-SAM.", OPTIMIZE)
    weight_decay: float = stored(0.0, "SGD weight decay.", OPTIMIZE)
    rho: float = stored(
        None,
        f"Perturbation radius ρ; default {DEFAULT_RHO['sam']} (sam, eigen-sam), "
        f"{DEFAULT_RHO['asam']} (asam).",
        OPTIMIZE,
        common=True,
    )
    """A new run without one takes :data:`DEFAULT_RHO` of its optimizer."""
    alpha: float = stored(0.2, "Eigen-SAM's α, the weight of the eigenvector part.", OPTIMIZE)
    eig_every: int = stored(100, "Eigen-SAM: refresh the eigenvector every k steps.", OPTIMIZE)
    eig_steps: int = stored(5, "Eigen-SAM: Hessian-vector products per refresh.", OPTIMIZE)
    seed: int = like(LoadSpec, "seed", default=MISSING)

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        at_least_0 = ("momentum", "weight_decay", "rho", "alpha")
        check_signs(self, ("lr", "eig_every", "eig_steps"), at_least_0)

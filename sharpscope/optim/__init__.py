"""SAM-family optimizers and the perturbations they apply."""

from sharpscope.curvature.batchnorm import freeze_batchnorm_stats, frozen_batchnorm_stats
from sharpscope.optim.closures import micro_batch_closure
from sharpscope.optim.eigen_sam import EigenEstimate, EigenSAM
from sharpscope.optim.perturbations import (
    asam_perturbation,
    eigen_sam_perturbation,
    sam_perturbation,
)
from sharpscope.optim.sam import ASAM, SAM

__all__ = [
    "ASAM",
    "SAM",
    "EigenEstimate",
    "EigenSAM",
    "asam_perturbation",
    "eigen_sam_perturbation",
    "freeze_batchnorm_stats",
    "frozen_batchnorm_stats",
    "micro_batch_closure",
    "sam_perturbation",
]

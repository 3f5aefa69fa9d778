"""SAM-family optimizers and the perturbations they apply."""

from sharpscope.optim.perturbations import eigen_sam_perturbation, sam_perturbation

__all__ = ["eigen_sam_perturbation", "sam_perturbation"]

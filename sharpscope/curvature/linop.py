"""What the estimators need of an operator, and a dense one for tests and small problems."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear operator on flat vectors: ``matvec``, ``size``, ``dtype``, ``device``."""

    n_products: int

    @property
    def size(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


class MatrixOperator:
    """A symmetric matrix held densely, counting its products like :class:`HessianOperator`."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got {tuple(matrix.shape)}")
        self.matrix = matrix
        self.n_products = 0

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``matrix @ v``."""
        self.n_products += 1
        return self.matrix @ v

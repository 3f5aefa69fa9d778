"""What the estimators need of an operator, and a dense one for tests and small problems."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear operator on flat vectors: what every estimator takes.

    Attributes:
        n_products: How many products it has taken (estimators report their share).
        size: The length of its flat vectors.
        dtype: Its vectors' dtype.
        device: Its vectors' device.

    Examples:
        >>> import torch
        >>> isinstance(MatrixOperator(torch.eye(2)), LinearOperator)
        True
    """

    n_products: int

    @property
    def size(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...


class MatrixOperator:
    """A symmetric matrix held densely, counting its products like :class:`HessianOperator`.

    Args:
        matrix: A square (symmetric) matrix.

    Raises:
        ValueError: ``matrix`` is not square.

    Examples:
        >>> import torch
        >>> op = MatrixOperator(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> op.matvec(torch.tensor([1.0, 0.0])).tolist(), op.n_products
        ([2.0, 1.0], 1)
    """

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

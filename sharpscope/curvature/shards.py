"""Flat vectors sharded over ranks, as an FSDP2 model's parameters are: each rank holds its
pieces of every vector, reductions sum a rank's partial dot products over the ranks (scalars and
a basis's coefficients travel, never a vector), and a seeded random vector is the one a single
process draws, cut to this rank's pieces, so that a solver's results equal one process's.

An operator whose vectors are sharded says so with a ``shards`` attribute (:class:`Shards`); the
solvers read it through :func:`shards_of` and pass :meth:`Shards.sum` as the ``over`` of
:mod:`sharpscope.curvature.vectors`' reductions. Operators without it hold whole vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sharpscope import distributed
from sharpscope.curvature.linop import LinearOperator
from sharpscope.curvature.vectors import Kind, Over, random_vectors


def summed(partial: torch.Tensor) -> torch.Tensor:
    """``partial`` (this rank's dot products) summed over every rank in float64, in its own dtype
    and device: one all-reduce of ``partial.numel()`` scalars (the ``over`` of sharded vectors)."""
    total = distributed.sum_floats(partial.reshape(-1).tolist())
    return torch.tensor(total, dtype=partial.dtype, device=partial.device).reshape(partial.shape)


@dataclass(frozen=True)
class Shards:
    """How an operator's flat vectors are cut over the ranks of the default process group.

    Attributes:
        size: The length of a whole vector (the operator's ``size`` is this rank's pieces').
        cut: This rank's pieces of a whole flat vector (every rank passes the same one).
    """

    size: int
    cut: Callable[[torch.Tensor], torch.Tensor]

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """``partial`` (this rank's dot products) summed over every rank (:func:`summed`)."""
        return summed(partial)

    def draw(
        self, count: int, like: torch.Tensor, generator: torch.Generator, kind: Kind = "normal"
    ) -> torch.Tensor:
        """``count`` seeded random vectors (rows) of ``kind``: those :func:`random_vectors` draws
        for whole vectors of :attr:`size`, cut to this rank's pieces, in ``like``'s dtype and
        device. The whole vectors are drawn on the CPU in float64 (as many as ``count``, freed
        once cut)."""
        float64 = torch.empty(0, dtype=torch.float64)
        whole = random_vectors(count, self.size, float64, generator, kind)
        rows = [self.cut(row) for row in whole]
        return torch.stack(rows).to(dtype=like.dtype, device=like.device)


def shards_of(op: LinearOperator) -> Shards | None:
    """How ``op``'s flat vectors are sharded over ranks (its ``shards``), None when whole."""
    return getattr(op, "shards", None)


def over_of(op: LinearOperator) -> Over | None:
    """The ``over`` that ``op``'s vectors' reductions take: the sum over ranks of sharded ones."""
    shards = shards_of(op)
    return None if shards is None else shards.sum


def dimension(op: LinearOperator) -> int:
    """The length of ``op``'s whole flat vectors: its ``size``, or its shards' whole size."""
    shards = shards_of(op)
    return op.size if shards is None else shards.size


def draw(
    op: LinearOperator, count: int, generator: torch.Generator, kind: Kind = "normal"
) -> torch.Tensor:
    """``count`` seeded random flat vectors of ``op`` of ``kind`` (rows, its dtype and device):
    the same on every device, and cut to this rank's pieces where its vectors are sharded."""
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    shards = shards_of(op)
    if shards is None:
        return random_vectors(count, op.size, like, generator, kind)
    return shards.draw(count, like, generator, kind)

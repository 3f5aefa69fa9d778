"""This rank's pieces of an optimizer's parameters: the local shard of a parameter that FSDP2
(``torch.distributed.fsdp.fully_shard``) shards over the ranks, as a DTensor, or the whole
tensor; and the ``over`` that sums dot products of flat vectors over such pieces (the ranks',
for sharded parameters: scalars travel, never a vector)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.distributed.tensor import DTensor

from sharpscope import distributed
from sharpscope.curvature.sharded import shard_of
from sharpscope.curvature.shards import summed
from sharpscope.curvature.vectors import Over, shaped


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor ``t`` (its local tensor, sharing its storage outside
    autograd), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def reduction(params: Sequence[torch.Tensor]) -> Over | None:
    """How dot products over ``params``' pieces are summed: over every rank when ``fully_shard``
    shards all of them over all ranks (one mesh dimension), None when all are whole.

    Raises:
        ValueError: Some are sharded and some whole, or sharded over another mesh (HSDP)."""
    sharded = [isinstance(p, DTensor) for p in params]
    if not any(sharded):
        return None
    world = distributed.world_size()
    if not all(sharded) or any(p.device_mesh.shape != (world,) for p in params):
        raise ValueError(
            "sharded parameters take SAM's perturbation only when `fully_shard` shards every "
            f"trained parameter over all {world} rank(s) (one mesh dimension)"
        )
    return summed


def split(vec: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The flat vector ``vec`` as views shaped like ``params``' :func:`local` pieces, in order."""
    return shaped(vec, (local(p).shape for p in params))


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``tensors``' :func:`local` pieces as one flat vector, in order (:func:`split`'s inverse)."""
    return torch.cat([local(t).reshape(-1) for t in tensors])


def nonzero(vec: torch.Tensor, over: Over | None) -> bool:
    """Whether the flat vector ``vec`` has a nonzero entry (on any rank, summed ``over``)."""
    flag = vec.any().to(torch.float64)
    return bool((flag if over is None else over(flag)) > 0)


def cut(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``whole``, a tensor shaped like ``param`` (no communication)."""
    return shard_of(whole, param) if isinstance(param, DTensor) else whole


def adopted(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's piece, for ``param``, of ``t`` shaped like it: a whole tensor cut, a DTensor
    placed as ``param`` is (a collective only when placed otherwise; every rank calls it) or
    gathered whole for a whole ``param``."""
    if isinstance(t, DTensor):
        if not isinstance(param, DTensor):
            return t.full_tensor()
        return t.redistribute(param.device_mesh, param.placements).to_local()
    return cut(t, param)

"""The Hessian of a model whose parameters FSDP2 shards over the ranks
(``torch.distributed.fsdp.fully_shard``), on flat vectors sharded like the parameters: products
by central differences of gradients that FSDP2's reduce-scatter sums over the ranks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from sharpscope import distributed
from sharpscope.curvature.objective import Objective
from sharpscope.curvature.operator import CurvatureOperator
from sharpscope.curvature.shards import Shards
from sharpscope.curvature.vectors import dot
from sharpscope.errors import InputError


@contextlib.contextmanager
def summed_gradients(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 module of ``model`` reduce-scatters its gradients as a plain sum over the
    ranks while inside (divide factor 1, sum-only collectives; by default FSDP2 averages), and
    gets its own settings back afterwards."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDP2 has setters but no getters: its parameter groups hold what is restored
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups]
    for module in modules:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    try:
        yield
    finally:
        for group, (factor, force) in zip(groups, saved, strict=True):
            group.gradient_divide_factor, group.force_sum_reduction_for_comms = factor, force


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 module's gathered parameters, so that the model holds its shards as its
    parameters and the next forward gathers them as they are then: after a forward FSDP2 keeps
    the root module's gathered (to save a gather in the backward), so a forward that followed a
    shift of the shards would not see it."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local(whole: torch.Tensor, param: DTensor) -> torch.Tensor:
    """This rank's shard of ``whole``, a tensor shaped like the sharded ``param``, as ``param``'s
    own shard lies (no communication: every rank passes the same ``whole``)."""
    placed = whole.to(param.device)
    return distribute_tensor(
        placed, param.device_mesh, param.placements, src_data_rank=None
    ).to_local()


class ShardedHessianOperator(CurvatureOperator):
    """The Hessian of the mean loss over every rank's batches of a model sharded by FSDP2, as a
    linear operator on sharded flat vectors (data, weighting, parameters:
    :class:`~sharpscope.curvature.operator.CurvatureOperator`).

    Each rank holds its shard of the batches (as the data-parallel operator has it) and its shard
    of every parameter. A flat vector is this rank's pieces: each selected parameter's local
    shard (``to_local()``), flattened, in parameter order; :attr:`shards` cuts a whole vector so
    and sums dot products over the ranks, so that :func:`~sharpscope.curvature.lanczos.lanczos`
    runs on it as on one process. A product is the central difference
    (G(w + h v) − G(w − h v)) / 2h of the gradient G of the loss over all ranks' batches: each
    rank's weighted batch losses go backward and FSDP2's reduce-scatter, set to sum
    (:func:`summed_gradients`), adds every rank's contribution once, leaving this rank's shard
    of G in ``.grad``. The step is :meth:`step`'s, with the norms summed over the ranks as
    scalars, so every rank takes the same one; the weights' local shards move in place (the next
    forward all-gathers them) and are restored bit for bit; an embedding's ``padding_idx`` row,
    which autograd holds constant, is not moved (:meth:`_held_masks`). Every rank runs as many
    forwards and
    backwards as the rank with the most batches (:meth:`_pieces`): FSDP2's collectives go in
    lockstep.

    Args:
        objective: The model (its selected parameters sharded by ``fully_shard`` over every
            rank), loss, this rank's batches and the parameters (:class:`Objective`).
        step_scale: The step as a multiple of the base step (:meth:`step`); fixed, as the
            one-process backend's search for it (``HessianOperator.fd_scale``) is not done here.
        validate: Run the model and the loss on the first batch now (on every rank alike).

    Raises:
        InputError: A selected parameter is not sharded over all ranks by ``fully_shard``, the
            objective is not distributed over several ranks, or ``step_scale`` is not positive;
            as :class:`CurvatureOperator` otherwise.
    """

    curvature = "hessian"
    settings = ("step_scale",)
    second_order = False
    _rounds = 0
    """How many pieces every rank runs per pass (:meth:`_pieces`): the most any rank holds."""

    def __init__(
        self, objective: Objective, *, step_scale: float = 1.0, validate: bool = True
    ) -> None:
        if not (step_scale > 0 and math.isfinite(step_scale)):
            raise InputError(f"`step_scale` must be positive and finite, got {step_scale}")
        self.step_scale = step_scale
        reshard(objective.model)  # its parameters the shards, not a forward's gathered copies
        super().__init__(objective, cache_graph=False, validate=validate)
        reshard(self.model)  # the first batch's check left the root's gathered
        self._check_sharded()
        self.local_shapes = tuple(t.shape for t in self._locals())
        """The shapes of this rank's shards of the selected parameters, in order."""
        self.held = self._held_masks()
        """Embedding rows that products hold still (:meth:`_held_masks`)."""
        self.shards = Shards(self.space.size, self.cut)
        """How this operator's flat vectors lie over the ranks (:mod:`~sharpscope.curvature.
        shards`): the whole vectors' length and this rank's cut of one."""
        self._rounds = max(distributed.all_gather(sum(1 for _ in super()._pieces())))

    def _check_sharded(self) -> None:
        """Refuse what this operator cannot take: parameters not sharded over every rank, data
        not distributed."""
        world = distributed.world_size()
        for name, p in zip(self.space.names, self.space.params, strict=True):
            if not isinstance(p, DTensor) or p.device_mesh.shape != (world,):
                raise InputError(
                    f"the parameter `{name}` is not sharded over the {world} rank(s): shard the "
                    "model with `fully_shard` over all ranks (one mesh dimension) first, or use "
                    "HessianOperator"
                )
        if world > 1 and not self.distributed:
            raise InputError(
                "a sharded model's gradients are summed over the ranks, so each rank must hold "
                "its own shard of the data: pass `distributed` True"
            )

    @property
    def size(self) -> int:
        """The length of this rank's pieces of a flat vector."""
        return sum(math.prod(s) for s in self.local_shapes)

    @property
    def shape(self) -> tuple[int, int]:
        """The whole operator's shape (the whole vectors' length, twice)."""
        return (self.space.size, self.space.size)

    def _locals(self) -> list[torch.Tensor]:
        """This rank's shards of the selected parameters, sharing their storage (fetched anew:
        FSDP2 may re-point them on its first forward)."""
        with torch.no_grad():
            return [p.to_local() for p in self.space.params]

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        """This rank's flat pieces as views shaped like the local shards."""
        numels = [math.prod(s) for s in self.local_shapes]
        return [t.view(s) for t, s in zip(v.split(numels), self.local_shapes, strict=True)]

    def cut(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's pieces of the whole flat vector ``whole`` (no communication)."""
        parts = whole.split(list(self.space.numels))
        return torch.cat(
            [
                _local(part.reshape(p.shape), p).reshape(-1)
                for part, p in zip(parts, self.space.params, strict=True)
            ]
        )

    def _held_masks(self) -> list[tuple[int, torch.Tensor]]:
        """Each selected embedding weight with a ``padding_idx`` row, by its index, with this
        rank's shard of a mask that is 0 on that row: autograd holds the row constant (no
        gradient), so double backward's Hessian has no row or column for it and a product must
        not move it (as ``HessianOperator``'s finite differences do not)."""
        index = {id(p): i for i, p in enumerate(self.space.params)}
        masks = []
        for module in self.model.modules():
            held = isinstance(module, nn.Embedding) and module.padding_idx is not None
            if held and id(module.weight) in index:
                p = self.space.params[index[id(module.weight)]]
                mask = torch.ones(p.shape, dtype=self.dtype)
                mask[module.padding_idx] = 0
                masks.append((index[id(p)], _local(mask, p)))
        return masks

    @contextlib.contextmanager
    def shifted(self, delta: torch.Tensor | None) -> Iterator[None]:
        """The local shards moved by this rank's pieces ``delta`` in place while inside (every
        rank moves its own, so the model moves by the whole vector), restored bit for bit."""
        if delta is None:
            yield
            return
        reshard(self.model)
        saved = [t.clone() for t in self._locals()]
        try:
            with torch.no_grad():
                for t, d in zip(self._locals(), self._split(delta.to(self.dtype)), strict=True):
                    t.add_(d)
            yield
        finally:
            reshard(self.model)
            with torch.no_grad():  # the shards fetched anew: a first forward may re-point them
                for t, s in zip(self._locals(), saved, strict=True):
                    t.copy_(s)

    def _pieces(self) -> Iterator[tuple[float, Any, Any]]:
        """This rank's weighted batches or chunks (:meth:`CurvatureOperator._pieces`), then its
        first again at weight 0 until it has run as many as the rank with the most: every
        forward and backward gathers or scatters over all ranks."""
        count = 0
        for piece in super()._pieces():
            count += 1
            yield piece
        _, inputs, targets = next(super()._pieces())  # every rank holds a batch
        for _ in range(self._rounds - count):
            yield (0.0, inputs, targets)

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The mean loss over every rank's batches and this rank's pieces of its gradient, at the
        weights as they are: a forward and a backward per piece, the gradients summed over the
        ranks by FSDP2's reduce-scatter (:func:`summed_gradients`). Gradients the model held
        before are given back afterwards."""
        reshard(self.model)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        kept = [p.grad for p in trained]
        value = 0.0
        try:
            for p in trained:
                p.grad = None
            with summed_gradients(self.model), self.mode():
                for w, inputs, targets in self._pieces():
                    loss = w * self._batch_loss(inputs, targets, None)
                    value += float(loss.detach())
                    loss.backward()
            flat = torch.cat(
                [
                    (torch.zeros(s, dtype=self.dtype) if p.grad is None else p.grad.to_local())
                    .to(self.device)
                    .reshape(-1)
                    for p, s in zip(self.space.params, self.local_shapes, strict=True)
                ]
            )
        finally:
            for p, g in zip(trained, kept, strict=True):
                p.grad = g
        return self._reduced_float(value), flat

    def step(self, v: torch.Tensor) -> float:
        """The central difference's step for this rank's pieces ``v``: ``step_scale`` times the
        base step cbrt(eps)·max(1, ‖w‖)/‖v‖ of :meth:`HessianOperator._step`, both norms summed
        over the ranks in one all-reduce, so that every rank takes the same step."""
        local = [sum(dot(t.reshape(-1), t.reshape(-1)) for t in self._locals()), dot(v, v)]
        weights, vector = (math.sqrt(max(x, 0.0)) for x in distributed.sum_floats(local))
        eps = torch.finfo(self.dtype).eps
        base = eps ** (1 / 3) * max(1.0, weights) / max(vector, torch.finfo(self.dtype).tiny)
        return self.step_scale * base

    def _gradient_at(self, delta: torch.Tensor) -> torch.Tensor:
        """This rank's pieces of the gradient at the weights + ``delta`` (pieces)."""
        with self.shifted(delta):
            return self.loss_and_gradient()[1]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return this rank's pieces of ``H @ v`` for this rank's pieces ``v`` (every rank calls
        it with its own pieces of the same whole vector)."""
        if v.shape != (self.size,):
            raise ValueError(f"expected this rank's {self.size} pieces, got {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        if self.held:
            v = v.clone()
            parts = self._split(v)
            for i, mask in self.held:
                parts[i].mul_(mask)
        self.n_products += 1
        h = self.step(v)
        return (self._gradient_at(h * v) - self._gradient_at(-h * v)) / (2 * h)

"""The Hessian of a model whose parameters FSDP2 shards over the ranks
(``torch.distributed.fsdp.fully_shard``), on flat vectors sharded like the parameters: the
finite-difference backend's products, of gradients that FSDP2's reduce-scatter sums over the
ranks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from sharpscope import distributed
from sharpscope.curvature.hvp import HessianOperator
from sharpscope.curvature.objective import Objective
from sharpscope.curvature.shards import Shards
from sharpscope.curvature.vectors import distance, norm, shaped
from sharpscope.errors import InputError
from sharpscope.structures import call_model, sample_count


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


def settle(model: nn.Module) -> None:
    """Run FSDP2's lazy set-up of every parameter group of ``model`` now (it runs once, on the
    first forward otherwise): it may re-point a parameter's local shard into padded storage,
    which must not happen to shards an operator holds moved (:func:`~sharpscope.curvature.
    weight_shift.moved` restores the tensors it moved)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                group.lazy_init()


def shard_of(whole: torch.Tensor, param: DTensor) -> torch.Tensor:
    """This rank's shard of ``whole``, a tensor shaped like the sharded ``param``, as ``param``'s
    own shard lies (no communication: every rank passes the same ``whole``)."""
    placed = whole.to(param.device)
    return distribute_tensor(
        placed, param.device_mesh, param.placements, src_data_rank=None
    ).to_local()


def placed(piece: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``piece`` (shaped like ``param``'s local shard) as a DTensor placed like a sharded
    ``param`` (no communication), or itself for a whole ``param``."""
    if not isinstance(param, DTensor):
        return piece
    return DTensor.from_local(
        piece,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


class ShardedHessianOperator(HessianOperator):
    """The Hessian of the mean loss over every rank's batches of a model sharded by FSDP2, as a
    linear operator on sharded flat vectors: :class:`~sharpscope.curvature.hvp.HessianOperator`'s
    ``finite-difference`` backend in all but its vectors (data, weighting, parameters:
    :class:`~sharpscope.curvature.operator.CurvatureOperator`).

    Each rank holds its shard of the batches (as the data-parallel operator has it) and its shard
    of every parameter. A flat vector is this rank's pieces: each selected parameter's local
    shard (``to_local()``), flattened, in parameter order; :attr:`shards` cuts a whole vector so
    and sums dot products over the ranks, so that the estimators (:func:`~sharpscope.curvature.
    lanczos.lanczos`, power iteration, the traces, SLQ) run on it as on one process. A product
    is the central difference (G(w + h v) − G(w − h v)) / 2h of the gradient G of the loss over
    all ranks' batches: each rank's weighted batch losses go backward and FSDP2's
    reduce-scatter, set to sum (:func:`summed_gradients`), adds every rank's contribution once
    into this rank's shard of ``.grad``, which is a view of the product's buffer meanwhile
    (:meth:`_accumulate`). The step is searched by the first product and chosen again by
    :meth:`refine_step` as one process's (:attr:`fd_scale`, :attr:`fd_error`), with every norm
    and distance summed over the ranks as scalars, so every rank takes the same one; the local
    shards move in place without a copy (:func:`~sharpscope.curvature.weight_shift.moved`; the
    next forward all-gathers them) and are restored bit for bit; an embedding's
    ``padding_idx`` row, which autograd holds constant, is not moved (:meth:`_held_masks`).
    Every rank runs as many forwards and backwards as the rank with the most batches
    (:meth:`_pieces`): FSDP2's collectives go in lockstep.

    Args:
        objective: The model (its selected parameters sharded by ``fully_shard`` over every
            rank), loss, this rank's batches and the parameters (:class:`Objective`).
        step_scale: The step as a fixed multiple of the base step (:meth:`HessianOperator._step`)
            instead of the first product's search (None).
        filler: The inputs and targets this rank runs at weight 0 to keep in step with the
            others (:meth:`_pieces`); None: its first piece's. A rank may hold none of a data
            shard's samples (:func:`~sharpscope.analysis.sampling.shard_operators`):
            :meth:`replace` passes the filler on.
        validate: Run the model and the loss on the first batch now (on every rank alike).
        lean: The step search with one product's buffer (:class:`HessianOperator`'s ``lean``;
            None: as rank 0's free memory decides).

    Raises:
        InputError: A selected parameter is not sharded over all ranks by ``fully_shard``, the
            objective is not distributed over several ranks, or ``step_scale`` is not positive;
            as :class:`CurvatureOperator` otherwise.
    """

    settings = ("step_scale", "filler", "lean")
    cut_outputs = False
    _rounds = 0
    """How many pieces every rank runs per pass (:meth:`_pieces`): the most any rank holds."""

    def __init__(
        self,
        objective: Objective,
        *,
        step_scale: float | None = None,
        filler: tuple[Any, Any] | None = None,
        validate: bool = True,
        lean: bool | None = None,
    ) -> None:
        if step_scale is not None and not (step_scale > 0 and math.isfinite(step_scale)):
            raise InputError(f"`step_scale` must be positive and finite, got {step_scale}")
        self.step_scale = step_scale
        settle(objective.model)
        reshard(objective.model)  # its parameters the shards, not a forward's gathered copies
        super().__init__(
            objective, backend="finite-difference", cache_graph=False, validate=validate, lean=lean
        )
        self.fd_scale = step_scale
        reshard(self.model)  # the first batch's check left the root's gathered
        self._check_sharded()
        self.local_shapes = tuple(t.shape for t in self._weights())
        """The shapes of this rank's shards of the selected parameters, in order."""
        self.held = self._held_masks()
        """Embedding rows that products hold still (:meth:`_held_masks`)."""
        self.shards = Shards(self.space.size, self.cut)
        """How this operator's flat vectors lie over the ranks (:mod:`~sharpscope.curvature.
        shards`): the whole vectors' length and this rank's cut of one."""
        self._rounds = max(distributed.all_gather(sum(1 for _ in super()._pieces())))
        self.filler = filler if filler is not None else next(super()._pieces())[1:]
        """What this rank runs at weight 0 to keep in step (:meth:`_pieces`)."""

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

    def _weights(self) -> list[torch.Tensor]:
        """This rank's shards of the selected parameters, sharing their storage."""
        with torch.no_grad():
            return [p.to_local() for p in self.space.params]

    def _parts(self, v: torch.Tensor) -> list[torch.Tensor]:
        """This rank's flat pieces as views shaped like the local shards."""
        return shaped(v, self.local_shapes)

    def cut(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's pieces of the whole flat vector ``whole`` (no communication)."""
        parts = whole.split(list(self.space.numels))
        return torch.cat(
            [
                shard_of(part.reshape(p.shape), p).reshape(-1)
                for part, p in zip(parts, self.space.params, strict=True)
            ]
        )

    def _held_masks(self) -> list[tuple[int, torch.Tensor]]:
        """Each selected embedding weight with a ``padding_idx`` row, by its index, with this
        rank's shard of a mask that is 0 on that row: autograd holds the row constant (no
        gradient), so double backward's Hessian has no row or column for it and a product must
        not move it (as ``HessianOperator``'s finite differences do not)."""
        masks = []
        for i, row in self._padding_rows():
            p = self.space.params[i]
            mask = torch.ones(p.shape, dtype=self.dtype)
            mask[row] = 0
            masks.append((i, shard_of(mask, p)))
        return masks

    def _held(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``vs`` (this rank's pieces, shaped) less the rows autograd holds constant: each rank
        masks its shard of them (:meth:`_held_masks`)."""
        vs = list(vs)
        for i, mask in self.held:
            vs[i] = vs[i] * mask
        return vs

    @contextlib.contextmanager
    def _moved(self, parts: Sequence[torch.Tensor], scale: float) -> Iterator[None]:
        """The local shards moved by ``scale`` × this rank's ``parts`` in place while inside
        (every rank moves its own, so the model moves by the whole vector), restored bit for bit;
        the gathered copies are freed before and after, so forwards gather the shards as they
        then are."""
        reshard(self.model)
        try:
            with super()._moved(parts, scale):
                yield
        finally:
            reshard(self.model)

    def _pieces(self) -> Iterator[tuple[float, Any, Any]]:
        """This rank's weighted batches or chunks (:meth:`CurvatureOperator._pieces`), then its
        :attr:`filler` at weight 0 until it has run as many as the rank with the most: every
        forward and backward gathers or scatters over all ranks."""
        count = 0
        for piece in super()._pieces():
            count += 1
            yield piece
        for _ in range(self._rounds - count):
            yield (0.0, *self.filler)

    def chunk_losses(
        self, sizes: Sequence[int | None], delta: torch.Tensor | None = None
    ) -> list[list[float]]:
        """:meth:`CurvatureOperator.chunk_losses` of this rank's batches, one forward per chunk
        (:attr:`cut_outputs` off: whether a cut succeeds is known only after a forward), then its
        :attr:`filler` until it has run as many forwards as the rank with the most, counted
        before the first: every forward gathers over all ranks, all inside the same shift."""
        own = 0
        for size, (inputs, _) in zip(sizes, self.batches, strict=True):
            samples = sample_count(inputs, "batch")
            own += 1 if size is None or size >= samples else -(-samples // size)
        rounds = max(distributed.all_gather(own))
        with self.shifted(delta):
            found = super().chunk_losses(sizes)
            with torch.no_grad(), self.mode():
                for _ in range(rounds - own):
                    call_model(self.model, self.filler[0])
        return found

    def _grad_slots(
        self, total: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Every trained parameter, and its ``.grad`` while :meth:`_accumulate` runs: for a
        selected one a sharded tensor whose local shard is its view of ``total``, into which
        FSDP2's reduce-scatter, set to sum (:meth:`_backward_scope`), adds every rank's
        contribution in place; None for the others (a backward reaches them all)."""
        reshard(self.model)  # after a forward the root's parameters are its gathered copies
        views = {
            id(p): placed(view, p)
            for p, view in zip(self.space.params, self._parts(total), strict=True)
        }
        trained = [p for p in self.model.parameters() if p.requires_grad]
        return trained, [views.get(id(p)) for p in trained]

    def _backward_scope(self) -> contextlib.AbstractContextManager[None]:
        """FSDP2's reduce-scatter sums over the ranks (:func:`summed_gradients`)."""
        return summed_gradients(self.model)

    def _backward(self, loss: torch.Tensor) -> None:
        """One backward through FSDP2's hooks: its graph's leaves are the gathered parameters,
        not the sharded ones, so it takes no ``inputs``."""
        loss.backward()

    def _reduced(self, local: torch.Tensor) -> torch.Tensor:
        """``local`` itself: a product or gradient is this rank's shard of the sum over all ranks
        already (FSDP2's reduce-scatter added every rank's contribution once)."""
        return local

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """‖a − b‖ of two products, summed over the ranks as one scalar."""
        return distance(a, b, over=self.shards.sum)

    def _length(self, a: torch.Tensor) -> float:
        """‖a‖ of a product, summed over the ranks as one scalar."""
        return norm(a, self.shards.sum)

"""What every curvature matrix of a model's loss shares: the data and its weighting, the
parameters and flat vectors, counted and all-reduced products, the gradient and the loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from sharpscope import distributed as _distributed
from sharpscope.batches import LossFn, batch_size, loss_weight, move_to
from sharpscope.curvature.attention import twice_differentiable
from sharpscope.curvature.batchnorm import batchnorm_layers, freeze_batchnorm_stats
from sharpscope.curvature.params import ParamSpace, select_params
from sharpscope.structures import call_model, sample_count, split, split_outputs


@contextlib.contextmanager
def curvature_mode(model: nn.Module, batch_stats: bool = False) -> Iterator[None]:
    """Put ``model`` in eval mode (BatchNorm on batch statistics if asked) with attention that can
    be differentiated twice (:func:`~sharpscope.curvature.attention.twice_differentiable`), then
    restore all modes and settings.

    With ``batch_stats`` the BatchNorm layers normalise with the statistics of the batch and leave
    their running statistics untouched. Every forward whose loss a curvature figure describes
    (products, gradients, losses, accuracy, probe and validation metrics) runs in this mode, so
    they all see one function.
    """
    modes = [(m, m.training) for m in model.modules()]
    with contextlib.ExitStack() as undo:
        try:
            undo.enter_context(twice_differentiable())
            model.eval()
            if batch_stats:
                undo.callback(freeze_batchnorm_stats(model))
                for m in batchnorm_layers(model):
                    m.train()
            yield
        finally:
            for m, flag in modes:
                m.training = flag


class CurvatureOperator:
    """A curvature matrix of the mean loss over all of ``batches``, as a linear operator; a
    subclass says which matrix by its ``_local_matvec`` (and ``curvature``, its name).

    ``loss_fn(model(inputs), targets)`` must return the mean loss of a batch; the model is called
    as :func:`~sharpscope.structures.call_model` does (``model(**inputs)`` for a dict). The
    operator weights each batch by the number of terms its mean is over
    (:func:`~sharpscope.batches.loss_weight`: samples, or predicted tokens for a token loss), so
    one batch of 256 and four of 64 give the same matrix, and so do batches with different
    numbers of tokens. Vectors are flat, in the order of
    :class:`~sharpscope.curvature.params.ParamSpace`, over the parameters that the globs
    ``params`` select less those ``exclude`` leaves out (see :func:`select_params`).

    With ``cache_graph`` (default) what products reuse is built once for all batches, which costs
    the memory of all batches' activations. With ``distributed`` (default: when a
    torch.distributed process group is initialised) each rank passes its own shard of the batches
    and the operator is that of all ranks' batches together: weights use the global count, and
    ``matvec``, ``gradient`` and ``loss`` all-reduce their weighted local sums (one all-reduce
    each), so every rank gets the same result.
    """

    curvature: ClassVar[str]
    """The matrix's name in reports (``hessian``, ``ggn``, ...)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Any, Any]],
        params: Sequence[str] | str | None = None,
        *,
        exclude: Sequence[str] | str | None = None,
        batch_stats: bool = False,
        cache_graph: bool = True,
        distributed: bool | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.space: ParamSpace = select_params(model, params, exclude)
        self.batches = list(batches)
        self.distributed = _distributed.is_distributed() if distributed is None else distributed
        self.units = [loss_weight(loss_fn, b) for b in self.batches]
        """The terms each local batch's mean loss is over."""
        samples = sum(batch_size(b) for b in self.batches)
        counts = self._global_counts([samples, sum(self.units), len(self.batches)])
        self.num_samples, total, self.num_batches = counts
        if self.num_samples == 0 or total == 0:
            raise ValueError(
                f"no data: the {self.curvature} needs at least one sample (and one label)"
            )
        self.num_terms = total
        """The terms the mean loss is over, on all ranks: samples, or labelled tokens."""
        self.weights = [u / total for u in self.units]
        self.batch_stats = batch_stats
        self.cache_graph = cache_graph
        self.n_products = 0

    def restricted(
        self,
        batches: Sequence[tuple[Any, Any]] | None = None,
        params: Sequence[str] | None = None,
        **changes: Any,
    ) -> CurvatureOperator:
        """The same kind of operator, with the same settings but ``changes`` (keyword arguments of
        the constructor), on other ``batches`` or over other ``params`` (names or globs)."""
        settings = {**self._settings(), **changes}
        return type(self)(
            self.model,
            self.loss_fn,
            self.batches if batches is None else batches,
            list(self.space.names) if params is None else params,
            **settings,
        )

    def _settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments that made this operator (``exclude`` aside)."""
        return {
            "batch_stats": self.batch_stats,
            "cache_graph": self.cache_graph,
            "distributed": self.distributed,
        }

    def _global_counts(self, counts: list[int]) -> list[int]:
        """Counts summed over all ranks (one all-reduce when distributed)."""
        if not self.distributed:
            return counts
        local = torch.tensor(counts, dtype=torch.int64, device=self.device)
        return [int(c) for c in _distributed.all_reduce_sum(local).tolist()]

    def _reduced(self, local: torch.Tensor) -> torch.Tensor:
        """The sum of ``local`` over all ranks when distributed (``local`` itself otherwise)."""
        return _distributed.all_reduce_sum(local) if self.distributed else local

    def _reduced_float(self, local: float | torch.Tensor) -> float:
        """A scalar summed over all ranks when distributed, as a Python float."""
        if not self.distributed:
            return float(local)
        total = torch.tensor(float(local), dtype=torch.float64, device=self.device)
        return float(self._reduced(total))

    @property
    def size(self) -> int:
        return self.space.size

    @property
    def dtype(self) -> torch.dtype:
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        return self.space.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    def _placed(self) -> Iterator[tuple[float, Any, Any]]:
        """Each batch's weight, inputs and targets on the operator's device and dtype."""
        for w, (inputs, targets) in zip(self.weights, self.batches, strict=True):
            yield (
                w,
                move_to(inputs, self.device, self.dtype),
                move_to(targets, self.device, self.dtype),
            )

    def _checked_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if loss.ndim != 0:
            raise ValueError(
                f"the loss must be a scalar (mean over the batch), got {tuple(loss.shape)}"
            )
        return loss

    def _batch_loss(
        self, inputs: Any, targets: Any, params: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """The mean loss of one batch, at the model's weights or at ``params`` (by name)."""
        with curvature_mode(self.model, self.batch_stats):
            outputs = call_model(self.model, inputs, params)
            return self._checked_loss(self.loss_fn(outputs, targets))

    def _batch_losses(self) -> Iterator[torch.Tensor]:
        """The weighted loss of each batch, with autograd recording."""
        for w, inputs, targets in self._placed():
            yield w * self._batch_loss(inputs, targets, None)

    def _grad(self, loss: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(
            loss, self.space.params, create_graph=create_graph, allow_unused=True
        )
        return [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads, self.space.params, strict=True)
        ]

    def _flat(self, parts: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Parameter-shaped tensors as one flat vector, zeros where a part is None (unused)."""
        return torch.cat(
            [
                (torch.zeros_like(p) if t is None else t).reshape(-1)
                for t, p in zip(parts, self.space.params, strict=True)
            ]
        )

    def release(self) -> None:
        """Free what products reuse (it is rebuilt on the next product)."""

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``M @ v`` for a flat vector ``v`` (summed over all ranks when distributed)."""
        if v.shape != (self.size,):
            raise ValueError(f"expected a flat vector of length {self.size}, got {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        vs = self.space.split(v)
        self.n_products += 1
        return self._reduced(self._local_matvec(vs))

    def _local_matvec(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's weighted sum of the batches' products with ``vs`` (parameter-shaped)."""
        raise NotImplementedError

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss over all batches (no product is counted)."""
        return self.loss_and_gradient()[1]

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The mean loss and its flat gradient over all batches at the weights as they are now
        (never from a cached graph), one forward and one backward pass per batch."""
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        value = 0.0
        for loss in self._batch_losses():
            value += float(loss.detach())
            total += torch.cat([g.reshape(-1) for g in self._grad(loss, create_graph=False)])
        return self._reduced_float(value), self._reduced(total)

    def loss(self, delta: torch.Tensor | None = None) -> float:
        """The mean loss over all batches at the current weights, or at weights + ``delta``.

        The shift is applied in place and the weights are restored bit for bit afterwards (this also
        works for TorchScript modules, which ``torch.func`` cannot call); what products reuse is
        dropped, as autograd refuses a graph whose weights were modified in place.
        """
        with torch.no_grad(), self.shifted(delta):
            local = sum(w * float(self._batch_loss(x, y, None)) for w, x, y in self._placed())
        return self._reduced_float(local)

    def chunk_losses(
        self, sizes: Sequence[int | None], delta: torch.Tensor | None = None
    ) -> list[list[float]]:
        """For each of this rank's batches, the mean losses of its consecutive chunks of
        ``sizes[i]`` samples (None: the whole batch), at the weights + ``delta`` (see :meth:`loss`):
        one forward per batch, its outputs cut as its inputs (:func:`split_outputs`), or, once
        they cannot be (a loss the model computed), one forward per chunk."""
        found: list[list[float]] = []
        whole = True  # one forward per batch until the outputs refuse to be cut
        with torch.no_grad(), self.shifted(delta), curvature_mode(self.model, self.batch_stats):
            for size, (_, inputs, targets) in zip(sizes, self._placed(), strict=True):
                samples = 0 if size is None else sample_count(inputs, "batch")
                if size is None or size >= samples:
                    chunks, outputs = [(inputs, targets)], [call_model(self.model, inputs)]
                else:
                    chunks = list(zip(split(inputs, size), targets.split(size), strict=True))
                    cut = None
                    if whole:
                        cut = split_outputs(call_model(self.model, inputs), samples, size)
                        whole = cut is not None
                    outputs = cut or [call_model(self.model, x) for x, _ in chunks]
                found.append(
                    [
                        float(self._checked_loss(self.loss_fn(out, y)))
                        for out, (_, y) in zip(outputs, chunks, strict=True)
                    ]
                )
        return found

    @contextlib.contextmanager
    def shifted(self, delta: torch.Tensor | None) -> Iterator[None]:
        """The weights moved by the flat ``delta`` in place while inside, restored bit for bit
        afterwards (what products reuse is dropped); nothing moves for None."""
        if delta is None:
            yield
            return
        saved = [p.detach().clone() for p in self.space.params]
        self.release()
        try:
            parts = self.space.split(delta.to(device=self.device, dtype=self.dtype))
            with torch.no_grad():
                for p, d in zip(self.space.params, parts, strict=True):
                    p.add_(d)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.space.params, saved, strict=True):
                    p.copy_(s)

"""Hessian-vector products of a model's loss, exact over all given batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from sharpscope import distributed as _distributed
from sharpscope.batches import LossFn, batch_size, move_to
from sharpscope.curvature.attention import derivatives_explained, twice_differentiable
from sharpscope.curvature.batchnorm import batchnorm_layers, freeze_batchnorm_stats
from sharpscope.curvature.params import ParamSpace, select_params

Backend = Literal["double-backward", "forward-over-reverse"]
BACKENDS: tuple[str, ...] = ("double-backward", "forward-over-reverse")


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


class HessianOperator:
    """The Hessian of the sample-weighted mean loss over ``batches``, as a linear operator.

    ``loss_fn(model(inputs), targets)`` must return the mean loss of a batch; the operator weights
    each batch by its number of samples, so one batch of 256 and four of 64 give the same Hessian.
    Vectors are flat, in the order of :class:`~sharpscope.curvature.params.ParamSpace`.

    ``backend="double-backward"`` differentiates the gradient graph a second time; with
    ``cache_graph`` (default) that graph is built once for all batches and reused by every
    product, which costs the memory of all batches' activations. ``"forward-over-reverse"`` uses
    ``torch.func.jvp`` of ``torch.func.grad`` and keeps nothing between products.

    Every forward runs under :func:`~sharpscope.curvature.attention.twice_differentiable`
    (attention on torch's math kernel, which has second derivatives); a product through an
    operation without the derivative its backend needs raises a one-line ``InputError``.

    With ``distributed`` (default: when a torch.distributed process group is initialised) each
    rank passes its own shard of the batches and the operator is that of all ranks' batches
    together: weights use the global sample count, and ``matvec``, ``gradient`` and ``loss``
    all-reduce their weighted local sums (one all-reduce each), so every rank gets the same result.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Any, Any]],
        params: Sequence[str] | str | None = None,
        *,
        backend: Backend = "double-backward",
        batch_stats: bool = False,
        cache_graph: bool = True,
        distributed: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.model = model
        self.loss_fn = loss_fn
        self.space: ParamSpace = select_params(model, params)
        self.batches = list(batches)
        self.distributed = _distributed.is_distributed() if distributed is None else distributed
        sizes = [batch_size(b) for b in self.batches]
        total, self.num_batches = self._global_counts(sum(sizes), len(self.batches))
        if total == 0:
            raise ValueError("no data: the Hessian needs at least one sample")
        self.num_samples = total
        self.weights = [s / total for s in sizes]
        self.backend = backend
        self.batch_stats = batch_stats
        self.cache_graph = cache_graph and backend == "double-backward"
        self.n_products = 0
        self._graph: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def _global_counts(self, samples: int, batches: int) -> tuple[int, int]:
        """The sample and batch counts of all ranks together (one all-reduce when distributed)."""
        if not self.distributed:
            return samples, batches
        counts = torch.tensor([samples, batches], dtype=torch.int64, device=self.device)
        total, n = _distributed.all_reduce_sum(counts).tolist()
        return int(total), int(n)

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

    def _batch_loss(
        self, inputs: Any, targets: Any, params: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """The mean loss of one batch, at the model's weights or at ``params`` (by name)."""
        with curvature_mode(self.model, self.batch_stats):
            outputs = (
                self.model(inputs)
                if params is None
                else functional_call(self.model, params, (inputs,))
            )
            loss = self.loss_fn(outputs, targets)
        if loss.ndim != 0:
            raise ValueError(
                f"the loss must be a scalar (mean over the batch), got {tuple(loss.shape)}"
            )
        return loss

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

    def _second(
        self, grads: list[torch.Tensor], vs: list[torch.Tensor], retain: bool
    ) -> list[torch.Tensor]:
        """Differentiate ``<grads, vs>`` once more; gradients constant in the weights give 0."""
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        out = [torch.zeros_like(p) for p in self.space.params]
        if not live:
            return out
        with derivatives_explained():
            hv = torch.autograd.grad(
                [grads[i] for i in live],
                self.space.params,
                grad_outputs=[vs[i] for i in live],
                retain_graph=retain,
                allow_unused=True,
            )
        return [o if h is None else h for o, h in zip(out, hv, strict=True)]

    def _cached_graph(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._graph is None:
            total = sum(self._batch_losses())
            self._graph = (total, self._grad(total, create_graph=True))
        return self._graph

    def release(self) -> None:
        """Free the cached gradient graph (it is rebuilt on the next product)."""
        self._graph = None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``H @ v`` for a flat vector ``v`` (summed over all ranks when distributed)."""
        if v.shape != (self.size,):
            raise ValueError(f"expected a flat vector of length {self.size}, got {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        vs = self.space.split(v)
        self.n_products += 1
        return self._reduced(self._local_matvec(vs))

    def _local_matvec(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's weighted sum of the batches' Hessian-vector products."""
        if self.backend == "forward-over-reverse":
            return self._matvec_functional(vs)
        if self.cache_graph:
            return torch.cat(
                [h.reshape(-1) for h in self._second(self._cached_graph()[1], vs, True)]
            )
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for loss in self._batch_losses():
            grads = self._grad(loss, create_graph=True)
            total += torch.cat([h.reshape(-1) for h in self._second(grads, vs, False)])
        return total

    def _matvec_functional(self, vs: list[torch.Tensor]) -> torch.Tensor:
        names = self.space.names
        primals = {n: p.detach() for n, p in zip(names, self.space.params, strict=True)}
        tangents = dict(zip(names, vs, strict=True))
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for w, inputs, targets in self._placed():

            def loss_of(
                p: dict[str, torch.Tensor], x: Any = inputs, y: Any = targets
            ) -> torch.Tensor:
                return self._batch_loss(x, y, p)

            with torch.no_grad(), derivatives_explained():
                _, hv = jvp(grad(loss_of), (primals,), (tangents,))
            total += w * self.space.flatten(hv)
        return total

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss over all batches (no product is counted)."""
        if self.cache_graph:
            return self._reduced(
                torch.cat([g.detach().reshape(-1) for g in self._cached_graph()[1]])
            )
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for loss in self._batch_losses():
            total += torch.cat([g.reshape(-1) for g in self._grad(loss, create_graph=False)])
        return self._reduced(total)

    def loss(self, delta: torch.Tensor | None = None) -> float:
        """The mean loss over all batches at the current weights, or at weights + ``delta``.

        The shift is applied in place and the weights are restored bit for bit afterwards (this also
        works for TorchScript modules, which ``torch.func`` cannot call); a cached gradient graph
        is dropped, as autograd refuses a graph whose weights were modified in place.
        """
        if delta is None and self.cache_graph:
            return self._reduced_float(self._cached_graph()[0].detach())
        with torch.no_grad(), self._shifted(delta):
            local = sum(w * float(self._batch_loss(x, y, None)) for w, x, y in self._placed())
        return self._reduced_float(local)

    @contextlib.contextmanager
    def _shifted(self, delta: torch.Tensor | None) -> Iterator[None]:
        if delta is None:
            yield
            return
        saved = [p.detach().clone() for p in self.space.params]
        self.release()
        try:
            parts = self.space.split(delta.to(device=self.device, dtype=self.dtype))
            for p, d in zip(self.space.params, parts, strict=True):
                p.add_(d)
            yield
        finally:
            for p, s in zip(self.space.params, saved, strict=True):
                p.copy_(s)

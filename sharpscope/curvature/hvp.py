"""Hessian-vector products of a model's loss, exact over all given batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import grad, jvp

from sharpscope import distributed as _distributed
from sharpscope.batches import LossFn, batch_size, loss_weight, move_to
from sharpscope.curvature.attention import derivatives_explained, twice_differentiable
from sharpscope.curvature.batchnorm import batchnorm_layers, freeze_batchnorm_stats
from sharpscope.curvature.params import ParamSpace, select_params
from sharpscope.curvature.vectors import norm
from sharpscope.errors import InputError
from sharpscope.structures import call_model

FUNC_CHECK_ULPS = 200
"""How far (in units of the dtype's epsilon, relative) forward-over-reverse's first product may
be from double backward's before it is refused; rounding gives 1-3 units on the test models."""
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
    """The Hessian of the mean loss over all of ``batches``, as a linear operator.

    ``loss_fn(model(inputs), targets)`` must return the mean loss of a batch; the model is called
    as :func:`~sharpscope.structures.call_model` does (``model(**inputs)`` for a dict). The
    operator weights each batch by the number of terms its mean is over
    (:func:`~sharpscope.batches.loss_weight`: samples, or predicted tokens for a token loss), so
    one batch of 256 and four of 64 give the same Hessian, and so do batches with different
    numbers of tokens. Vectors are flat, in the order of
    :class:`~sharpscope.curvature.params.ParamSpace`, over the parameters that the globs
    ``params`` select less those ``exclude`` leaves out (see :func:`select_params`).

    ``backend="double-backward"`` differentiates the gradient graph a second time; with
    ``cache_graph`` (default) that graph is built once for all batches and reused by every
    product, which costs the memory of all batches' activations. ``"forward-over-reverse"`` uses
    ``torch.func.jvp`` of ``torch.func.grad`` and keeps nothing between products.

    Every forward runs under :func:`~sharpscope.curvature.attention.twice_differentiable`
    (attention on torch's math kernel, which has second derivatives); a product through an
    operation without the derivative its backend needs raises a one-line ``InputError``.

    With ``distributed`` (default: when a torch.distributed process group is initialised) each
    rank passes its own shard of the batches and the operator is that of all ranks' batches
    together: weights use the global count, and ``matvec``, ``gradient`` and ``loss``
    all-reduce their weighted local sums (one all-reduce each), so every rank gets the same result.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Iterable[tuple[Any, Any]],
        params: Sequence[str] | str | None = None,
        *,
        exclude: Sequence[str] | str | None = None,
        backend: Backend = "double-backward",
        batch_stats: bool = False,
        cache_graph: bool = True,
        distributed: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.model = model
        self.loss_fn = loss_fn
        self.space: ParamSpace = select_params(model, params, exclude)
        self.batches = list(batches)
        self.distributed = _distributed.is_distributed() if distributed is None else distributed
        units = [loss_weight(loss_fn, b) for b in self.batches]
        samples = sum(batch_size(b) for b in self.batches)
        counts = self._global_counts([samples, sum(units), len(self.batches)])
        self.num_samples, total, self.num_batches = counts
        if self.num_samples == 0 or total == 0:
            raise ValueError("no data: the Hessian needs at least one sample (and one label)")
        self.num_terms = total
        """The terms the mean loss is over, on all ranks: samples, or labelled tokens."""
        self.weights = [u / total for u in units]
        self.backend = backend
        self.batch_stats = batch_stats
        self.cache_graph = cache_graph and backend == "double-backward"
        self.n_products = 0
        self._functional_checked = False
        self._graph: tuple[torch.Tensor, list[torch.Tensor]] | None = None

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

    def _batch_loss(
        self, inputs: Any, targets: Any, params: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """The mean loss of one batch, at the model's weights or at ``params`` (by name)."""
        with curvature_mode(self.model, self.batch_stats):
            outputs = call_model(self.model, inputs, params)
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
            product = self._matvec_functional(vs)
            if not self._functional_checked:
                self._check_functional(product, self._matvec_autograd(vs))
            return product
        return self._matvec_autograd(vs)

    def _check_functional(self, product: torch.Tensor, reference: torch.Tensor) -> None:
        """Refuse forward-over-reverse when its first product differs from double backward's on
        the same vector beyond rounding: ``torch.func`` second derivatives are wrong through some
        models' layers (BERT's among them on torch 2.13, docs/engine.md). Compared after the
        all-reduce, so every rank decides alike."""
        difference = norm(self._reduced(product - reference))
        scale = norm(self._reduced(reference))
        tol = FUNC_CHECK_ULPS * torch.finfo(self.dtype).eps
        if difference > tol * max(scale, torch.finfo(self.dtype).tiny):
            raise InputError(
                "`backend` forward-over-reverse gives wrong Hessian-vector products on this "
                f"model ({difference / scale:.1e} relative to double backward, a torch.func error "
                "through its layers); use `backend` double-backward"
            )
        self._functional_checked = True

    def _matvec_autograd(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's product by double backward (through the cached graph if kept)."""
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

"""What every curvature matrix of a model's loss shares: the data and its weighting, the
parameters and flat vectors, counted and all-reduced products, the gradient and the loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from sharpscope import distributed as _distributed
from sharpscope.batches import LossFn, batch_size, loss_weight, move_to
from sharpscope.choices import REDUCTIONS
from sharpscope.curvature.attention import python_layers, twice_differentiable
from sharpscope.curvature.batchnorm import batchnorm_layers, freeze_batchnorm_stats
from sharpscope.curvature.checkpointing import checkpointed
from sharpscope.curvature.forwards import own_forwards
from sharpscope.curvature.objective import Objective
from sharpscope.curvature.params import ParamSpace, select_params
from sharpscope.curvature.weight_shift import moved
from sharpscope.errors import InputError
from sharpscope.io.user_code import one_line
from sharpscope.structures import (
    call_model,
    concat,
    leaves,
    sample_count,
    split,
    split_outputs,
    styled,
)
from sharpscope.structures import input_style as input_style_for

_Op = TypeVar("_Op", bound="CurvatureOperator")

PROBE_TOL = 1e-3
"""How far (relative) a batch's loss may be from its halves' combination and still fit it."""


def check_adds_to_a_run(objective: Objective) -> bool:
    """Whether an operator's first-batch check (``validate``) finds more than running the first
    batch through the model and the loss in eval mode (as the command line's loading does): it
    does in another mode (``batch_stats``) or for a loss that does not state ``reduction`` as its
    own (whose halves it compares)."""
    declared = getattr(objective.loss_fn, "reduction", None)
    return objective.batch_stats or declared != objective.reduction


def _close(value: float, fit: float) -> bool:
    return abs(value - fit) <= PROBE_TOL * max(abs(value), abs(fit), 1e-30)


@contextlib.contextmanager
def curvature_mode(
    model: nn.Module,
    batch_stats: bool = False,
    *,
    second_order: bool = True,
    checkpointing: bool = False,
) -> Iterator[None]:
    """Put ``model`` in eval mode (BatchNorm on batch statistics if asked) with attention that can
    be differentiated twice (:func:`~sharpscope.curvature.attention.twice_differentiable`; with
    ``second_order`` off, on the kernel torch picks: :func:`~sharpscope.curvature.attention.
    python_layers`), its modules' own ``forward`` where accelerate patched in autocast
    (:func:`~sharpscope.curvature.forwards.own_forwards`), and its layers checkpointed if asked
    (:func:`~sharpscope.curvature.checkpointing.checkpointed`), then restore all modes and
    settings.

    With ``batch_stats`` the BatchNorm layers normalise with the statistics of the batch and leave
    their running statistics untouched. Every forward whose loss a curvature figure describes
    (products, gradients, losses, accuracy, probe and validation metrics) runs in this mode, so
    they all see one function.

    Args:
        model: The model to switch.
        batch_stats: BatchNorm layers on the batch's statistics instead of their running ones.
        second_order: Attention on a kernel with second derivatives (the math kernel).
        checkpointing: Hugging Face activation checkpointing, non-reentrant.

    Returns:
        A context manager; leaving it restores every module's mode.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> with curvature_mode(model, batch_stats=True):
        ...     model.training, model[1].training
        (False, True)
        >>> model.training
        True
    """
    modes = [(m, m.training) for m in model.modules()]

    def restore_modes() -> None:
        for m, flag in modes:
            m.training = flag

    with contextlib.ExitStack() as undo:
        undo.callback(restore_modes)  # last, after what the others restore
        undo.enter_context(twice_differentiable() if second_order else python_layers())
        undo.enter_context(own_forwards(model))
        model.eval()
        if batch_stats:
            undo.callback(freeze_batchnorm_stats(model))
            for m in batchnorm_layers(model):
                m.train()
        if checkpointing:
            undo.enter_context(checkpointed(model))
        yield


class CurvatureOperator:
    """A curvature matrix of an :class:`~sharpscope.curvature.objective.Objective`'s loss (the
    mean loss over all its batches, or the total loss with ``reduction`` sum), as a linear
    operator; a subclass says which matrix by its one product method (``_local_matvec``, or
    ``_output_product`` of an output-space matrix) and its name, ``curvature``.

    ``loss_fn(model(inputs), targets)`` must return the loss of a batch reduced as ``reduction``
    says: its ``mean`` (default) or its ``sum``; the model is called as
    :func:`~sharpscope.structures.call_model` does (``model(**inputs)`` for a mapping, or with
    ``input_style`` single ``model(inputs)``; ``auto`` reads ``forward``'s signature,
    :func:`~sharpscope.structures.input_style`). For a mean the operator weights each batch by
    the number of terms its mean is over (:func:`~sharpscope.batches.loss_weight`: samples, or
    predicted tokens for a token loss) and is the matrix of the mean loss over all batches; for a
    sum every batch weighs 1 and it is the matrix of the total loss. Either way one batch of 256
    and four of 64 give the same matrix. When built (with ``validate``), the operator runs the
    model and the loss on the first batch (an :class:`~sharpscope.errors.InputError` if they
    cannot run), and a loss that does not say its reduction (a ``reduction`` attribute, as
    torch's and the built-in losses have) on the batch's two halves too: a loss that sums where
    ``reduction`` says mean, or the reverse, is refused. Vectors are flat, in the order of
    :class:`~sharpscope.curvature.params.ParamSpace`, over the parameters that the globs
    ``params`` select less those ``exclude`` leaves out (see :func:`select_params`).

    With ``cache_graph`` (default) what products reuse is built once for all batches, which costs
    the memory of all batches' activations. The objective's ``micro_batch`` runs each batch in
    chunks of at most that many samples (:meth:`_pieces`), each chunk's mean weighted by its
    terms (the same matrix, to rounding), at the memory of one chunk where nothing is cached
    (refused with BatchNorm on batch statistics, whose function the chunks would change). With
    ``distributed`` (default: when a torch.distributed process group is initialised) each rank
    passes its own shard of the batches and the operator is that of all ranks' batches
    together: weights use the global count, and ``matvec``, ``gradient`` and ``loss``
    all-reduce their weighted local sums (one all-reduce each), so every rank gets the same
    result.

    Args:
        objective: The model, loss, data, parameters and their settings (:class:`Objective`).
        cache_graph: Keep what products reuse for all batches.
        validate: Run the model and the loss on the first batch now.

    Raises:
        InputError: The model or the loss cannot run on the first batch, the loss reduces
            otherwise than ``reduction`` says, or ``micro_batch`` with BatchNorm on batch
            statistics.
        ValueError: No data, or ``params`` / ``exclude`` select no parameter.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import HessianOperator, Objective
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> data = [(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1))]
        >>> op = HessianOperator(Objective(model, torch.nn.functional.mse_loss, data))
        >>> op.shape, op.matvec(torch.tensor([1.0, 1.0])).tolist()  # H = diag(1, 4)
        ((2, 2), [1.0, 4.0])
    """

    curvature: ClassVar[str]
    """The matrix's name in reports (``hessian``, ``ggn``, ...)."""
    settings: ClassVar[tuple[str, ...]] = ("cache_graph",)
    """The operator's own keyword arguments besides the objective, each kept as the attribute of
    its name: what :meth:`replace` carries over and :func:`curvature_operator` passes."""
    second_order: bool = True
    """Whether products differentiate twice (attention then runs on the math kernel)."""
    cut_outputs: ClassVar[bool] = True
    """Whether :meth:`chunk_losses` first tries one forward per batch, its outputs cut into the
    chunks' (else one forward per chunk)."""

    def __init__(
        self, objective: Objective, *, cache_graph: bool = True, validate: bool = True
    ) -> None:
        model = objective.model
        self.space: ParamSpace = select_params(model, objective.params, objective.exclude)
        batches = list(objective.batches)
        style = objective.input_style
        if batches:
            style = input_style_for(model, batches[0][0], style)
        self.objective = objective.replace(
            batches=styled(batches, style),
            params=self.space.names,
            exclude=None,
            input_style=style,
            distributed=_distributed.is_distributed()
            if objective.distributed is None
            else objective.distributed,
        )
        """The objective as resolved: its parameters by name, its batches styled, its input style
        and distribution decided (what :meth:`replace` starts from)."""
        self.units = [loss_weight(self.loss_fn, b) for b in self.batches]
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
        self.total_terms = total if objective.total_terms is None else objective.total_terms
        """With ``reduction`` sum, the terms of the data the sum stands for: a shard's operator
        (:func:`~sharpscope.analysis.sampling.shard_operators`) scales its sum to all the data."""
        self.weights = (
            [u / total for u in self.units]
            if self.reduction == "mean"
            else [self.total_terms / total] * len(self.units)
        )
        self.cache_graph = cache_graph
        self.n_products = 0
        if objective.micro_batch is not None and self.batch_stats and batchnorm_layers(model):
            raise InputError(
                "`micro_batch` would change the function with `batch_stats`: BatchNorm then "
                "normalises each chunk by its own statistics; leave `micro_batch` unset"
            )
        if validate and self.batches:
            self._check_first_batch()

    @property
    def model(self) -> nn.Module:
        return self.objective.model

    @property
    def loss_fn(self) -> LossFn:
        return self.objective.loss_fn

    @property
    def batches(self) -> Sequence[tuple[Any, Any]]:
        """The objective's batches, mapping inputs styled for :func:`call_model`."""
        return self.objective.batches  # type: ignore[return-value]

    @property
    def reduction(self) -> str:
        return self.objective.reduction

    @property
    def batch_stats(self) -> bool:
        return self.objective.batch_stats

    @property
    def distributed(self) -> bool:
        return bool(self.objective.distributed)

    def replace(self: _Op, objective: Objective | None = None, **settings: Any) -> _Op:
        """The same kind of operator on another objective or with other settings.

        Args:
            objective: The new operator's objective (default: this one's, as resolved; derive
                one with ``op.objective.replace(batches=...)``).
            **settings: Settings of this kind (:attr:`settings`) to change; the rest are kept.

        Returns:
            A new operator (the first batch is not run again); this one is unchanged.

        Examples:
            >>> import torch
            >>> from sharpscope.curvature import HessianOperator, Objective
            >>> model = torch.nn.Linear(3, 1)
            >>> data = [(torch.randn(8, 3), torch.randn(8, 1))]
            >>> op = HessianOperator(Objective(model, torch.nn.functional.mse_loss, data))
            >>> op.replace(op.objective.replace(params="bias"), cache_graph=False).size
            1
        """
        kept = {name: getattr(self, name) for name in self.settings}
        return type(self)(
            self.objective if objective is None else objective,
            **{**kept, **settings},
            validate=False,
        )

    def _check_first_batch(self) -> None:
        """Run the model and the loss on the first batch, so that data the model cannot take
        fails here, and compare a loss of unknown reduction on two halves with ``reduction``."""
        with torch.no_grad():
            first = self._probe_loss(*self.batches[0])
            declared = getattr(self.loss_fn, "reduction", None)
            if declared in REDUCTIONS:
                if declared != self.reduction:
                    raise InputError(
                        f"the `loss` returns the {declared} of a batch but `reduction` is "
                        f"{self.reduction}; pass `reduction` {declared}"
                    )
                return
            try:
                whole, parts = self._halves(first)
                losses = [self._probe_loss(x, y) for x, y in parts]
            except (InputError, RuntimeError, ValueError, IndexError):  # fixed batch size, ragged
                return
        counts = [loss_weight(self.loss_fn, part) for part in parts]
        fits = {
            "mean": sum(c * v for c, v in zip(counts, losses, strict=True)) / max(sum(counts), 1),
            "sum": sum(losses),
        }
        other = "sum" if self.reduction == "mean" else "mean"
        if not _close(whole, fits[self.reduction]) and _close(whole, fits[other]):
            shown = ", ".join(f"{v:.6g}" for v in losses)
            raise InputError(
                f"the `loss` returns the {other} of a batch, not its {self.reduction} (a batch's "
                f"loss is {whole:.6g}, its halves' {shown}); pass `reduction` {other}"
            )

    def _halves(self, first: float) -> tuple[float, list[tuple[Any, Any]]]:
        """A batch's loss and its two halves: the first batch's (whose loss is ``first``), or,
        when it holds one sample, the first two batches joined and each of them."""
        inputs, targets = self.batches[0]
        n = batch_size(self.batches[0])
        if n >= 2:
            half = (n + 1) // 2
            return first, list(zip(split(inputs, half), split(targets, half), strict=True))
        if len(self.batches) < 2:
            raise ValueError("one sample: no halves")
        joined = (concat([inputs, self.batches[1][0]]), concat([targets, self.batches[1][1]]))
        return self._probe_loss(*joined), self.batches[:2]

    def _probe_loss(self, inputs: Any, targets: Any) -> float:
        """The loss of one batch (no graph), an :class:`InputError` if the model cannot run."""
        inputs, targets = (move_to(t, self.device, self.dtype) for t in (inputs, targets))
        with self.mode():
            try:
                outputs = call_model(self.model, inputs)
            except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
                fields = ", ".join(f"{k} {tuple(t.shape)}" for k, t in leaves(inputs))
                raise InputError(
                    f"the model cannot run on the first batch ({fields}): {one_line(exc)}; check "
                    "that the data fits the model (a forward that takes the input mapping as one "
                    "argument: pass `input_style` single)"
                ) from None
            return float(self._checked_loss(self.loss_fn(outputs, targets)))

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
        return float(_distributed.all_reduce_sum(total))

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

    def mode(self) -> contextlib.AbstractContextManager[None]:
        """The :func:`curvature_mode` every forward and backward of this operator runs in."""
        return curvature_mode(
            self.model,
            self.batch_stats,
            second_order=self.second_order,
            checkpointing=self.objective.checkpointing,
        )

    def _pieces(self) -> Iterator[tuple[float, Any, Any]]:
        """As :meth:`_placed`, each batch cut into chunks of at most ``micro_batch`` samples: a
        chunk's mean weighs its share of its batch's terms (a chunk without any, none), a chunk's
        sum as its batch's, so the weighted chunks add up to the weighted batch."""
        size = self.objective.micro_batch
        for w, units, (inputs, targets) in zip(self.weights, self.units, self.batches, strict=True):
            if size is None or batch_size((inputs, targets)) <= size:
                chunks = [(inputs, targets)]
            else:
                chunks = list(zip(split(inputs, size), split(targets, size), strict=True))
            for x, y in chunks:
                share = 1.0
                if self.reduction == "mean" and len(chunks) > 1:
                    share = loss_weight(self.loss_fn, (x, y)) / units
                if share > 0:
                    yield (
                        w * share,
                        move_to(x, self.device, self.dtype),
                        move_to(y, self.device, self.dtype),
                    )

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
                f"the loss must be a scalar (the batch's mean or sum), got {tuple(loss.shape)}"
            )
        return loss

    def _batch_loss(
        self, inputs: Any, targets: Any, params: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """The mean loss of one batch, at the model's weights or at ``params`` (by name)."""
        with self.mode():
            outputs = call_model(self.model, inputs, params)
            return self._checked_loss(self.loss_fn(outputs, targets))

    def _batch_losses(self) -> Iterator[torch.Tensor]:
        """The weighted loss of each batch (or micro-batch), with autograd recording."""
        for w, inputs, targets in self._pieces():
            yield w * self._batch_loss(inputs, targets, None)

    def _grad(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of ``loss`` per parameter with its graph (to be differentiated again);
        zeros for a parameter it does not use. First-order gradients go through
        :meth:`_accumulate`."""
        grads = torch.autograd.grad(loss, self.space.params, create_graph=True, allow_unused=True)
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
        vs = self._parts(v.to(device=self.device, dtype=self.dtype))
        self.n_products += 1
        with self.mode():  # a checkpointed layer recomputes its forward in the backward
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
        with self.mode():
            value = self._accumulate(total)
        return self._reduced_float(value), self._reduced(total)

    def _accumulate(self, total: torch.Tensor, subtract: bool = False) -> float:
        """Add this rank's weighted gradient sum into the flat ``total`` in place (``subtract``:
        take it away) and return its weighted loss sum. Each backward adds every parameter's
        gradient into that parameter's view of ``total`` as it comes (their ``.grad`` are those
        views meanwhile, :meth:`_grad_slots`, then put back): no gradient-sized tensor stands
        beside ``total``."""
        params, views = self._grad_slots(total)
        saved = [p.grad for p in params]
        value = 0.0
        try:
            for p, view in zip(params, views, strict=True):
                p.grad = view
            with self._backward_scope():
                for loss in self._batch_losses():
                    value += float(loss.detach())
                    self._backward(-loss if subtract else loss)
        finally:
            for p, grad in zip(params, saved, strict=True):
                p.grad = grad
        return value

    def _grad_slots(
        self, total: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The parameters whose ``.grad`` :meth:`_accumulate` sets, and what to: the selected
        ones, each to its view of ``total``."""
        return list(self.space.params), list(self.space.split(total))

    def _backward_scope(self) -> contextlib.AbstractContextManager[None]:
        """What :meth:`_accumulate`'s backward passes run inside: nothing here."""
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        """One backward of :meth:`_accumulate`, into the selected parameters only."""
        loss.backward(inputs=list(self.space.params))

    def loss(self, delta: torch.Tensor | None = None) -> float:
        """The mean loss over all batches at the current weights, or at weights + ``delta``.

        The shift is applied in place and the weights are restored bit for bit afterwards (this also
        works for TorchScript modules, which ``torch.func`` cannot call); what products reuse is
        dropped, as autograd refuses a graph whose weights were modified in place.
        """
        with torch.no_grad(), self.shifted(delta):
            local = sum(w * float(self._batch_loss(x, y, None)) for w, x, y in self._pieces())
        return self._reduced_float(local)

    def chunk_losses(
        self, sizes: Sequence[int | None], delta: torch.Tensor | None = None
    ) -> list[list[float]]:
        """For each of this rank's batches, the mean losses of its consecutive chunks of
        ``sizes[i]`` samples (None: the whole batch), at the weights + ``delta`` (see :meth:`loss`):
        one forward per batch, its outputs cut as its inputs (:func:`split_outputs`), or, once
        they cannot be (a loss the model computed), one forward per chunk."""
        found: list[list[float]] = []
        whole = self.cut_outputs  # one forward per batch until the outputs refuse to be cut
        with torch.no_grad(), self.shifted(delta), self.mode():
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
    def shifted(self, delta: torch.Tensor | None, scale: float = 1.0) -> Iterator[None]:
        """The weights moved by ``scale`` × the flat ``delta`` in place while inside, restored bit
        for bit afterwards without a copy of them (:func:`~sharpscope.curvature.weight_shift.
        moved`); what products reuse is dropped; nothing moves for None."""
        if delta is None:
            yield
            return
        with self._moved(self._parts(delta.to(device=self.device, dtype=self.dtype)), scale):
            yield

    def _parts(self, v: torch.Tensor) -> list[torch.Tensor]:
        """The flat vector ``v`` as views shaped like the tensors :meth:`_weights` moves."""
        return self.space.split(v)

    def _weights(self) -> list[torch.Tensor]:
        """The tensors a shift of the weights moves in place: the selected parameters."""
        return list(self.space.params)

    def flat_weights(self) -> torch.Tensor:
        """A flat copy of the selected parameters' values in the order of :meth:`shifted`'s
        ``delta`` (this rank's pieces where the operator's vectors are sharded)."""
        with torch.no_grad():
            return torch.cat([w.detach().reshape(-1) for w in self._weights()])

    def _moved(
        self, parts: Sequence[torch.Tensor], scale: float
    ) -> contextlib.AbstractContextManager[None]:
        """:meth:`shifted` for a delta already split into parameter-shaped ``parts``."""
        self.release()
        return moved(self._weights(), parts, scale)

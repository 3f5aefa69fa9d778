"""Hessian-vector products of a model's loss, exact over all given batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import torch
from torch import nn
from torch.func import grad, jvp

from sharpscope import distributed
from sharpscope.analysis.plan import available_memory, lean_search
from sharpscope.choices import BACKENDS
from sharpscope.curvature.attention import derivatives_explained
from sharpscope.curvature.objective import Objective
from sharpscope.curvature.operator import CurvatureOperator
from sharpscope.curvature.shards import over_of
from sharpscope.curvature.vectors import Over, distance, dot, norm
from sharpscope.errors import InputError

FUNC_CHECK_ULPS = 200
"""How far (in units of the dtype's epsilon, relative) forward-over-reverse's first product may
be from double backward's before it is refused; rounding gives 1-3 units on the test models."""
FD_SHRINK = 2.0
"""The ratio of successive step sizes the finite-difference backend tries on its first product."""
FD_RUNGS = 12
"""How far the search goes: 2^±12 times the cbrt(eps)-scaled step (:meth:`HessianOperator._step`)
on the first product, and as far again from the chosen one when :meth:`HessianOperator.
refine_step` chooses it on v₁. It stops where the estimate stops falling (most models: within
2^±2), but GPT-2 small needed 2^-13 along its top eigenvector (docs/engine.md)."""
FD_MAX_ERROR = 1e-2
"""The largest estimated relative error of a finite-difference product that is accepted: beyond
it the gradient is not smooth along the direction (a ReLU network's kinks), so the differences
are not a Hessian's products."""
FD_RESOLVES = 2
"""The most times :func:`refined` solves again after choosing the step on v₁."""
_Solved = TypeVar("_Solved")
Backend = Literal["double-backward", "forward-over-reverse", "finite-difference"]


class HessianOperator(CurvatureOperator):
    """The Hessian of the mean loss over all of ``batches``, as a linear operator (data,
    weighting, parameters, distribution: :class:`~sharpscope.curvature.operator.CurvatureOperator`).

    ``backend="double-backward"`` differentiates the gradient graph a second time; with
    ``cache_graph`` (default) that graph is built once for all batches and reused by every
    product, which costs the memory of all batches' activations. ``"forward-over-reverse"`` uses
    ``torch.func.jvp`` of ``torch.func.grad`` and keeps nothing between products.
    ``"finite-difference"`` takes the central difference of two gradients,
    (g(w + h v) − g(w − h v)) / 2h (:meth:`_matvec_difference`): a gradient's memory and first
    derivatives only, at a truncation and rounding error that its first product estimates
    (:attr:`fd_error`).

    Every forward runs under :func:`~sharpscope.curvature.attention.twice_differentiable`
    (attention on torch's math kernel, which has second derivatives), except with
    ``finite-difference``, which needs first derivatives only and keeps the kernel torch (or the
    caller's ``sdpa_kernel``) picks: flash, memory-efficient; a product through an operation
    without the derivative its backend needs raises a one-line ``InputError``. With the
    objective's ``micro_batch`` no graph is cached: each product runs every chunk's forward and
    backward(s) anew, at the memory of one chunk.

    Args:
        objective: The model, loss, data and parameters (:class:`Objective`).
        backend: ``double-backward``, ``forward-over-reverse`` or ``finite-difference``.
        cache_graph: Keep the gradient graph for all products (double backward without
            ``micro_batch`` only).
        validate: Run the model and the loss on the first batch now.
        lean: ``finite-difference`` only: how its step search estimates errors. True: with one
            product's buffer (:meth:`_lean_error`, about twice the products); False: with two
            products held; None (default): lean when one more vector would not fit the free
            memory at the first product (:func:`~sharpscope.analysis.plan.lean_search`).

    Raises:
        ValueError: An unknown ``backend``; as :class:`CurvatureOperator` otherwise.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import Objective
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> objective = Objective(model, torch.nn.functional.mse_loss, [(x, x[:, :1])])
        >>> op = HessianOperator(objective)
        >>> torch.allclose(op @ torch.tensor([1.0, 0.0]), (x.T @ x)[:, 0])  # H = 2·XᵀX/2
        True
    """

    curvature = "hessian"
    settings = (*CurvatureOperator.settings, "backend", "lean")
    _graph: tuple[torch.Tensor, list[torch.Tensor]] | None = None
    _functional_checked = False
    fd_error: float | None = None
    """``finite-difference`` only: the estimated relative error of its products (Richardson, from
    its first product at the chosen step and at twice it; None before the first product)."""
    fd_scale: float | None = None
    """``finite-difference`` only: the chosen step as a multiple of :meth:`_step`'s, set by the
    first product, which tries 3 to 3 + :data:`FD_RUNGS` steps (2 gradients each) and keeps the
    one of least estimated error (:meth:`_chosen_step`)."""
    fd_lean: bool | None = None
    """``finite-difference`` only: whether its step search runs lean (``lean``, or what the free
    memory decided at the first product; None before it)."""

    def __init__(
        self,
        objective: Objective,
        *,
        backend: Backend = "double-backward",
        cache_graph: bool = True,
        validate: bool = True,
        lean: bool | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if objective.checkpointing and backend == "forward-over-reverse":
            raise InputError(
                "`backend` forward-over-reverse cannot run through checkpointed layers "
                "(torch.func does not support the saved-tensor hooks checkpointing uses); use "
                "`backend` double-backward or leave `gradient_checkpointing` off"
            )
        self.backend = backend
        self.lean = lean
        super().__init__(
            objective,
            cache_graph=cache_graph
            and backend == "double-backward"
            and objective.micro_batch is None,
            validate=validate,
        )

    @property
    def second_order(self) -> bool:  # type: ignore[override]
        """Whether products differentiate twice: all but ``finite-difference``'s, which run
        under any attention kernel."""
        return self.backend != "finite-difference"

    def _second(
        self, grads: list[torch.Tensor], vs: list[torch.Tensor], retain: bool
    ) -> list[torch.Tensor]:
        """Differentiate ``<grads, vs>`` once more; gradients constant in the weights give 0."""
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return [torch.zeros_like(p) for p in self.space.params]
        with derivatives_explained():
            hv = torch.autograd.grad(
                [grads[i] for i in live],
                self.space.params,
                grad_outputs=[vs[i] for i in live],
                retain_graph=retain,
                allow_unused=True,
            )
        return [
            torch.zeros_like(p) if h is None else h
            for p, h in zip(self.space.params, hv, strict=True)
        ]

    def _cached_graph(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._graph is None:
            total = sum(self._batch_losses())
            self._graph = (total, self._grad(total))
        return self._graph

    def release(self) -> None:
        """Free the cached gradient graph (it is rebuilt on the next product)."""
        self._graph = None

    def graph_bytes(self) -> int:
        """The estimated bytes of the double-backward graph ``cache_graph`` keeps for this rank's
        batches: the distinct storages autograd saves while the first batch's loss and gradient
        (with ``create_graph``) are built, less the weights, plus the gradient, times the
        batches. Builds and frees that one batch's graph (its memory, once)."""
        weights = {p.untyped_storage().data_ptr() for p in self.space.params}
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            grads = self._grad(next(self._batch_losses()))
        gradient = sum(g.numel() * g.element_size() for g in grads)
        return (sum(saved.values()) + gradient) * len(self.batches)

    def _local_matvec(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's weighted sum of the batches' Hessian-vector products (of ``vs`` less the
        rows autograd holds constant, :meth:`_held`)."""
        vs = self._held(vs)
        if self.backend == "finite-difference":
            return self._matvec_difference(vs)
        if self.backend == "forward-over-reverse":
            product = self._matvec_functional(vs)
            if not self._functional_checked:
                self._check_functional(product, self._matvec_autograd(vs))
            return product
        return self._matvec_autograd(vs)

    def _check_functional(self, product: torch.Tensor, reference: torch.Tensor) -> None:
        """Refuse forward-over-reverse when its first product differs from double backward's on
        the same vector beyond rounding: a guard against ``torch.func`` second derivatives that
        are wrong through a model's layers (none known once an embedding's padding row is held,
        docs/engine.md). Compared after the all-reduce, so every rank decides alike."""
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
            grads = self._grad(loss)
            total += torch.cat([h.reshape(-1) for h in self._second(grads, vs, False)])
        return total

    def _held(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``vs`` with the rows that autograd holds constant set to 0: an ``nn.Embedding``'s
        ``padding_idx`` row gets no gradient, so double backward's Hessian has no row or column
        for it, while a finite-difference step or a forward-mode tangent that moved it would
        differentiate another function (BERT's products by forward-over-reverse were 7e-2 off
        through it, exact without it)."""
        held = self._padding_rows()
        if not held:
            return vs
        vs = list(vs)
        for i, row in held:
            vs[i] = vs[i].clone()
            vs[i][row] = 0
        return vs

    def _padding_rows(self) -> list[tuple[int, int]]:
        """Each selected ``nn.Embedding`` weight with a ``padding_idx`` row: its index among the
        parameters and that row."""
        index = {id(p): i for i, p in enumerate(self.space.params)}
        return [
            (index[id(m.weight)], m.padding_idx)
            for m in self.model.modules()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None and id(m.weight) in index
        ]

    def _held_parts(self, v: torch.Tensor) -> list[torch.Tensor]:
        """The flat vector ``v`` as parameter-shaped parts less the rows autograd holds constant
        (:meth:`_held`)."""
        return self._held(self._parts(v.to(device=self.device, dtype=self.dtype)))

    def _step(self, vs: list[torch.Tensor]) -> float:
        """The finite-difference base step h for the direction ``vs`` (parameter-shaped):
        cbrt(eps)·max(1, ‖w‖)/‖v‖ (the first product scales it, :attr:`fd_scale`).

        A central difference errs by about h²‖v‖³·|∇³L| (truncation) plus eps·‖g‖/h (rounding of
        the gradients) and eps·‖w‖/(h‖v‖) (rounding of w ± hv), relative; h‖v‖ of order cbrt(eps)
        balances the first two, each then of order eps^(2/3) (about 2e-5 in float32), and
        scaling by ‖w‖ keeps the moved weights' rounding at that order too. It only depends on
        the weights and ``v``, so every rank takes the same step. Both norms are summed
        parameter by parameter (and over the ranks where the vectors are sharded, as scalars): no
        model-sized copy on every product.
        """
        eps = torch.finfo(self.dtype).eps
        over = over_of(self)
        weights = _norm_of((w.detach() for w in self._weights()), over)
        return (
            eps ** (1 / 3)
            * max(1.0, weights)
            / max(_norm_of(vs, over), torch.finfo(self.dtype).tiny)
        )

    def _difference(
        self, vs: list[torch.Tensor], h: float, held: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(g(w + h v) − g(w − h v)) / 2h on this rank's batches for the parameter-shaped ``vs``,
        in one vector: the second gradient is taken away from the first as it comes
        (:meth:`_accumulate`), and neither the weights nor h v are copied (:meth:`_moved`).
        With ``held`` (a product of this rank), into it, as ``held`` less that difference: the
        buffer is scaled by 2h and the gradients go in with the opposite signs."""
        if held is None:
            total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        else:
            total = held.mul_(2 * h)
        for sign in (1.0, -1.0):
            with self._moved(vs, sign * h):
                self._accumulate(total, subtract=(sign < 0) == (held is None))
        return total.div_(2 * h)

    def _lean_error(self, vs: list[torch.Tensor], h: float) -> float:
        """The Richardson estimate ‖D(r h) − D(h)‖ / (r² − 1) / ‖D(h)‖ (r = :data:`FD_SHRINK`)
        with one product's buffer: D(h) is made, its norm taken, and D(r h) is taken away from
        it in place (two products, none kept)."""
        buffer = self._difference(vs, h)
        length = max(self._length(buffer), torch.finfo(self.dtype).tiny)
        spread = self._length(self._difference(vs, FD_SHRINK * h, held=buffer))
        return spread / (FD_SHRINK**2 - 1) / length

    def _searches_lean(self) -> bool:
        """Whether the step search runs lean (:attr:`fd_lean`), decided once: ``lean``, or for
        None rank 0's free memory against one more vector (:func:`~sharpscope.analysis.plan.
        lean_search`), so every rank searches alike."""
        if self.fd_lean is None:
            self.fd_lean = self.lean
            if self.fd_lean is None:
                free = distributed.main_value(available_memory(self.device))
                self.fd_lean = lean_search(self.size * self.dtype.itemsize, free)
        return self.fd_lean

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """‖a − b‖ of two of this rank's products summed over ranks (in one process without a
        vector beside them)."""
        return norm(self._reduced(a - b)) if self.distributed else distance(a, b)

    def _length(self, a: torch.Tensor) -> float:
        """‖a‖ of one of this rank's products summed over ranks (``a`` itself unchanged)."""
        return norm(self._reduced(a.clone())) if self.distributed else norm(a)

    def _matvec_difference(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's product by a central difference of gradients: two gradients per product
        once its first product has chosen the step (see :attr:`fd_scale`)."""
        h = self._step(vs)
        if self.fd_scale is not None:
            return self._difference(vs, self.fd_scale * h)
        self.fd_scale, error, product, _ = self._chosen_step(vs, h)
        self.check_smooth(error)
        self.fd_error = error
        return product

    def difference_error(self, v: torch.Tensor, image: torch.Tensor) -> float:
        """``finite-difference`` only, after the first product: the Richardson estimate of
        ‖(D − H)v‖ for the flat ``v`` whose product is ``image``, the spread to the product at
        twice the step over r² − 1 (one product more, counted). On the vector itself: the first
        product's :attr:`fd_error` was up to 16× below the error on another vector (docs/engine.md).
        """
        if self.fd_scale is None:
            raise ValueError("difference_error needs a first product (it chooses the step)")
        parts = self._held_parts(v)
        step = FD_SHRINK * self.fd_scale * self._step(parts)
        self.n_products += 1
        wider = self._reduced(self._difference(parts, step))
        return distance(wider, image, over=over_of(self)) / (FD_SHRINK**2 - 1)

    def refine_step(self, v: torch.Tensor, target: float) -> bool:
        """``finite-difference`` only, after the first product: choose the step again on the flat
        unit vector ``v`` (a solve's top eigenvector, the direction whose products decide λ_max)
        when the Richardson estimate there exceeds ``target`` (relative); True when the step
        changed, so the solve should be redone. The first product's vector (random, or ĝ) can
        be a direction of far less curvature than v₁, where a step many times too large for v₁
        looks best (docs/engine.md).

        Raises:
            InputError: The least error found on ``v`` is above :data:`FD_MAX_ERROR`."""
        if self.fd_scale is None:
            raise ValueError("refine_step needs a first product (it chooses the step)")
        parts = self._held_parts(v)
        h = self.fd_scale * self._step(parts)
        scale, error, _, tried = self._chosen_step(parts, h, target, keep=False)
        self.n_products += tried
        if scale == 1 and error <= target:
            return False
        self.check_smooth(error)
        self.fd_scale, self.fd_error = self.fd_scale * scale, error
        return scale != 1

    def check_smooth(self, error: float) -> None:
        """Refuse (``InputError``) an estimated relative error above :data:`FD_MAX_ERROR`: the
        differences are then no Hessian's products (a ReLU network's kinks)."""
        if error > FD_MAX_ERROR:
            raise InputError(
                "`backend` finite-difference cannot take this model's Hessian: its gradient is "
                "not smooth along the products' directions (estimated error "
                f"{error:.1e}, relative; e.g. ReLU kinks); use `backend` double-backward"
            )

    def _chosen_step(
        self, vs: list[torch.Tensor], h: float, enough: float = 0.0, keep: bool = True
    ) -> tuple[float, float, torch.Tensor | None, int]:
        """The multiple r^k of ``h`` (r = :data:`FD_SHRINK`, |k| ≤ :data:`FD_RUNGS`) whose product
        has the least estimated error (``h`` itself when its error is at most ``enough``), that
        error, that product (None unless ``keep``) and how many products it took.
        Truncation grows as h² and rounding as 1/h (more where a model computes in a lower
        precision inside, as Llama's RMSNorm in float32), so k moves from 0 the way the error
        falls while it falls; the Richardson estimate of D(r^k h)'s error is its spread to
        D(r^(k+1) h) over (r² − 1): with two products held, or lean (:meth:`_searches_lean`)
        with one buffer, two products per estimate (:meth:`_lean_error`) and the chosen product
        made again."""
        tiny = torch.finfo(self.dtype).tiny
        lean = self._searches_lean()
        products: dict[int, torch.Tensor] = {}
        errors: dict[int, float] = {}
        tried = 0

        def at(k: int) -> torch.Tensor:
            nonlocal tried
            if k not in products:
                products[k] = self._difference(vs, FD_SHRINK**k * h)
                tried += 1
            return products[k]

        def error(k: int) -> float:
            nonlocal tried
            if k not in errors and lean:
                errors[k] = self._lean_error(vs, FD_SHRINK**k * h)
                tried += 2
            if k not in errors:  # only this pair's products held: a dropped best one is redone
                for old in [i for i in products if i not in (k, k + 1)]:
                    del products[old]
                errors[k] = self._distance(at(k + 1), at(k)) / (FD_SHRINK**2 - 1)
                errors[k] /= max(self._length(at(k)), tiny)
            return errors[k]

        k, best = 0, error(0)
        if best <= enough:
            return 1.0, best, at(0) if keep else None, tried
        # no acceptable step yet: shrink, as a far too large step's estimates wander on a plateau
        step = -1 if best > FD_MAX_ERROR or error(-1) <= best else 1
        j = k  # goes on past a worse rung while no step is yet acceptable (a far too large one)
        while abs(j + step) <= FD_RUNGS and (
            (found := error(j + step)) <= best or best > FD_MAX_ERROR
        ):
            j += step
            if found <= best:
                k, best = j, found
        return FD_SHRINK**k, best, at(k) if keep else None, tried

    def _matvec_functional(self, vs: list[torch.Tensor]) -> torch.Tensor:
        names = self.space.names
        primals = {n: p.detach() for n, p in zip(names, self.space.params, strict=True)}
        tangents = dict(zip(names, vs, strict=True))
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for w, inputs, targets in self._pieces():

            def loss_of(
                p: dict[str, torch.Tensor], x: Any = inputs, y: Any = targets
            ) -> torch.Tensor:
                return self._batch_loss(x, y, p)

            with torch.no_grad(), derivatives_explained():
                _, hv = jvp(grad(loss_of), (primals,), (tangents,))
            total += w * self.space.flatten(hv)
        return total

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss over all batches (no product is counted)."""
        if self.cache_graph:
            return self._reduced(
                torch.cat([g.detach().reshape(-1) for g in self._cached_graph()[1]])
            )
        return super().gradient()

    def loss(self, delta: torch.Tensor | None = None) -> float:
        """The mean loss over all batches at the current weights, or at weights + ``delta`` (see
        :meth:`CurvatureOperator.loss`); read from the cached graph when there is one."""
        if delta is None and self.cache_graph:
            return self._reduced_float(self._cached_graph()[0].detach())
        return super().loss(delta)


def _norm_of(parts: Iterable[torch.Tensor], over: Over | None = None) -> float:
    """The norm of the flat vector ``parts`` (parameter-shaped, contiguous) make up, its square
    summed ``over`` the ranks of a sharded one (one scalar travels)."""
    total = sum(dot(t.reshape(-1), t.reshape(-1)) for t in parts)
    if over is not None:
        total = float(over(torch.tensor(float(total), dtype=torch.float64)))
    return math.sqrt(max(total, 0.0))


def refined(op: Any, solve: Callable[[], _Solved], tol: float) -> _Solved:
    """``solve()``'s result, solved again while a finite-difference ``op``'s step chosen again on
    the top eigenvector (:meth:`HessianOperator.refine_step`, relative error ``tol``) changed,
    at most :data:`FD_RESOLVES` times; other operators solve once."""
    result = solve()
    for _ in range(FD_RESOLVES):
        if getattr(op, "backend", None) != "finite-difference":
            break
        top = result[0] if isinstance(result, tuple) else result
        if not op.refine_step(top.eigenvectors[0], tol):
            break
        del top, result  # the next solve's memory: not beside the last one's vectors
        result = solve()
    return result

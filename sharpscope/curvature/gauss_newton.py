"""The generalized Gauss-Newton matrix and the Fisher of a model's loss: ``Jᵀ M J`` with ``J`` the
Jacobian of the logits in the weights and ``M`` a positive semi-definite matrix in output space.

A product runs ``J v`` (the double-backward trick: ``Jᵀa`` built once with its graph, then
differentiated in ``a``), ``M`` on the logits and ``Jᵀ`` (one backward), through a forward
graph that is kept for all batches with ``cache_graph``; no product runs a forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sharpscope.batches import LikelihoodLoss, logits_of
from sharpscope.curvature.attention import derivatives_explained
from sharpscope.curvature.label_draws import per_sample_draw, sample_seeds
from sharpscope.curvature.objective import Objective
from sharpscope.curvature.operator import CurvatureOperator
from sharpscope.errors import InputError
from sharpscope.structures import call_model


@dataclass
class _Linearized:
    """One batch at the current weights: its logits ``z`` (with the graph to the weights),
    ``Jᵀa`` as a function of ``a`` (with its graph), the loss's gradient in the logits ``gz``
    (with its graph when ``M`` needs it) at a detached copy ``zd``, the weight and the terms."""

    weight: float
    units: int
    z: torch.Tensor
    a: torch.Tensor
    ja: list[torch.Tensor | None]
    zd: torch.Tensor
    gz: torch.Tensor


class OutputSpaceOperator(CurvatureOperator):
    """``Σ_b w_b J_bᵀ M_b J_b`` over the batches (weighted as
    :class:`~sharpscope.curvature.operator.CurvatureOperator` says); a subclass gives ``M_b``
    by :meth:`_output_product`. The logits are those :func:`~sharpscope.batches.logits_of` finds
    in the outputs for a built-in loss, the outputs themselves (a tensor) for a user's loss."""

    _loss_graph = False
    """Whether ``M`` differentiates the loss's gradient in the logits once more."""
    _cache: list[_Linearized] | None = None

    def __init__(
        self, objective: Objective, *, cache_graph: bool = True, validate: bool = True
    ) -> None:
        if objective.micro_batch is not None:
            raise InputError(
                f"`micro_batch` applies to the Hessian's products, not the {self.curvature}'s "
                "(one linearisation per batch); leave `micro_batch` unset"
            )
        super().__init__(objective, cache_graph=cache_graph, validate=validate)

    def release(self) -> None:
        """Free the cached graphs (they are rebuilt on the next product)."""
        self._cache = None

    def _logits(self, outputs: Any) -> torch.Tensor:
        if isinstance(self.loss_fn, LikelihoodLoss):
            logits = logits_of(outputs)
        else:
            logits = outputs if isinstance(outputs, torch.Tensor) else None
        if logits is None:
            raise InputError(
                f"the {self.curvature} needs the model's outputs as a tensor (or logits), got a "
                f"{type(outputs).__name__}; pass `loss` a built-in loss or return a tensor"
            )
        return logits

    def _curvature_targets(self, logits: torch.Tensor, inputs: Any, index: int) -> torch.Tensor:
        """The targets ``M`` is taken at for batch ``index`` (its own by default)."""
        return self.batches[index][1]

    def _linearized(self) -> Iterator[_Linearized]:
        """Each batch linearized (cached for all products with ``cache_graph``)."""
        if self._cache is not None:
            yield from self._cache
            return
        made = []
        for index, (w, inputs, _) in enumerate(self._placed()):
            state = self._linearize(index, w, inputs)
            if self.cache_graph:
                made.append(state)
            yield state
        if self.cache_graph:
            self._cache = made

    def _linearize(self, index: int, weight: float, inputs: Any) -> _Linearized:
        with self.mode():
            z = self._logits(call_model(self.model, inputs))
        targets = self._curvature_targets(z, self.batches[index][0], index)
        targets = targets.to(z.device, z.dtype if targets.is_floating_point() else None)
        zd = z.detach().requires_grad_()
        loss = self._checked_loss(self.loss_fn(zd, targets))
        with derivatives_explained():
            (gz,) = torch.autograd.grad(loss, zd, create_graph=self._loss_graph)
            a = torch.zeros_like(z, requires_grad=True)
            live = z.requires_grad
            ja = (
                torch.autograd.grad(
                    z, self.space.params, grad_outputs=a, create_graph=True, allow_unused=True
                )
                if live
                else (None,) * len(self.space.params)
            )
        units = self.units[index] if self.reduction == "mean" else 1
        return _Linearized(weight, units, z, a, list(ja), zd, gz)

    def _local_matvec(self, vs: list[torch.Tensor]) -> torch.Tensor:
        """This rank's ``Σ_b w_b J_bᵀ M_b J_b v``."""
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for state in self._linearized():
            live = [i for i, g in enumerate(state.ja) if g is not None and g.requires_grad]
            if not live:
                continue
            with derivatives_explained():
                (ju,) = torch.autograd.grad(
                    [state.ja[i] for i in live],
                    state.a,
                    grad_outputs=[vs[i] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
                if ju is None:
                    continue
                h = self._output_product(state, ju)
                back = torch.autograd.grad(
                    state.z,
                    self.space.params,
                    grad_outputs=h,
                    retain_graph=self.cache_graph,
                    allow_unused=True,
                )
            total += state.weight * self._flat(back)
        return total

    def _output_product(self, state: _Linearized, u: torch.Tensor) -> torch.Tensor:
        """``M_b u`` for a tangent ``u`` of the batch's logits."""
        raise NotImplementedError


class GGNOperator(OutputSpaceOperator):
    """The generalized Gauss-Newton matrix ``Σ_b w_b J_bᵀ H_b J_b`` of the mean loss over all of
    ``batches``, ``H_b`` the Hessian of batch b's mean loss in its logits (by double backward, so
    any twice-differentiable loss of the logits): positive semi-definite when the loss is convex
    in the logits (cross-entropy, mse), and the Hessian less the terms of the model's own
    curvature. Data, weighting and parameters as :class:`HessianOperator`.

    Args:
        objective: The model, loss, data and parameters (:class:`Objective`).
        cache_graph: Keep each batch's linearisation for all products.
        validate: Run the model and the loss on the first batch now.

    Raises:
        InputError: The model's outputs are no tensor (nor logits); as
            :class:`CurvatureOperator` otherwise.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import HessianOperator, Objective
        >>> model = torch.nn.Linear(3, 1).double()  # linear in its weights: GGN = Hessian
        >>> x, y = torch.randn(2, 5, 3, dtype=torch.float64)
        >>> objective = Objective(model, torch.nn.functional.mse_loss, [(x, y[:, :1])])
        >>> v = torch.randn(4, dtype=torch.float64)
        >>> torch.allclose(GGNOperator(objective) @ v, HessianOperator(objective) @ v)
        True
    """

    curvature = "ggn"
    _loss_graph = True

    def _output_product(self, state: _Linearized, u: torch.Tensor) -> torch.Tensor:
        if not state.gz.requires_grad:  # the loss is linear in the logits
            return torch.zeros_like(u)
        (h,) = torch.autograd.grad(state.gz, state.zd, grad_outputs=u, retain_graph=True)
        return h


class EmpiricalFisherOperator(OutputSpaceOperator):
    """The empirical Fisher of the mean loss over all of ``batches``: ``(1/T) Σ_t g_t g_tᵀ`` over
    its T terms (samples, or labelled tokens of a token loss), ``g_t`` the gradient of term t's
    loss at the data's labels (of the total loss, with ``reduction`` sum: ``Σ_t g_t g_tᵀ``).
    A user's loss must average (or sum) one term per sample (a term's logits are then a sample's
    outputs). Not the Hessian's approximation the Fisher is, and singular
    at a perfect fit (Kunstner et al. 2019).

    Args:
        objective: The model, loss, data and parameters (:class:`Objective`).
        cache_graph: Keep each batch's linearisation for all products.
        validate: Run the model and the loss on the first batch now.

    Raises:
        InputError: As :class:`GGNOperator`.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import Objective
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> objective = Objective(model, torch.nn.functional.mse_loss, [(x, x[:, :1])])
        >>> g = [2 * (model(x[i]) - x[i, :1]) * x[i] for i in range(2)]  # each sample's gradient
        >>> fisher = sum(torch.outer(gi, gi) for gi in g) / 2
        >>> v = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> torch.allclose(EmpiricalFisherOperator(objective) @ v, fisher @ v)
        True
    """

    curvature = "empirical-fisher"

    def _output_product(self, state: _Linearized, u: torch.Tensor) -> torch.Tensor:
        """``T_b Σ_t r_t r_tᵀ u_t``: ``r_t = T_b·gz`` on term t's logits is its loss's gradient
        (``T_b`` is 1 for a summed loss)."""
        if isinstance(self.loss_fn, LikelihoodLoss):
            dims = self.loss_fn.term_dims(state.gz)
        else:
            dims = tuple(range(1, state.gz.ndim))
        products = state.gz * u
        if dims:
            products = products.sum(dims, keepdim=True)
        return state.units * state.gz * products


class FisherOperator(EmpiricalFisherOperator):
    """The (true) Fisher: :class:`EmpiricalFisherOperator` at labels drawn from the model's
    predictive distribution instead of the data's, one draw per term, seeded by ``seed`` and the
    sample's content (docs/engine.md). A built-in loss only, as the draw needs the distribution
    the loss is the negative log-likelihood of. Its expectation over the draws is the GGN for
    cross-entropy and mse.

    Args:
        objective: The model, a built-in loss (:func:`~sharpscope.io.losses.resolve_loss`),
            the data and the parameters (:class:`Objective`).
        seed: The seed of the label draws.
        cache_graph: Keep each batch's linearisation for all products.
        validate: Run the model and the loss on the first batch now.

    Raises:
        InputError: The loss is not a built-in one; as :class:`GGNOperator` otherwise.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import Objective
        >>> from sharpscope.io.losses import resolve_loss
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> objective = Objective(torch.nn.Linear(3, 2), resolve_loss("cross-entropy"), data)
        >>> v = torch.ones(8)
        >>> fisher = FisherOperator(objective, seed=1)  # the same draws for the same seed
        >>> torch.equal(fisher @ v, FisherOperator(objective, seed=1) @ v)
        True
    """

    curvature = "fisher"
    settings = (*EmpiricalFisherOperator.settings, "seed")

    def __init__(
        self,
        objective: Objective,
        *,
        seed: int = 0,
        cache_graph: bool = True,
        validate: bool = True,
    ) -> None:
        if not isinstance(objective.loss_fn, LikelihoodLoss):
            raise InputError(
                "the fisher draws labels from the model's predictive distribution, which only a "
                "built-in `loss` defines; use the empirical-fisher or the ggn with this loss"
            )
        super().__init__(objective, cache_graph=cache_graph, validate=validate)
        self.seed = seed

    def _curvature_targets(self, logits: torch.Tensor, inputs: Any, index: int) -> torch.Tensor:
        targets = self.batches[index][1]
        draw = per_sample_draw(sample_seeds(inputs, targets, self.seed), logits.device)
        loss: LikelihoodLoss = self.loss_fn  # type: ignore[assignment]
        return loss.sample_targets(logits, targets.to(logits.device), draw)

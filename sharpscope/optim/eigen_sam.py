"""Eigen-SAM (Luo et al., NeurIPS 2024): SAM's perturbation plus the top Hessian eigenvector's part
orthogonal to the gradient, with the eigenvector refreshed by a few warm-started Lanczos steps."""

from __future__ import annotations

import glob
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim import Optimizer

from sharpscope.batches import LossFn
from sharpscope.choices import BACKENDS
from sharpscope.curvature import HessianOperator, Objective, ParamSpace, SolveSettings, lanczos
from sharpscope.curvature.hvp import Backend, refined
from sharpscope.curvature.sharded import ShardedHessianOperator, placed
from sharpscope.errors import InputError, check_choice
from sharpscope.optim.perturbations import eigen_sam_step
from sharpscope.optim.pieces import adopted, cut, local, nonzero, reduction, split
from sharpscope.optim.sam import SAM, Active


@dataclass(frozen=True)
class EigenEstimate:
    """The latest refresh of the top Hessian eigenpair, at global step ``step``."""

    eigenvalue: float
    residual: float
    """‖Hv − λv‖ of the returned pair."""
    converged: bool
    step: int
    n_products: int
    dtype: str | None = None
    """The dtype of the Hessian products: the parameters' (float32 or float64), never autocast's
    bfloat16 or float16; None in states saved before it was recorded."""


class EigenSAM(SAM):
    """Eigen-SAM around ``base_optimizer``: ε = ρ(ĝ + α s v⊥), per group ``sam_rho``, ``sam_alpha``.

    ``v`` is refreshed every ``eig_every`` global steps (at steps ``eig_every``, 2·``eig_every``, …;
    plain SAM before the first) by ``eig_steps`` Lanczos products on the Hessian of
    ``loss_fn(model(inputs), targets)`` on that step's batch (given by :meth:`refresh` before the
    step), warm-started from the previous ``v``. ``v`` is paired with parameters by name in
    ``model``.

    Args:
        base_optimizer: The optimizer that steps from w with the gradient at w + ε.
        rho: The radius ρ (every param group's ``sam_rho``).
        alpha: The weight α of the eigenvector's component (``sam_alpha``).
        model: The model; its parameters are named for ``v``.
        loss_fn: ``loss_fn(model(inputs), targets)``, the loss whose Hessian gives ``v``.
        eig_every: Refresh ``v`` every this many global steps.
        eig_steps: Lanczos products per refresh.
        batch_stats: BatchNorm on batch statistics in the Hessian's products.
        seed: The seed of the first refresh's random start.
        backend: How the refresh's Hessian products are taken
            (:data:`~sharpscope.choices.BACKENDS`; ``finite-difference``: two gradients each, at
            a gradient's memory, its step chosen again on v as analyze's is; the only one for
            parameters that FSDP2 shards).

    On a model whose parameters FSDP2 shards over the ranks (``fully_shard``), v is held as
    this rank's pieces (each parameter's local shard), refreshed by
    :class:`~sharpscope.curvature.sharded.ShardedHessianOperator` on every rank's batches, and
    its norms, alignment and ε are reduced over the ranks as scalars.

    Raises:
        ValueError: ``eig_every`` or ``eig_steps`` below 1, or as :class:`SAM`.
        InputError: An unknown ``backend``, or one other than ``finite-difference`` for sharded
            parameters.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> loss_fn = torch.nn.functional.mse_loss
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt = EigenSAM(base, model=model, loss_fn=loss_fn, eig_every=1, eig_steps=3)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(2):
        ...     _ = opt.refresh(x, y)  # due from the second step on
        ...     _ = opt.step(closure)
        >>> sorted(opt.eigenvector)
        ['bias', 'weight']
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.05,
        alpha: float = 0.2,
        *,
        model: nn.Module,
        loss_fn: LossFn,
        eig_every: int = 100,
        eig_steps: int = 5,
        batch_stats: bool = False,
        seed: int = 0,
        backend: Backend = "double-backward",
    ) -> None:
        if eig_every < 1 or eig_steps < 1:
            raise ValueError("eig_every and eig_steps must be at least 1")
        check_choice("backend", backend, BACKENDS)
        self._wrap(base_optimizer, {"sam_rho": rho, "sam_alpha": alpha}, model)
        self._over = reduction([p for g in self.param_groups for p in g["params"]])
        if self._over is not None and backend != "finite-difference":
            raise InputError(
                f"Eigen-SAM on sharded parameters takes Hessian products by finite differences "
                f"only, not `backend` {backend}: pass `backend` finite-difference"
            )
        self.model: nn.Module = model
        self.loss_fn = loss_fn
        self.eig_every = eig_every
        self.eig_steps = eig_steps
        self.batch_stats = batch_stats
        self.seed = seed
        self.backend = backend
        self._eigenvector: dict[str, torch.Tensor] | None = None
        self.estimate: EigenEstimate | None = None
        self.alignment: float | None = None
        self._name_of = self._names()
        self._flat_v: tuple[tuple[int, ...], torch.Tensor | None] | None = None

    @property
    def eigenvector(self) -> dict[str, torch.Tensor] | None:
        """The current v as ``{parameter name: tensor}`` (unit norm; this rank's local shard of
        each sharded parameter's part), or None before the first."""
        return self._eigenvector

    @eigenvector.setter
    def eigenvector(self, vector: dict[str, torch.Tensor] | None) -> None:
        self._eigenvector = vector
        self._flat_v = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """:meth:`torch.optim.Optimizer.add_param_group`, keeping the name pairing current."""
        super().add_param_group(param_group)
        if hasattr(self, "_name_of"):
            self._name_of = self._names()
            self._flat_v = None

    def _names(self) -> dict[torch.Tensor, str]:
        """Each optimized parameter's name in the model."""
        by_param = {p: n for n, p in self.model.named_parameters()}
        params = [p for g in self.param_groups for p in g["params"]]
        if any(p not in by_param for p in params):
            raise ValueError(
                "the optimizer has parameters that are not in the model: Eigen-SAM pairs its "
                "eigenvector with parameters by their name in the model"
            )
        return {p: by_param[p] for p in params}

    @property
    def refresh_due(self) -> bool:
        """Whether the coming step is a refresh step whose refresh is not made yet: then
        :meth:`refresh` must come before it."""
        done = self.estimate is not None and self.estimate.step == self.global_step
        return self.global_step > 0 and self.global_step % self.eig_every == 0 and not done

    def refresh(self, inputs: Any, targets: Any) -> EigenEstimate | None:
        """Before each step: when it is a refresh step (:attr:`refresh_due`), re-estimate v on its
        batch, as ``loss_fn(model(inputs), targets)`` sees it, and return the estimate; else
        nothing."""
        return self.refresh_batches([(inputs, targets)])

    def refresh_batches(self, batches: Sequence[tuple[Any, Any]]) -> EigenEstimate | None:
        """:meth:`refresh` on all micro-batches of a step together (each ``(inputs, targets)``,
        weighted by its number of loss terms, as one batch of them all would be)."""
        return self.refresh_eigenvector(*batches) if self.refresh_due else None

    def first_step(self, zero_grad: bool = False, *, scaler: GradScaler | None = None) -> None:
        """SAM's first step with Eigen-SAM's ε; :attr:`alignment` becomes this step's |cos(ĝ, v)|.
        A due refresh not made (:meth:`refresh`) is a ``ValueError``, not skipped silently."""
        if self.refresh_due:
            raise ValueError(
                f"step {self.global_step} refreshes the eigenvector: call "
                "refresh(inputs, targets) with its batch before the step"
            )
        self.alignment = None
        super().first_step(zero_grad, scaler=scaler)

    def refresh_eigenvector(self, *batches: tuple[Any, Any]) -> EigenEstimate:
        """Re-estimate the top (largest, not largest-|λ|) eigenpair of the Hessian on ``batches``
        (one or more) at the current weights, warm-started from v; the model's modes are restored
        afterwards. Autocast is off: the products are in the parameters' dtype."""
        if not batches:
            raise ValueError("refresh_eigenvector needs at least one batch")
        names = self._name_of
        trainable = [glob.escape(names[p]) for p in names if p.requires_grad]
        device = next(iter(names)).device.type
        with torch.enable_grad(), torch.autocast(device, enabled=False):
            objective = Objective(
                self.model, self.loss_fn, batches, trainable, batch_stats=self.batch_stats
            )
            # the training loop runs the model on its batches already: no validation
            op = (
                HessianOperator(objective, backend=self.backend, validate=False)
                if self._over is None
                else ShardedHessianOperator(objective, validate=False)
            )
            settings = SolveSettings(max_iter=self.eig_steps, seed=self.seed + self.global_step)
            start = self._warm_start(op.space)
            result = refined(  # a finite-difference step chosen again on v
                op,
                lambda: lanczos(
                    op,
                    k=1,
                    settings=settings,
                    v0=start,
                    verify=False,  # the refresh's budget is eig_steps products: Ritz estimates
                ),
                settings.tol,
            )
        pieces = split(result.eigenvectors[0].detach(), op.space.params)
        self.eigenvector = dict(zip(op.space.names, pieces, strict=True))
        self.estimate = EigenEstimate(
            eigenvalue=float(result.eigenvalues[0]),
            residual=float(result.residuals[0]),
            converged=bool(result.converged[0]),
            step=self.global_step,
            n_products=result.n_products,
            dtype=str(result.eigenvectors[0].dtype).removeprefix("torch."),
        )
        return self.estimate

    def _warm_start(self, space: ParamSpace) -> torch.Tensor | None:
        """The previous v over ``space`` (zero where it has no entry), or None to start afresh."""
        if self.eigenvector is None:
            return None
        old = self.eigenvector
        pieces = [local(p) for p in space.params]
        pairs = zip(space.names, pieces, strict=True)
        v = torch.cat([old.get(n, torch.zeros_like(t)).reshape(-1) for n, t in pairs])
        return v if nonzero(v, self._over) else None

    def set_eigenvector(self, vector: Mapping[str, torch.Tensor]) -> None:
        """Use ``{parameter name: tensor}`` (e.g. an eigenvector saved by ``sharpscope analyze``;
        whole tensors, the same on every rank) as v, scaled to unit norm and cut to this rank's
        pieces of sharded parameters; parameters it leaves out get zero."""
        whole = self._placed(vector)
        norm = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in whole.values()]))
        if not norm > 0:
            raise ValueError("the eigenvector is zero")
        params = self._params()
        self.eigenvector = {n: cut(t / norm, params[n]) for n, t in whole.items()}

    def _params(self) -> dict[str, torch.Tensor]:
        """The optimized parameters by name."""
        return {n: p for p, n in self._name_of.items()}

    def _placed(self, vector: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``vector`` checked against the parameters' names and (whole) shapes, cast to their
        dtype and device."""
        params = self._params()
        unknown = sorted(set(vector) - set(params))
        if unknown:
            raise KeyError(f"not parameters of this optimizer: {', '.join(unknown)}")
        for name, t in vector.items():
            if t.shape != params[name].shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(params[name].shape)}")
        return {
            n: t.detach().to(dtype=params[n].dtype, device=params[n].device)
            for n, t in vector.items()
        }

    def _restricted(self, active: Active) -> torch.Tensor | None:
        """v over the parameters with a gradient, renormalised; None before the first v or when
        it is zero there. Cached until v or the set of parameters with a gradient changes."""
        if self._eigenvector is None:
            return None
        key = tuple(id(p) for p in active.params)
        if self._flat_v is None or self._flat_v[0] != key:
            vector, names = self._eigenvector, self._name_of
            v = active.flat(vector.get(names[p], torch.zeros_like(local(p))) for p in active.params)
            norm = active.norm(v)
            self._flat_v = (key, v / norm if norm > 0 else None)
        return self._flat_v[1]

    def _perturbation(self, active: Active, g: torch.Tensor) -> torch.Tensor:
        v = self._restricted(active)
        if v is None:
            return super()._perturbation(active, g)
        hyper = active.hyper("sam_rho"), active.hyper("sam_alpha")
        eps, along = eigen_sam_step(g, v, *hyper, active.over)
        self.alignment = abs(along)
        return eps

    def _own_state(self) -> dict[str, Any]:
        """The step, the estimate and v: for sharded parameters as DTensors placed like them,
        which torch.distributed.checkpoint reshards onto another number of ranks (no rank
        gathers a whole vector to save it)."""
        params, vector = self._params(), self.eigenvector
        return {
            **super()._own_state(),
            "eigenvector": None
            if vector is None
            else {n: placed(t, params[n]) for n, t in vector.items()},
            "estimate": None if self.estimate is None else asdict(self.estimate),
        }

    def _load_own_state(self, own: Mapping[str, Any]) -> None:
        super()._load_own_state(own)
        vector, estimate = own["eigenvector"], own["estimate"]
        params = self._params()
        self.eigenvector = (
            None
            if vector is None
            else {n: adopted(t, params[n]) for n, t in self._placed(vector).items()}
        )
        self.estimate = None if estimate is None else EigenEstimate(**estimate)
        self.alignment = None

    def checkpoint_state(self) -> dict[str, Any]:
        """:meth:`SAM.checkpoint_state` with v under ``"eigenvector"``, placed like the
        parameters (zeros before the first v, which the JSON part records)."""
        own = self._own_state()
        vector = own.pop("eigenvector")
        own["has_eigenvector"] = vector is not None
        zeros = {n: torch.zeros_like(p) for n, p in self._params().items()}
        return {"scalars": json.dumps(own), "eigenvector": {**zeros, **(vector or {})}}

    def load_checkpoint_state(self, stored: Mapping[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` gave (see :meth:`SAM.load_checkpoint_state`)."""
        self._share_base()
        own = json.loads(stored["scalars"])
        own["eigenvector"] = stored["eigenvector"] if own.pop("has_eigenvector") else None
        self._load_own_state(own)

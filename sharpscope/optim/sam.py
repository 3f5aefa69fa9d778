"""SAM and ASAM: sharpness-aware wrappers around any ``torch.optim`` optimizer instance.

The wrapper shares the base optimizer's ``param_groups`` (same list, same dicts) and ``state``, so
learning-rate schedulers and per-group settings work on either object. Its own hyperparameters
live in the groups under ``sam_``-prefixed keys (``sam_rho``, ``sam_eta``, ``sam_alpha``), which
cannot collide with a base optimizer's own ``rho`` (Adadelta) or ``alpha`` (RMSprop, ASGD).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.amp import GradScaler
from torch.optim import Optimizer

from sharpscope import distributed
from sharpscope.curvature.batchnorm import freeze_batchnorm_stats
from sharpscope.optim.perturbations import Hyper, asam_perturbation, sam_perturbation
from sharpscope.optim.pieces import flat, local, nonzero, reduction, split

Closure = Callable[[], torch.Tensor]


class Active:
    """The parameters that have a gradient in this step, each with its param group, and flat
    vectors over them (in param-group order): over this rank's local shards of parameters that
    FSDP2 shards (DTensors), whose reductions :attr:`over` sums over the ranks."""

    def __init__(self, param_groups: Iterable[Mapping[str, Any]]) -> None:
        pairs = [(p, g) for g in param_groups for p in g["params"] if p.grad is not None]
        self.params = [p for p, _ in pairs]
        self.groups = [g for _, g in pairs]
        self.over = reduction(self.params)
        """Sums dot products over the ranks for sharded parameters; None for whole ones."""

    def flat(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """Concatenate one tensor (or its local shard) per active parameter into a flat vector."""
        return flat(tensors)

    def gradient(self) -> torch.Tensor:
        """The flat gradient g over the active parameters."""
        return self.flat(p.grad for p in self.params)

    def weights(self) -> torch.Tensor:
        """The flat weights w over the active parameters."""
        return self.flat(self.params)

    def hyper(self, key: str) -> Hyper:
        """A group hyperparameter: one number when all groups agree, else per-element values."""
        values = [float(g[key]) for g in self.groups]
        if len(set(values)) == 1:
            return values[0]
        return self.flat(
            torch.full_like(local(p), v, memory_format=torch.contiguous_format)
            for p, v in zip(self.params, values, strict=True)
        )

    def split(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into views shaped like the active parameters (local shards)."""
        return split(vec, self.params)

    def norm(self, vec: torch.Tensor) -> torch.Tensor:
        """‖vec‖ of a flat vector (its squares summed :attr:`over` the ranks when sharded)."""
        if self.over is None:
            return torch.linalg.vector_norm(vec)
        return self.over(torch.dot(vec, vec)).sqrt()


class SAM(Optimizer):
    """Sharpness-aware minimisation around ``base_optimizer``: ε = ρ g/‖g‖, ρ = ``sam_rho``.

    The norm is taken over all parameters that have a gradient; ρ is per param group. Give
    ``model`` to keep BatchNorm running statistics out of the second forward pass. Parameters
    that FSDP2 shards over the ranks (``fully_shard``: DTensors) are perturbed, saved and
    restored on each rank's local shards, with the norm's square summed over the ranks as one
    scalar; every rank takes the same ε (its own pieces of it).

    Args:
        base_optimizer: The optimizer that steps from w with the gradient at w + ε.
        rho: The radius ρ of the perturbation (every param group's ``sam_rho``).
        model: The model whose BatchNorm statistics the second pass leaves untouched.

    Raises:
        TypeError: ``base_optimizer`` is no torch optimizer (or is a SAM already).
        ValueError: ``rho`` is negative or not finite.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # the loss at w; w moved by SGD with the gradient at w + ε
        >>> opt.global_step
        1
    """

    _step_supports_amp_scaling = True
    """``GradScaler.step`` always calls :meth:`step` (handing it ``found_inf``, and ``grad_scale``
    when the gradients are still scaled) instead of skipping it, so a skipped step restores w
    rather than leaving the weights at w + ε; torch's protocol for optimizers that unscale
    themselves."""

    def __init__(
        self, base_optimizer: Optimizer, rho: float = 0.05, *, model: nn.Module | None = None
    ) -> None:
        self._wrap(base_optimizer, {"sam_rho": rho}, model)

    def _wrap(self, base: Optimizer, hyper: dict[str, float], model: nn.Module | None) -> None:
        """Share ``base``'s param groups and state, and add ``hyper`` to every group."""
        if not isinstance(base, Optimizer) or isinstance(base, SAM):
            raise TypeError(f"expected a torch.optim.Optimizer to wrap, got {type(base).__name__}")
        for key, value in hyper.items():
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(
                    f"{key.removeprefix('sam_')} must be non-negative and finite, got {value}"
                )
        super().__init__(base.param_groups, {**base.defaults, **hyper})
        self.base_optimizer = base
        self._share_base()
        self.model = model
        self.global_step = 0
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._thaw: Callable[[], None] = _nothing
        self.skipped = False
        """Whether the current (after :meth:`first_step`) or last step is skipped for a non-finite
        scaled gradient."""

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _perturbation(self, active: Active, g: torch.Tensor) -> torch.Tensor:
        """ε over the active parameters, given their flat gradient ``g`` (not zero)."""
        return sam_perturbation(g, active.hyper("sam_rho"), active.over)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: GradScaler | None = None) -> None:
        """Save w and move to w + ε from the current gradients; parameters without a gradient
        stay put, and a zero gradient gives ε = 0. BatchNorm statistics freeze (with ``model``).

        With an enabled ``scaler`` the gradients (of ``scaler.scale(loss)``) are unscaled first,
        once, as the base optimizer's; if any is non-finite nothing moves, the gradients stay,
        :attr:`skipped` is True and the :meth:`step` that completes this one skips."""
        if self._saved is not None:
            raise RuntimeError("first_step was called twice without a second_step between")
        self.skipped = False
        if (
            scaler is not None
            and scaler.is_enabled()
            and not _unscaled(scaler, self.base_optimizer)
        ):
            self.skipped = True
            self._saved = []  # nothing moved: nothing to restore
            return
        active = Active(self.param_groups)
        self._saved = [(p, local(p).clone()) for p in active.params]
        g = active.gradient() if active.params else None
        if g is not None and nonzero(g, active.over):
            eps = active.split(self._perturbation(active, g))
            for p, e in zip(active.params, eps, strict=True):
                local(p).add_(e)
        if self.model is not None:
            self._thaw = freeze_batchnorm_stats(self.model)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly (saved copies) and step the base optimizer with the gradients at
        w + ε; this counts one global step."""
        if self._saved is None:
            raise RuntimeError("second_step needs a first_step before it")
        if self.skipped:
            raise RuntimeError("this step is skipped (a non-finite gradient): call step() instead")
        self._restore()
        self.base_optimizer.step()
        self.global_step += 1
        self._opt_called = True  # torch's LR schedulers check it: "optimizer.step() was called"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def cancel_step(self) -> None:
        """Undo a :meth:`first_step`: restore w exactly, without a base step (a skipped step)."""
        if self._saved is None:
            raise RuntimeError("cancel_step needs a first_step before it")
        self._restore()

    def _restore(self) -> None:
        """Copy the saved weights back and let BatchNorm statistics update again."""
        assert self._saved is not None
        for p, w in self._saved:
            local(p).copy_(w)
        self._saved = None
        self._thaw()
        self._thaw = _nothing

    def step(  # type: ignore[override]
        self, closure: Closure | None = None, *, scaler: GradScaler | None = None
    ) -> torch.Tensor | None:
        """One SAM step: ``closure()`` must compute the loss (over one batch or all of its
        micro-batches), call ``backward()`` and return the loss; it runs at w and at w + ε
        (:meth:`two_passes`), then w is restored and the base optimizer steps. Returns the loss
        at w.

        With an enabled ``scaler`` (``torch.amp.GradScaler``) the closure backpropagates
        ``scaler.scale(loss)``; each pass's gradient is unscaled once (the first for ε, the second
        for the base step), and a non-finite gradient in either pass skips the step with w
        restored, as ``scaler.step`` skips; call ``scaler.update()`` after the step as usual.

        Without a closure, ``step()`` completes a step begun by :meth:`first_step` (what a
        trainer that runs the backward passes itself calls): w restored, then the base step, or
        none when the step is skipped: by :meth:`first_step`, or by ``GradScaler.step`` finding
        the gradients non-finite (it calls this step always; gradients it has not unscaled are
        unscaled here)."""
        if closure is not None:
            loss = self.two_passes(closure, scaler=scaler)
            self._complete()
            return loss
        if self._saved is None:
            raise ValueError(
                "SAM's step needs a closure that computes the loss and its gradient, or a "
                "first_step before it"
            )
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step, as grad_scale
        if found_inf is not None and bool(found_inf):
            self.skipped = True
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None and not self.skipped:
            inverse = grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ divides
            for p in Active(self.param_groups).params:
                local(p.grad).mul_(inverse.to(p.grad.device))
        self._complete()
        return None

    def two_passes(self, closure: Closure, *, scaler: GradScaler | None = None) -> torch.Tensor:
        """The two passes of a :meth:`step` with ``closure``, without the base step: at w (the
        gradients zeroed first), :meth:`first_step`, at w + ε (zeroed again), each pass's gradient
        unscaled once by an enabled ``scaler`` and a non-finite one marking the step
        :attr:`skipped`. A :meth:`step` without closure (e.g. through ``GradScaler.step``)
        completes it. Returns the loss at w."""
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(scaler=scaler)
        if self.skipped:
            return loss
        self.zero_grad()
        with torch.enable_grad():
            closure()
        if scaler is not None and scaler.is_enabled() and not _unscaled(scaler, self):
            self.skipped = True
        return loss

    def _complete(self) -> None:
        """End a step begun by :meth:`first_step`: cancelled when skipped, else the base step."""
        if self.skipped:
            self.cancel_step()
        else:
            self.second_step()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its state, e.g. momentum, and the shared param groups
        with ``sam_*`` hyperparameters) plus this wrapper's own state under ``"sam"``."""
        state = self.base_optimizer.state_dict()
        state["sam"] = self._own_state()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore what :meth:`state_dict` returned (not between the two steps of a SAM step)."""
        if self._saved is not None:
            raise RuntimeError("load_state_dict between first_step and second_step")
        state_dict = dict(state_dict)
        if "sam" not in state_dict:
            raise ValueError("not a sharpscope SAM state dict: it has no 'sam' entry")
        own = state_dict.pop("sam")
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()
        self._load_own_state(own)

    def checkpoint_state(self) -> dict[str, Any]:
        """This wrapper's own state (:meth:`state_dict`'s ``"sam"``) as torch.distributed.checkpoint
        saves it and loads it in place (:mod:`sharpscope.optim.checkpoint`): its tensors placed
        like the parameters and always present (so a fresh optimizer's is the load's template),
        the rest one JSON string."""
        return {"scalars": json.dumps(self._own_state())}

    def load_checkpoint_state(self, stored: Mapping[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` gave, once the base optimizer's state is loaded
        (its param groups, replaced by the load, are shared again)."""
        self._share_base()
        self._load_own_state(json.loads(stored["scalars"]))

    def _own_state(self) -> dict[str, Any]:
        return {"global_step": self.global_step}

    def _load_own_state(self, own: Mapping[str, Any]) -> None:
        self.global_step = int(own["global_step"])


class ASAM(SAM):
    """Adaptive SAM: ε = ρ T²g/‖Tg‖ with T = diag(|w| + η), per element, over every parameter
    (``sam_rho``, ``sam_eta`` per group); ρ is typically about 10× SAM's.

    Args:
        base_optimizer: The optimizer that steps from w with the gradient at w + ε.
        rho: The radius ρ (every param group's ``sam_rho``).
        eta: The offset η of the scaling T (``sam_eta``).
        model: The model whose BatchNorm statistics the second pass leaves untouched.

    Raises:
        TypeError: As :class:`SAM`.
        ValueError: ``rho`` or ``eta`` is negative or not finite.

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ASAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, eta=0.01)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> opt.param_groups[0]["sam_eta"]
        0.01
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        rho: float = 0.5,
        eta: float = 0.01,
        *,
        model: nn.Module | None = None,
    ) -> None:
        self._wrap(base_optimizer, {"sam_rho": rho, "sam_eta": eta}, model)

    def _perturbation(self, active: Active, g: torch.Tensor) -> torch.Tensor:
        return asam_perturbation(
            g, active.weights(), active.hyper("sam_rho"), active.hyper("sam_eta"), active.over
        )


def _unscaled(scaler: GradScaler, key: Optimizer) -> bool:
    """Unscale the gradients once through ``scaler`` under the identity ``key`` (the scaler allows
    one unscale per optimizer and step: the two passes use the base and the wrapper), and say
    whether they were all finite, the scaler's own test (on the scaled values), on every rank.

    Under torch.distributed a non-finite gradient on one rank (its own first-pass gradient with
    per-rank perturbations, say) counts on all, and every rank's scaler records it: the ranks
    skip the step together (none waits in a second pass the others skipped) and their scales
    stay equal. The flag is the scaler's per-device ``found_inf``, as torch's ShardedGradScaler
    all-reduces it; FSDP2-sharded gradients are checked on this rank's shards."""
    grads = [p.grad for g in key.param_groups for p in g["params"] if p.grad is not None]
    finite = not grads or bool(torch.stack([torch.isfinite(local(t)).all() for t in grads]).all())
    scaler.unscale_(key)
    if not distributed.any_rank(not finite):
        return True
    for found in scaler._per_optimizer_states[id(key)]["found_inf_per_device"].values():
        found.fill_(1.0)
    return False


def _nothing() -> None:
    """Nothing to undo."""

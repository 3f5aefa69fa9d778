"""Training with SAM, ASAM or Eigen-SAM under Lightning (needs the ``lightning`` extra).

:class:`SAMModuleMixin` turns a ``LightningModule`` to manual optimization and runs each step as
:meth:`~sharpscope.optim.SAM.step` with a closure over ``sam_accumulate`` micro-batches (one per
``training_step`` call): the pass at w, ε from the accumulated gradient, the pass at w + ε, the
base step; the schedulers ``configure_optimizers`` returns step after every optimizer step not
skipped. Lightning's precision plugin supplies autocast (Eigen-SAM's refresh turns it off, so
its Hessian products are in the parameters' dtype). With a GradScaler (``"16-mixed"``), the
plugin runs its closure once and then ``scaler.step``: the closure is both passes
(:meth:`~sharpscope.optim.SAM.two_passes`, each unscaled once), and ``scaler.step`` completes the
step, restoring w and skipping the base step on inf. Checkpoints carry the optimizer's whole
state dict (Eigen-SAM's eigenvector and estimate too) and the plugin's scaler state.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from sharpscope.optim import SAM, EigenSAM, micro_batch_closure


class SAMModuleMixin:
    """Mix into a ``LightningModule`` (before it), define ``sam_loss(batch)`` (the mean loss of a
    micro-batch) and return a SAM, ASAM or Eigen-SAM wrapper from ``configure_optimizers``. For
    Eigen-SAM each micro-batch is the ``(inputs, targets)`` its ``loss_fn`` takes. An epoch's
    batches should be a multiple of ``sam_accumulate`` (a window continues into the next
    epoch)."""

    sam_accumulate: int = 1
    """Micro-batches per optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self._sam_window: list[Any] = []

    def sam_loss(self, batch: Any) -> torch.Tensor:
        """The mean loss of one micro-batch (at the current weights)."""
        raise NotImplementedError("define sam_loss(batch) in the LightningModule")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """Collect the micro-batch; after ``sam_accumulate`` of them, one SAM step over them all.
        Returns the step's loss at w (None while collecting)."""
        assert isinstance(self, LightningModule)
        if self.sam_accumulate < 1:
            raise ValueError(f"sam_accumulate must be at least 1, got {self.sam_accumulate}")
        self._sam_window.append(batch)
        if len(self._sam_window) < self.sam_accumulate:
            return None
        window, self._sam_window = self._sam_window, []
        optimizer = self.optimizers()
        sam = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(sam, SAM):
            raise TypeError(
                f"configure_optimizers must return a sharpscope SAM wrapper, got {sam!r}"
            )
        if isinstance(sam, EigenSAM):
            sam.refresh_batches(window)
        closure = micro_batch_closure(self.sam_loss, window, backward=self.manual_backward)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None:
            return self._scheduled(sam, optimizer.step(closure=closure))
        losses: list[torch.Tensor] = []

        def passes() -> torch.Tensor:
            """Both passes: the plugin runs its closure once, then ``scaler.step(sam)``, which
            completes the step (w restored; the base step unless skipped)."""
            losses.append(sam.two_passes(closure, scaler=scaler))
            return losses[0]

        optimizer.step(closure=passes)
        return self._scheduled(sam, losses[0])

    def _scheduled(self, sam: SAM, loss: torch.Tensor) -> torch.Tensor:
        """Step the schedulers ``configure_optimizers`` returned, unless the step was skipped;
        pass ``loss`` on."""
        assert isinstance(self, LightningModule)
        if not sam.skipped:
            schedulers = self.lr_schedulers()
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                if scheduler is not None:
                    scheduler.step()
        return loss

"""A Lightning ``Callback`` that measures sharpness every N optimizer steps and logs it to the
trainer's loggers (TensorBoard, CSV, W&B, MLflow, ...).

Importing this module imports lightning (the ``lightning`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sharpscope.batches import LossFn
from sharpscope.io.optional import require
from sharpscope.training.sinks import scalars
from sharpscope.training.tracking import Batch, SharpnessTracker, tracker_for

_lightning = require("lightning", "sharpscope's Lightning callback")


class SharpnessCallback(_lightning.pytorch.Callback):
    """Runs a :class:`~sharpscope.training.tracking.SharpnessTracker` on the ``LightningModule``
    (``module(inputs)`` must give the outputs ``loss_fn(outputs, targets)`` takes) every
    ``every`` optimizer steps, after the step, and logs its numbers under ``prefix`` to every
    logger of the trainer at its ``global_step``, whatever ``log_every_n_steps`` is.

    ``probe_batches`` are ``(inputs, targets)`` pairs; ``tracker_options`` go to the tracker
    (``lambda_min``, ``trace``, ``products``, ``tol``, ``max_iter``, ``eigen_sam``, ``log``, ...)
    or, naming a field of its :class:`~sharpscope.curvature.Objective` (``params``,
    ``batch_stats``, ...), to that.
    With gradient accumulation a step is measured once, after its last micro-batch. Under
    torch.distributed, give each rank its share of the probe set.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        probe_batches: Iterable[Batch],
        every: int = 100,
        *,
        prefix: str = "sharpness/",
        **tracker_options: Any,
    ) -> None:
        self.loss_fn = loss_fn
        self.probe = list(probe_batches)
        self.every = every
        self.prefix = prefix
        self.options = tracker_options
        self.tracker: SharpnessTracker | None = None
        self._measured_step = -1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Make the tracker for the module being fitted."""
        if self.tracker is None or self.tracker.model is not pl_module:
            self.tracker = tracker_for(
                pl_module, self.loss_fn, self.probe, self.every, **self.options
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Before a tracking step, tell the tracker its learning rate (the critical measure's
        direction is that step's update)."""
        step = trainer.global_step + 1
        if self.tracker is not None and self.tracker.due(step):
            self.tracker.step_started(step, optimizer.param_groups[0]["lr"])

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measure once per tracking step and send the figures to the loggers."""
        step = trainer.global_step
        if self.tracker is None or step == self._measured_step or not self.tracker.due(step):
            return
        self._measured_step = step
        measured = self.tracker.measure(step)
        metrics = scalars(measured.row(), self.prefix)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Close the tracker's own logs."""
        if self.tracker is not None:
            self.tracker.close()

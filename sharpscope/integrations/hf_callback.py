"""A Hugging Face ``Trainer`` callback that measures sharpness every N steps and logs it through
the Trainer's own ``log`` (so its W&B, TensorBoard, MLflow and other integrations receive it).

Importing this module imports transformers (the ``hf`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sharpscope.batches import LossFn
from sharpscope.io.losses import loss_name, resolve_loss
from sharpscope.io.optional import require
from sharpscope.training.sinks import scalars
from sharpscope.training.tracking import Batch, tracker_for

_transformers = require("transformers", "sharpscope's Trainer callback")
LABELS = "labels"


def labelled(batch: Any) -> Batch:
    """A collated batch as ``(inputs, targets)``: a dict's ``labels`` entry becomes the targets
    and the rest the model's keyword inputs; a pair is kept as it is."""
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise ValueError(f"a probe batch dict needs a {LABELS!r} entry for the loss")
        return {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    inputs, targets = batch
    return inputs, targets


class SharpnessCallback(_transformers.TrainerCallback):
    """Runs a :class:`~sharpscope.training.tracking.SharpnessTracker` on ``trainer.model`` every
    ``every`` optimizer steps (after the step, before the Trainer logs or saves it) and logs its
    numbers with ``trainer.log`` under ``prefix``. The products run in the parameters' dtype,
    without the autocast that accelerate puts into the model's ``forward`` under ``bf16`` or
    ``fp16``.

    ``probe_batches`` are collated batches (dicts with ``labels``, as the data collator makes
    them) or ``(inputs, targets)`` pairs; ``loss_fn(outputs, labels)`` defaults to the loss the
    model's task implies (cross-entropy for a classifier, next-token cross-entropy for a causal
    LM, ...). ``tracker_options`` go to the tracker (``lambda_min``, ``trace``, ``products``,
    ``tol``, ``max_iter``, ``eigen_sam``, ``log``, ...) or, naming a field of its
    :class:`~sharpscope.curvature.Objective` (``params``, ``batch_stats``, ...), to that. Under
    torch.distributed, give each rank its share of the probe set.
    """

    def __init__(
        self,
        trainer: Any,
        probe_batches: Iterable[Any],
        every: int = 100,
        *,
        loss_fn: LossFn | None = None,
        prefix: str = "sharpness/",
        **tracker_options: Any,
    ) -> None:
        model = trainer.model
        loss = loss_fn if loss_fn is not None else resolve_loss(loss_name("auto", model))
        probe = [labelled(b) for b in probe_batches]
        self.trainer = trainer
        self.prefix = prefix
        self.tracker = tracker_for(model, loss, probe, every, **tracker_options)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Before a tracking step, tell the tracker its learning rate (the critical measure's
        direction is that step's update)."""
        step, optimizer = state.global_step + 1, kwargs.get("optimizer")
        if optimizer is not None and self.tracker.due(step):
            self.tracker.step_started(step, optimizer.param_groups[0]["lr"])
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Measure at a tracking step and log the figures through the Trainer."""
        measured = self.tracker(state.global_step)
        if measured is not None:
            self.trainer.log(scalars(measured.row(), self.prefix))
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Close the tracker's own logs."""
        self.tracker.close()
        return control

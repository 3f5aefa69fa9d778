"""Training with SAM, ASAM or Eigen-SAM under transformers' ``Trainer`` (needs the ``hf`` extra).

The Trainer keeps its own loop: its optimizer (from ``TrainingArguments``: AdamW, SGD, ...)
becomes the base of the SAM-family wrapper ``sam(base, model)`` returns. Each micro-batch's
``training_step`` is the pass at w; after the last micro-batch of an accumulation window the
wrapper perturbs with the accumulated gradient and the window's micro-batches run again at
w + ε; the Trainer's ``optimizer.step()`` then restores w and steps the base with that gradient
(clipped first when ``max_grad_norm`` > 0). bf16 autocast is the Trainer's own. With ``fp16``
(accelerate's GradScaler, on CUDA) the pass at w is unscaled once for ε and a non-finite one
skips the step unperturbed; the scaler calls the wrapper's ``step()`` even on inf
(``_step_supports_amp_scaling``), which restores w, and the Trainer sees the skip (its LR
scheduler holds). On CPU accelerate gives fp16 neither a scaler nor autocast (a warning says so).
Checkpoints carry the wrapper's whole state dict (Eigen-SAM's eigenvector and estimate too), and
the Trainer's ``scaler.pt`` the scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback

from sharpscope.optim import SAM, EigenSAM

SAMFactory = Callable[[Optimizer, nn.Module], SAM]
"""Builds the wrapper from the Trainer's optimizer and model, e.g.
``lambda base, model: sharpscope.SAM(base, rho=0.05, model=model)``."""


def model_loss(outputs: Any, targets: Any) -> torch.Tensor:
    """The loss the model computed from the labels in its inputs (``outputs.loss``): Eigen-SAM's
    ``loss_fn`` for Trainer batches, whose refresh sees each micro-batch as ``(inputs,
    inputs["labels"])``."""
    loss = outputs["loss"] if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: its inputs need their `labels`")
    return loss


class SAMTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it) to train with ``sam``; see
    :class:`SAMTrainer`."""

    def __init__(self, *args: Any, sam: SAMFactory, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sam_factory = sam
        self._micro_batches: list[tuple[dict[str, Any], Any]] = []
        self.add_callback(_SkippedSteps(self))

    @property
    def sam(self) -> SAM:
        """The SAM-family wrapper (inside the Trainer's accelerate wrapper, if any)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """The Trainer's optimizer, wrapped by ``sam`` (once)."""
        if self.optimizer is None:
            if (
                self.args.fp16
                and self.accelerator.scaler is None
                and self.accelerator.device.type == "cpu"
            ):
                warnings.warn(
                    "fp16=True on CPU: accelerate applies neither fp16 autocast nor a GradScaler "
                    "there, so this trains in the parameters' dtype (bf16=True autocasts on CPU)",
                    stacklevel=2,
                )
            base = super().create_optimizer(model)
            wrapper = self.sam_factory(base, self.model)
            if not isinstance(wrapper, SAM):
                raise TypeError(f"sam must return a sharpscope SAM wrapper, got {wrapper!r}")
            self.optimizer = wrapper
        return self.optimizer

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The Trainer's step at w; after the window's last micro-batch, ε and the pass at w + ε."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._micro_batches.append((inputs, num_items_in_batch))
        if len(self._micro_batches) == self.current_gradient_accumulation_steps:
            window, self._micro_batches = self._micro_batches, []
            self._perturbed_pass(model, window)
        return loss

    def _perturbed_pass(self, model: nn.Module, window: list[tuple[dict[str, Any], Any]]) -> None:
        """Eigen-SAM's refresh on the window (when due), w → w + ε, and the window's gradient
        there, averaged over the ranks once."""
        sam = self.sam
        if isinstance(sam, EigenSAM):
            sam.refresh_batches([(self._prepare_inputs(b), b["labels"]) for b, _ in window])
        sam.first_step(zero_grad=True, scaler=self.accelerator.scaler)
        if sam.skipped:
            return  # a non-finite gradient at w: nothing moved, and the step() skips
        for i, (inputs, count) in enumerate(window):
            if i < len(window) - 1:
                with self.accelerator.no_sync(model):
                    super().training_step(model, inputs, count)
            else:
                super().training_step(model, inputs, count)


class _SkippedSteps(TrainerCallback):
    """Shows accelerate a SAM step skipped for a non-finite gradient, so that the Trainer's LR
    scheduler does not step: accelerate infers a skip from ``step()`` not being called, but
    ``GradScaler.step`` calls a SAM wrapper's ``step()`` always, as it does fused AdamW's
    (accelerate #4242)."""

    def __init__(self, trainer: SAMTrainerMixin) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Mark the accelerate optimizer's step as skipped when the wrapper skipped it."""
        optimizer = self.trainer.optimizer
        if self.trainer.sam.skipped and hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = True


class SAMTrainer(SAMTrainerMixin, Trainer):
    """``transformers.Trainer`` training with SAM, ASAM or Eigen-SAM: ``SAMTrainer(model, args,
    train_dataset=..., sam=lambda base, model: sharpscope.SAM(base, rho=0.05, model=model))``;
    gradient accumulation, bf16, fp16 and resuming from a checkpoint work as with ``Trainer``."""
